"""Judgement: known-score tables, audit reproducibility, persistent budgets, near duplicates, loading."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest

from service.bundle import Bundle, parse_manifest
from service.errors import ConfigError
from service.judge import (Judge, Judgement, NearDuplicate, ReviewShare, audit_draw, default_score, load_score_fn,
                           rank_key, session_counter)
from service.keypoints import COCO17
from service.record import Head, Keypoint, Person, Prediction
from service.store import Store

K = COCO17.count


def make_bundle(roles: tuple[str, ...] = ("head", "pose_main", "pose_visible"), mode: str = "two_model") -> Bundle:
    entry = {"file": "x.onnx", "sha256": "0", "imgsz": 320, "task": "pose", "names": ["person"], "kpt_shape": [K, 3]}
    models = {r: ({**entry, "task": "detect", "names": ["head"], "kpt_shape": None} if r == "head" else entry)
              for r in roles}
    return parse_manifest(Path("."), {
        "format": 1, "id": "b-test", "models": models, "keypoints": COCO17.to_json(), "visibility_mode": mode,
        "thresholds": {"det_conf": 0.25, "person_conf": 0.25, "main": 0.6, "visible": 0.6}})


def person(conf: float = 0.9, main: float = 0.95, vis: float = 0.95, match: float = 0.9,
           near: int = 0, near_vis: float | None = None, contra: int = 0) -> Person:
    """A person whose face points (0-4) sit inside HEAD; ``near`` body points have main conf
    0.675 (and visible conf ``near_vis``), ``contra`` body points main 0.1 but visible 0.95."""
    kps = []
    for i in range(K):
        x, y = (50 + i, 50) if i < 5 else (100 + i, 200)
        m, v = main, vis
        if K - near <= i:
            m, v = 0.675, vis if near_vis is None else near_vis
        if 5 <= i < 5 + contra:
            m, v = 0.1, 0.95
        visibility = "outside" if m <= 0.6 else ("visible" if v > 0.6 else "occluded")
        kps.append(Keypoint(x, y, m, v, visibility))
    return Person((0, 0, 300, 400), conf, tuple(kps), match)


HEAD = Head((30, 30, 80, 80), 0.9)
BUNDLE = make_bundle()


@pytest.mark.parametrize("pred, bundle, score, reasons", [
    (Prediction(640, 480), BUNDLE, 0.3, ["empty"]),
    (Prediction(640, 480), make_bundle(("pose_main",), "main_only"), 0.3, ["empty"]),
    (Prediction(640, 480, (HEAD,), (person(),)), BUNDLE, 1.0, []),
    (Prediction(640, 480, (Head((30, 30, 80, 80), 0.475),), (person(),)), BUNDLE, 0.5, ["low_head_conf"]),
    (Prediction(640, 480, (HEAD,), (person(conf=0.3, match=0.3),)), BUNDLE, 0.05 / 0.45, ["low_person_conf"]),
    # persons' confidences 0.6 apart: the models disagree (weakest reason first)
    (Prediction(640, 480, (HEAD,), (person(conf=0.3),)), BUNDLE, 0.0, ["model_disagreement", "low_person_conf"]),
    # all 17 points right on the main threshold: certainty 0 for each point; no face point is
    # claimed, so the head has no person either
    (Prediction(640, 480, (HEAD,), (person(main=0.6, vis=0.0),)), BUNDLE, 0.0,
     ["kpt_near_threshold", "head_without_person"]),
    # 6 body points 0.075 above the main threshold: doubt 6 x 0.5 = 3 of a budget of 4
    (Prediction(640, 480, (HEAD,), (person(near=6),)), BUNDLE, 0.25, ["kpt_near_threshold"]),
    # the same points with the visible confidence 0.03 from its threshold: 6 x 0.8 = 4.8 > 4
    (Prediction(640, 480, (HEAD,), (person(near=6, near_vis=0.63),)), BUNDLE, 0.0, ["kpt_near_threshold"]),
    # a point seen by the visible-only model but not claimed by the main model: contradiction
    (Prediction(640, 480, (HEAD,), (person(contra=1),)), BUNDLE, 2 / 3, []),
    (Prediction(640, 480, (HEAD,), (person(match=0.0),)), BUNDLE, 0.3, ["model_disagreement"]),
    (Prediction(640, 480, (HEAD,), (person(match=0.0),)), make_bundle(("head", "pose_main"), "main_only"), 1.0, []),
    (Prediction(640, 480, (HEAD, Head((400, 30, 450, 80), 0.9)), (person(),)), BUNDLE, 0.4, ["head_without_person"]),
    (Prediction(640, 480, (), (person(),)), BUNDLE, 0.4, ["person_without_head"]),
    (Prediction(640, 480, (), (person(),)), make_bundle(("pose_main", "pose_visible")), 1.0, []),
])
def test_default_score_table(pred: Prediction, bundle: Bundle, score: float, reasons: list[str]) -> None:
    got_score, got_reasons = default_score(pred, bundle)
    assert got_score == pytest.approx(score, abs=1e-6)
    assert got_reasons == reasons


@pytest.mark.parametrize("pred, priority", [
    (Prediction(640, 480), 0.7),
    (Prediction(640, 480, (HEAD,), (person(),)), 0.0),
    # 6 points half a margin from the threshold: doubt 3 (not capped by the budget of 4)
    (Prediction(640, 480, (HEAD,), (person(near=6),)), 3.0),
    (Prediction(640, 480, (HEAD,), (person(near=6, near_vis=0.63),)), 4.8),
    # two doubtful people need more correction than one, although both score 0
    (Prediction(640, 480, (HEAD,), (person(near=6, near_vis=0.63), person(near=6, near_vis=0.63))), 9.6),
    (Prediction(640, 480, (Head((30, 30, 80, 80), 0.475),), (person(),)), 0.5),
])
def test_review_priority_adds_up_the_doubt(pred: Prediction, priority: float) -> None:
    from service.scoring import review_priority

    assert review_priority(pred, BUNDLE) == pytest.approx(priority, abs=1e-6)


@pytest.mark.parametrize("pred, doubt", [
    (Prediction(640, 480), 0.7),
    # 1 head + 1 person conf + 17 points (0.35 from both thresholds: doubt 1 - 0.35/0.5 = 0.3) + 1 agreement
    (Prediction(640, 480, (HEAD,), (person(),)), 17 * 0.3 / 20),
    # every point on the main threshold: doubt 1 per point (none claimed, so no visible term)
    (Prediction(640, 480, (HEAD,), (person(main=0.6, vis=0.0),)), 17 / 20),
    (Prediction(640, 480, (Head((30, 30, 80, 80), 0.475),), (person(),)), (0.5 + 17 * 0.3) / 20),
])
def test_image_doubt_is_the_mean_doubt(pred: Prediction, doubt: float) -> None:
    from service.scoring import image_doubt

    assert image_doubt(pred, BUNDLE) == pytest.approx(doubt, abs=1e-6)


def test_image_doubt_ranks_unsure_images_not_crowded_ones() -> None:
    from service.scoring import image_doubt, review_priority

    crowded = Prediction(640, 480, (HEAD,), tuple(person(near=6) for _ in range(4)))
    unsure = Prediction(640, 480, (HEAD,), (person(main=0.7, vis=0.65),))
    assert review_priority(crowded, BUNDLE) > review_priority(unsure, BUNDLE)  # the sum grows with people
    assert image_doubt(unsure, BUNDLE) > image_doubt(crowded, BUNDLE)  # the mean does not


def constant(score: float, reasons: list[str] | None = None):
    return lambda prediction, bundle: (score, list(reasons or []))


@pytest.fixture()
def store(tmp_path: Path):
    s = Store(tmp_path / "s", clock=lambda: 1_800_000_000.0)
    yield s
    s.close()


EMPTY = Prediction(8, 8)


def test_threshold_and_audit_reproducible(store: Store) -> None:
    low = Judge(constant(0.2), threshold=0.5, audit_fraction=0.0, seed=1, store=store)
    assert low.judge("a" * 64, EMPTY, BUNDLE) == Judgement(0.2, ("low_score",), "review", False)
    ids = [f"{i:064x}" for i in range(400)]
    picks = [Judge(constant(0.9), 0.5, 0.1, seed, store).judge(i, EMPTY, BUNDLE) for seed in (7, 7, 8) for i in ids]
    a, b, c = picks[:400], picks[400:800], picks[800:]
    assert a == b and a != c
    audited = [j for j in a if j.audit]
    assert 20 <= len(audited) <= 60
    assert all(j.decision == "review" and "audit" in j.reasons for j in audited)
    assert all(j.decision == "auto_accepted" for j in a if not j.audit)
    assert [i for i, j in zip(ids, a) if j.audit] == [i for i in ids if audit_draw(7, i) < 0.1]


def _judge_and_complete(judge: Judge, store: Store, n: int, salt: str,
                        session: tuple[str, str] | None = None) -> list[str]:
    """Judge n fresh images and complete each in the store (budgets are spent on completion)."""
    decisions = []
    for i in range(n):
        image_id, _ = store.ingest(f"{salt}-{i}".encode(), "test")
        store.claim("w", limit=1)
        verdict = judge.judge(image_id, EMPTY, BUNDLE, session=session)
        try:
            store.complete(image_id, "w", {"width": 1, "height": 1}, "b", verdict.decision, verdict.score,
                           verdict.reasons, verdict.audit, counters=verdict.counters)
        finally:
            judge.settle(verdict)
        decisions.append(verdict.decision)
    return decisions


def test_budgets_survive_restart(tmp_path: Path) -> None:
    t = [1_800_000_000.0]
    s = Store(tmp_path / "s", clock=lambda: t[0])
    judge = Judge(constant(0.1, ["empty"]), 0.5, 0.0, 0, s, hourly_budget=2, daily_budget=3)
    assert _judge_and_complete(judge, s, 3, "a") == ["review", "review", "auto_accepted"]
    over = judge.judge("f" * 64, EMPTY, BUNDLE)
    assert over.reasons == ("empty", "over_budget") and over.score == 0.1 and over.counters == ()
    s.close()
    t[0] += 3600  # next hour, same day, new Store and Judge on the same database
    s = Store(tmp_path / "s", clock=lambda: t[0])
    judge = Judge(constant(0.1), 0.5, 0.0, 0, s, hourly_budget=2, daily_budget=3)
    assert _judge_and_complete(judge, s, 3, "b") == ["review", "auto_accepted", "auto_accepted"]
    assert s.counter("review:hour:" + time.strftime("%Y%m%d%H", time.gmtime(t[0]))) == 1
    assert s.counter("review:day:" + time.strftime("%Y%m%d", time.gmtime(t[0]))) == 3
    assert s.counter("annotated") == 6
    s.close()


def test_budget_is_reserved_until_settled_and_spent_only_by_completion(tmp_path: Path) -> None:
    s = Store(tmp_path / "s", clock=lambda: 1_800_000_000.0)
    judge = Judge(constant(0.1), 0.5, 0.0, 0, s, hourly_budget=1)
    first = judge.judge("1" * 64, EMPTY, BUNDLE)
    assert first.decision == "review" and len(first.counters) == 1
    assert judge.judge("2" * 64, EMPTY, BUNDLE).decision == "auto_accepted"  # reserved, not yet spent
    assert s.counter(first.counters[0]) == 0
    judge.settle(first)  # the completion never happened (crash, lease lost): nothing was spent
    again = judge.judge("3" * 64, EMPTY, BUNDLE)
    assert again.decision == "review" and again.counters == first.counters
    s.close()


def test_reviews_per_session_cap_the_reviews_of_one_recording(tmp_path: Path) -> None:
    s = Store(tmp_path / "s", clock=lambda: 1_800_000_000.0)
    judge = Judge(constant(0.1, ["empty"]), 0.5, 0.0, 0, s, hourly_budget=10, session_budget=2)
    run1, run2 = ("cam1", "run1"), ("cam1", "run2")
    first = judge.judge("1" * 64, EMPTY, BUNDLE, session=run1)
    assert first.decision == "review" and first.counters[0] == session_counter(*run1) == \
        'review:session:["cam1", "run1"]'
    second = judge.judge("2" * 64, EMPTY, BUNDLE, session=run1)  # reserved, not yet completed
    third = judge.judge("3" * 64, EMPTY, BUNDLE, session=run1)
    assert second.decision == "review" and third.decision == "auto_accepted"
    assert third.reasons == ("empty", "session_reviewed") and third.counters == ()
    assert judge.judge("4" * 64, EMPTY, BUNDLE, session=run2).decision == "review"  # another recording
    assert judge.judge("5" * 64, EMPTY, BUNDLE, session=("cam2", "run1")).decision == "review"  # another camera
    assert judge.judge("6" * 64, EMPTY, BUNDLE).decision == "review"  # no declared recording: no cap
    judge.settle(second)  # its completion never happened: the session's second review is free again
    assert judge.judge("7" * 64, EMPTY, BUNDLE, session=run1).decision == "review"
    assert s.counter(session_counter(*run1)) == 0  # spent by completions only
    s.close()
    # Completed through the store (as the daemon does), the cap survives a restart.
    s = Store(tmp_path / "s", clock=lambda: 1_800_000_000.0)
    judge = Judge(constant(0.1), 0.5, 0.0, 0, s, session_budget=2)
    assert _judge_and_complete(judge, s, 3, "run1", session=run1) == ["review", "review", "auto_accepted"]
    assert s.counter(session_counter(*run1)) == 2
    s.close()
    s = Store(tmp_path / "s", clock=lambda: 1_800_000_000.0)
    again = Judge(constant(0.1), 0.5, 0.0, 0, s, session_budget=2)
    assert again.judge("8" * 64, EMPTY, BUNDLE, session=run1).reasons == ("low_score", "session_reviewed")
    assert again.judge("9" * 64, EMPTY, BUNDLE, session=run2).decision == "review"
    with pytest.raises(ValueError, match="session_budget"):
        Judge(constant(0.1), 0.5, 0.0, 0, s, session_budget=0)
    s.close()


def test_an_audit_is_its_recordings_review(store: Store) -> None:
    # An audit pick goes to review like a doubtful frame, so it spends its recording's cap: with
    # one review per recording and propagation, the audited frame labels the recording.
    run1 = ("cam1", "run1")
    auditor = Judge(constant(0.9), 0.5, 1.0, 0, store, session_budget=1)  # every confident image audited
    assert _judge_and_complete(auditor, store, 2, "a", session=run1) == ["review", "auto_accepted"]
    assert store.counter(session_counter(*run1)) == 1
    doubtful = Judge(constant(0.1), 0.5, 0.0, 0, store, session_budget=1)  # the daemon restarted
    assert doubtful.judge("1" * 64, EMPTY, BUNDLE, session=run1).reasons == ("low_score", "session_reviewed")
    assert doubtful.judge("2" * 64, EMPTY, BUNDLE, session=("cam1", "run2")).decision == "review"


def test_near_duplicates_are_not_all_sent(store: Store) -> None:
    rng = np.random.default_rng(0)
    scene = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    scene = np.kron(scene[::8, ::8], np.ones((8, 8, 1), dtype=np.uint8))  # blocky: robust dHash
    noisy = np.clip(scene.astype(int) + rng.integers(-3, 4, scene.shape), 0, 255).astype(np.uint8)
    other = 255 - scene
    judge = Judge(constant(0.1), 0.5, 0.0, 0, store, dedup=NearDuplicate(max_distance=6))
    first = judge.judge("1" * 64, EMPTY, BUNDLE, camera="cam1", pixels=scene)
    again = judge.judge("2" * 64, EMPTY, BUNDLE, camera="cam1", pixels=noisy)
    other_cam = judge.judge("3" * 64, EMPTY, BUNDLE, camera="cam2", pixels=noisy)
    changed = judge.judge("4" * 64, EMPTY, BUNDLE, camera="cam1", pixels=other)
    no_camera = judge.judge("5" * 64, EMPTY, BUNDLE, camera=None, pixels=scene)
    assert [j.decision for j in (first, again, other_cam, changed, no_camera)] == [
        "review", "auto_accepted", "review", "review", "review"]
    assert "near_duplicate" in again.reasons
    # Back to the first scene after another one went to review: still remembered (memory > 1).
    back = judge.judge("6" * 64, EMPTY, BUNDLE, camera="cam1", pixels=noisy)
    assert back.decision == "auto_accepted" and "near_duplicate" in back.reasons


def test_a_retried_image_is_not_a_near_duplicate_of_itself(store: Store) -> None:
    """A review frame's dHash is remembered when it is judged; judged again (its completion
    failed, or its lease expired and another worker took it over) the image must not match its
    own entry and be waved through as ``near_duplicate`` (audit picks included). A completion
    that never committed takes its frame back out: other frames are not held back by a review
    that did not happen."""
    rng = np.random.default_rng(2)
    scene = np.kron(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8), np.ones((8, 8, 1), dtype=np.uint8))
    near = np.clip(scene.astype(int) + rng.integers(-3, 4, scene.shape), 0, 255).astype(np.uint8)
    judge = Judge(constant(0.1, ["low"]), 0.5, 0.0, 0, store, dedup=NearDuplicate(max_distance=6))
    first = judge.judge("a" * 64, EMPTY, BUNDLE, camera="cam1", pixels=scene)
    assert first.decision == "review"
    retry = judge.judge("a" * 64, EMPTY, BUNDLE, camera="cam1", pixels=scene)  # before the first settled
    assert retry.decision == "review" and retry.reasons == ("low",)
    judge.settle(first, committed=False)  # the first worker lost the lease
    assert judge.judge("b" * 64, EMPTY, BUNDLE, camera="cam1", pixels=near).reasons == ("low", "near_duplicate")
    judge.settle(retry, committed=False)  # no review of the scene committed at all
    assert judge.judge("c" * 64, EMPTY, BUNDLE, camera="cam1", pixels=near).decision == "review"
    auditor = Judge(constant(0.9), 0.5, 1.0, 0, store, dedup=NearDuplicate(max_distance=6))
    picked = auditor.judge("d" * 64, EMPTY, BUNDLE, camera="cam1", pixels=scene)
    auditor.settle(picked)  # settled as committed: the frame stays remembered for the others
    again = auditor.judge("d" * 64, EMPTY, BUNDLE, camera="cam1", pixels=scene)
    assert (again.decision, again.audit, again.reasons) == ("review", True, ("audit",))
    assert auditor.judge("e" * 64, EMPTY, BUNDLE, camera="cam1", pixels=near).reasons == ("audit", "near_duplicate")


def test_near_duplicate_memory_skips_the_image_itself_and_forgets_one_entry() -> None:
    dedup = NearDuplicate(max_distance=6)
    dedup.remember_hash("cam1", 0b1011, "a" * 64)
    assert not dedup.is_near("cam1", 0b1011, "a" * 64) and dedup.hash_distance("cam1", 0b1011, "a" * 64) is None
    assert dedup.is_near("cam1", 0b1011, "b" * 64) and dedup.is_near("cam1", 0b1011)  # no id: compares all
    dedup.remember_hash("cam1", 0b1011, "a" * 64)  # judged twice (two workers)
    dedup.forget_hash("cam1", 0b1011, "a" * 64)  # one of them did not commit
    assert dedup.is_near("cam1", 0b1011, "b" * 64)
    dedup.forget_hash("cam1", 0b1011, "a" * 64)
    dedup.forget_hash("cam1", 0b1011, "a" * 64)  # gone already: nothing happens
    assert not dedup.is_near("cam1", 0b1011, "b" * 64)


def test_near_duplicate_memory_is_per_camera_and_bounded() -> None:
    rng = np.random.default_rng(1)
    scenes = [np.kron(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8), np.ones((8, 8, 1), dtype=np.uint8))
              for _ in range(3)]
    dedup = NearDuplicate(max_distance=6, memory=2)
    assert dedup.distance("cam1", scenes[0]) is None
    for s in scenes:
        dedup.remember("cam1", s)
    assert dedup.distance("cam1", scenes[0]) > 6 and not dedup.is_duplicate("cam1", scenes[0])  # forgotten
    assert dedup.distance("cam1", scenes[1]) == 0 and dedup.distance("cam1", scenes[2]) == 0
    assert dedup.distance("cam2", scenes[2]) is None
    with pytest.raises(ValueError, match="memory"):
        NearDuplicate(memory=0)


def test_near_duplicate_memory_keeps_the_most_recently_used_cameras() -> None:
    """Every camera name ever seen kept its frames for the daemon's life (a drop folder whose first
    folder is a date makes a "camera" per day); now the least recently used go beyond the cap."""
    dedup = NearDuplicate(max_distance=0, memory=2, max_cameras=3)
    for day in range(10):
        dedup.remember_hash(f"2024-01-{day + 1:02d}", day, "a" * 64)
    assert dedup.cameras() == ["2024-01-08", "2024-01-09", "2024-01-10"]
    assert len(dedup._recent) == 3
    assert dedup.is_near("2024-01-08", 7)  # judged: now the most recently used
    dedup.remember_hash("cam-new", 99)
    assert dedup.cameras() == ["2024-01-10", "2024-01-08", "cam-new"]  # 2024-01-09 went first
    assert dedup.hash_distance("2024-01-09", 8) is None
    with pytest.raises(ValueError, match="max_cameras"):
        NearDuplicate(max_cameras=0)


def test_bad_score_values_are_made_safe(store: Store) -> None:
    judge = Judge(constant(float("nan")), 0.5, 0.0, 0, store)
    assert judge.judge("a" * 64, EMPTY, BUNDLE) == Judgement(0.0, ("bad_score",), "review", False)
    assert Judge(constant(7.0), 0.5, 0.0, 0, store).judge("a" * 64, EMPTY, BUNDLE).score == 1.0


def good_fn(prediction: Prediction, bundle: Bundle) -> tuple[float, list[str]]:
    return (0.5 if prediction.persons else 0.9), []


def one_arg(prediction: Prediction) -> tuple[float, list[str]]:
    return 1.0, []


def out_of_range(prediction: Prediction, bundle: Bundle) -> tuple[float, list[str]]:
    return 2.0, []


def raises(prediction: Prediction, bundle: Bundle) -> tuple[float, list[str]]:
    raise RuntimeError("boom")


NOT_CALLABLE = 3


@pytest.mark.parametrize("spec, message", [
    ("no_colon_here", "expected 'package.module:function'"),
    ("no_such_module_xyz:fn", "cannot import module"),
    (f"{__name__}:missing", "has no attribute"),
    (f"{__name__}:NOT_CALLABLE", "is not callable"),
    (f"{__name__}:one_arg", "must accept (prediction, bundle)"),
    (f"{__name__}:out_of_range", "must return (score in [0, 1]"),
    (f"{__name__}:raises", "failed on an empty prediction"),
])
def test_load_score_fn_errors(spec: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_score_fn(spec)
    assert "judge.score_fn" in str(info.value) and message in str(info.value)


def test_load_score_fn_good() -> None:
    assert sys.modules[__name__] is not None
    assert load_score_fn(f"{__name__}:good_fn") is good_fn
    assert load_score_fn("default") is default_score


def test_review_share_admits_the_most_doubtful_share_of_a_stream() -> None:
    rng = np.random.default_rng(0)
    share = ReviewShare(0.05, window=500)
    keys = [rank_key(s, d) for s, d in zip(rng.uniform(0, 1, 4000), rng.uniform(0, 3, 4000))]
    admitted = [k for k in keys if share.admit(k)]
    assert len(share) == 500  # the window keeps the last 500
    assert 0.035 * 4000 <= len(admitted) <= 0.075 * 4000
    low = sorted(keys)[int(0.10 * len(keys))]
    assert sum(k <= low for k in admitted) >= 0.9 * len(admitted)  # from the most doubtful tenth
    with pytest.raises(ValueError, match="share"):
        ReviewShare(0.0)


def test_review_share_ranks_a_tie_at_zero_by_total_doubt() -> None:
    """On a weak bundle many images score 0: the total doubt of their components decides."""
    share = ReviewShare(0.1, window=100)
    for d in np.linspace(0, 3, 99):  # the window before: 99 images at score 0
        share.remember(rank_key(0.0, float(d)))
    assert share.admit(rank_key(0.0, 3.5)) and not share.admit(rank_key(0.0, 1.0))
    assert not share.admit(rank_key(0.01, 10.0))  # any score above 0 ranks after every 0


def test_review_share_ranks_only_candidates() -> None:
    """Images that cannot be sent (confident, near duplicates, a capped recording) count in the
    stream but take no rank: a share is a share of the arriving images that go to review."""
    share = ReviewShare(0.1, window=100)
    for _ in range(60):  # held back, all more doubtful than what follows
        share.remember(rank_key(0.0, 5.0), candidate=False)
    for s in np.linspace(0.1, 0.9, 39):
        share.remember(rank_key(float(s), 0.0))
    assert not share.admit(rank_key(0.0, 9.0), candidate=False)  # never admits a non-candidate
    assert share.admit(rank_key(0.2, 0.0))  # 3 candidates before it, 10 ranks in a window of 100
    assert not share.admit(rank_key(0.3, 0.0))  # 11 candidates before it
    assert len(share) == 100


def test_held_back_frames_do_not_outrank_others(store: Store) -> None:
    """A recording's near duplicates and its frames after the cap are no candidates: the next
    recording's doubtful frame is still sent (ranked among every frame it was outranked)."""
    rng = np.random.default_rng(1)
    scene = np.kron(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8), np.ones((8, 8, 1), dtype=np.uint8))
    other = 255 - scene
    scores = iter([0.0] * 12 + [0.2])
    judge = Judge(lambda p, b: (next(scores), []), 0.5, 0.0, 0, store, dedup=NearDuplicate(max_distance=6),
                  session_budget=1, share=ReviewShare(0.1, window=100))
    for s in np.linspace(0.6, 1.0, 88):  # confident frames before
        judge.share.remember(rank_key(float(s), 0.0), candidate=False)  # type: ignore[union-attr]
    verdicts = [judge.judge(f"{i:064d}", EMPTY, BUNDLE, camera="cam1", pixels=scene, session=("cam1", "r1"))
                for i in range(6)]
    verdicts += [judge.judge(f"{i + 6:064d}", EMPTY, BUNDLE, camera="cam1", pixels=other if i % 2 else scene,
                             session=("cam1", "r1")) for i in range(6)]
    assert verdicts[0].decision == "review"
    held = [v.reasons[-1] for v in verdicts[1:]]
    assert set(held) == {"near_duplicate", "session_reviewed"} and "outranked" not in held
    nxt = judge.judge("f" * 64, EMPTY, BUNDLE, camera="cam1", pixels=other, session=("cam1", "r2"))
    assert nxt.decision == "review"  # 12 frames at score 0 came before it, 1 candidate among them


def test_judge_with_review_share(store: Store) -> None:
    scores = iter([0.05, 0.3, 0.9, 0.02])
    judge = Judge(lambda p, b: (next(scores), []), threshold=0.5, audit_fraction=0.0, seed=0, store=store,
                  share=ReviewShare(0.1, window=100))
    for s in np.linspace(0, 1, 100):  # what came before, evenly spread
        judge.share.remember(rank_key(float(s), 0.0))  # type: ignore[union-attr]
    first = judge.judge("1" * 64, EMPTY, BUNDLE)
    assert first.decision == "review" and first.to_json()["doubt"] == 0.0  # a plugged-in score: no tie-break
    second = judge.judge("2" * 64, EMPTY, BUNDLE)  # under the threshold, but 30 images were more doubtful
    assert second.decision == "auto_accepted" and second.reasons == ("low_score", "outranked")
    third = judge.judge("3" * 64, EMPTY, BUNDLE)
    assert third.decision == "auto_accepted" and "outranked" not in third.reasons  # above the threshold
    audit = Judge(constant(0.9), 0.5, 1.0, 0, store, share=ReviewShare(0.1, window=100))
    for s in np.linspace(0, 1, 100):
        audit.share.remember(rank_key(float(s), 0.0))  # type: ignore[union-attr]
    assert audit.judge("4" * 64, EMPTY, BUNDLE).decision == "review"  # audits are exempt from the share
    assert "doubt" not in Judge(constant(0.2), 0.5, 0.0, 0, store).judge("5" * 64, EMPTY, BUNDLE).to_json()


def test_default_judge_ranks_ties_by_the_components_doubt(store: Store) -> None:
    from service.scoring import total_doubt

    judge = Judge(default_score, 0.5, 0.0, 0, store, share=ReviewShare(0.5, window=10))
    pred = Prediction(640, 480, (HEAD,), (person(main=0.7, vis=0.65),))
    verdict = judge.judge("6" * 64, pred, BUNDLE)
    assert verdict.doubt == pytest.approx(total_doubt(pred, BUNDLE)) and verdict.doubt > 0
