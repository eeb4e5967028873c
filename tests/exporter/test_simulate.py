"""``annotator simulate --quick``: the benchmark's outputs and the strategies' selections."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest

from exporter.simulate_report import needed, paired_gains, training_noise
from exporter.simulate_select import PoolScore, audit_picks, diverse_take, kmeans, pool_features, round_rule, select


def _score(name: str, camera: str, score: float, dh: int) -> PoolScore:
    return PoolScore(name, name * 4, camera, score, 1 - score, score, dh, ())


@pytest.mark.parametrize("x,y,target,want", [
    ([0, 10, 20], [0.1, 0.3, 0.5], 0.5, 20.0),
    ([0, 10, 20], [0.1, 0.3, 0.5], 0.2, 5.0),
    ([0, 10, 20], [0.1, 0.3, 0.5], 0.05, 0.0),
    ([0, 10, 20], [0.1, 0.3, 0.5], 0.6, None),
    ([], [], 0.5, None),
])
def test_needed_interpolates(x: list[float], y: list[float], target: float, want: float | None) -> None:
    assert needed(x, y, target) == (want if want is None else pytest.approx(want))


def test_paired_gains_cancel_the_seeds_spread() -> None:
    def st(seed: int, strategy: str, r: int, v: float) -> dict:
        return {"seed": seed, "strategy": strategy, "round": r, "n_reviewed": 40 * r,
                "metrics": {"head_map50": v, "oks_ap50": v, "visibility_acc": v}}
    states = [st(0, "random", 1, 0.5), st(1, "random", 1, 0.8), st(0, "judge", 1, 0.52), st(1, "judge", 1, 0.79),
              st(0, "random", 2, 0.6), st(0, "judge", 2, 0.7)]
    got = paired_gains(states, ["judge", "random"])
    assert list(got) == ["judge"]
    assert got["judge"][0] == {"round": 1, "reviewed": 40, "per_seed": [0.02, -0.01], "mean": 0.005}
    assert got["judge"][1]["per_seed"] == [0.1] and got["judge"][1]["reviewed"] == 80


def test_a_rule_that_runs_out_of_candidates_is_read_at_the_reviews_it_sent() -> None:
    from exporter.simulate_report import curves, label_saving, table_lines

    def st(seed: int, strategy: str, r: int, n: int, v: float) -> dict:
        return {"seed": seed, "strategy": strategy, "round": r, "n_reviewed": n,
                "metrics": {"head_map50": v, "oks_ap50": v, "visibility_acc": v}}
    states = [st(k, "initial", 0, 0, 0.5) for k in (0, 1)]
    states += [st(k, "random", r, 40 * r, 0.5 + 0.1 * r) for k in (0, 1) for r in (1, 2)]
    # one review per recording: 40, then only 8 / 12 recordings left
    states += [st(0, "capped", 1, 40, 0.65), st(1, "capped", 1, 40, 0.65), st(0, "capped", 2, 48, 0.75),
               st(1, "capped", 2, 52, 0.75)]
    cur = curves(states, ["random", "capped"])
    assert cur["capped"]["x"] == [0, 40, 50] and cur["random"]["x"] == [0, 40, 80]
    sav = label_saving(cur)
    assert sav["budget"] == 80 and sav["strategies"]["capped"]["mean3"]["reviewed"] == pytest.approx(45)
    results = {"curves": cur, "label_saving": sav, "paired_gains": paired_gains(states, ["random", "capped"])}
    text = "\n".join(table_lines(results, notes=False))
    assert "| capped | +0.050 (+0.050, +0.050) | +0.050 (+0.050, +0.050) with 50 reviews |" in text
    assert "| strategy | 40 reviewed | 80 reviewed |" in text and "| capped | 50 |" in text


def test_training_noise_pools_the_repeats_variance() -> None:
    def st(seed: int, each: list[float]) -> dict:
        return {"seed": seed, "strategy": "judge", "round": 1,
                "metrics_each": [{"head_map50": v, "oks_ap50": v, "visibility_acc": v} for v in each]}
    assert training_noise([st(0, [0.5]), {"seed": 1, "strategy": "random", "round": 1}]) is None
    got = training_noise([st(0, [0.50, 0.52, 0.54]), st(1, [0.60, 0.60, 0.60]), st(1, [0.7])])
    # variances 0.0004 and 0: pooled sd 0.01414; two seeds, three trainings: x sqrt(2 / 6)
    assert got == {"units": 2, "trainings": 3, "sd": 0.0141, "sd_gain": 0.0082}


def test_diverse_take_caps_cameras_and_skips_near_duplicates() -> None:
    ranked = [_score("a", "mirror", 0.0, 0), _score("b", "mirror", 0.0, 1), _score("c", "mirror", 0.1, 2**40 - 1),
              _score("d", "overhead", 0.2, 5), _score("e", "mirror", 0.3, 2**63 - 1)]
    got = [s.file_name for s in diverse_take(ranked, 2)]
    assert got == ["a", "d"]  # b is a's near duplicate; c is over the mirror cap of 1
    assert [s.file_name for s in diverse_take(ranked, 5)] == ["a", "c", "d", "e", "b"]
    assert diverse_take([], 3) == []
    # An image reviewed in an earlier round counts like a pick: its near duplicate b waits.
    got = [s.file_name for s in diverse_take(ranked[1:], 2, camera_share=1.0, seen=[ranked[0]])]
    assert got == ["c", "d"]


def test_select_strategies_on_fixed_scores() -> None:
    scores = {f"im{i}": _score(f"im{i}", ("mirror", "overhead")[i % 2], i / 20, i * 2**20) for i in range(20)}
    names = sorted(scores)
    rng = np.random.default_rng(0)
    judge = select("judge", names, scores, 4, rng, 0, 0.1)
    assert judge == ["im0", "im1", "im2", "im3"]
    audit = select("judge_audit", names, scores, 10, rng, 3, 0.2)
    assert set(s.file_name for s in audit_picks(list(scores.values()), 2, 3)) <= set(audit)
    assert len(audit) == len(set(audit)) == 10
    with pytest.raises(ValueError):
        select("judge", names, None, 4, rng, 0, 0.1)


def test_power_and_middle_variants_of_the_judge() -> None:
    # 20 images, one camera each (no cap binds), far-apart dHashes; im0 most doubtful (doubt 1 - score).
    scores = {f"im{i:02d}": _score(f"im{i:02d}", f"camera{i}", i / 20, i * 2**20) for i in range(20)}
    names = sorted(scores)
    power = [tuple(select("judge_power", names, scores, 4, np.random.default_rng(s), 0, 0.1)) for s in range(200)]
    assert power[0] == tuple(select("judge_power", names, scores, 4, np.random.default_rng(0), 0, 0.1))  # seeded
    assert len(set(power)) > 50 and all(len(set(p)) == 4 for p in power)  # a sample, no repeats within a batch
    counts = {n: sum(n in p for p in power) for n in names}
    assert counts["im00"] > 2 * counts["im19"] > 0  # doubt 1.0 vs 0.05: picked far more often, not always
    # judge_middle: the most doubtful quarter (5 of 20) waits; the judge's order after it.
    assert select("judge_middle", names, scores, 4, np.random.default_rng(0), 0, 0.1) == ["im05", "im06", "im07", "im08"]
    # When the batch needs them, the skipped images come last (4 of 4: im00 waited).
    assert select("judge_middle", names[:4], scores, 4, np.random.default_rng(0), 0, 0.1) == [*names[1:4], "im00"]


def test_streamed_rules_replay_the_daemons_decisions_in_capture_order() -> None:
    rng = np.random.default_rng(0)
    # 40 frames in capture order, scores falling along the stream; frames 2k and 2k+1 are near
    # duplicates (the same dHash), pairs lie about 31 bits apart.
    pair_hash = [int(np.random.default_rng(k).integers(0, 2**62)) for k in range(20)]
    scores = {f"im{i:02d}": _score(f"im{i:02d}", "mirror", (39.5 - i) / 40, pair_hash[i // 2]) for i in range(40)}
    names = sorted(scores, reverse=True)  # the candidates' order does not matter: capture order does
    # a budget of 4: the first four non-duplicate frames under the threshold, whatever comes later
    assert select("judge_fcfs", names, scores, 4, rng, 0, 0.1, threshold=0.5) == ["im20", "im22", "im24", "im26"]
    # a reviewed image's near duplicate is not sent again (the daemon's memory, recalled)
    assert select("judge_fcfs", names, scores, 2, rng, 0, 0.1, reviewed=["im21"], threshold=0.5) == ["im22", "im24"]
    # 400 frames, doubt spread at random along the stream: the share sends the most doubtful of
    # what it has seen, spread over the whole stream; the budget the first 20 frames.
    n = 400
    rank = np.random.default_rng(3).permutation(n)  # 0 = the most doubtful frame
    scores = {f"im{i:03d}": _score(f"im{i:03d}", "mirror", rank[i] / n, int(np.random.default_rng(100 + i).integers(0, 2**62)))
              for i in range(n)}
    names = sorted(scores)
    assert select("judge_fcfs", names, scores, 20, rng, 0, 0.1, threshold=1.0) == names[:20]
    stream = select("judge_stream", names, scores, 20, rng, 0, 0.1, threshold=1.0)
    assert len(set(stream)) == 20 and sum(rank[int(f[2:])] < 25 for f in stream) >= 16
    # one review per recording (10 frames each; a reviewed recording is taken for good)
    recording = {f: float(i // 10) for i, f in enumerate(names)}
    capped = select("judge_stream_session", names, scores, 20, rng, 0, 0.1, oracle=recording,
                    reviewed=names[:5], threshold=1.0)
    assert len(capped) == 20 and len({recording[f] for f in capped}) == 20 and recording[names[0]] not in \
        {recording[f] for f in capped}
    with pytest.raises(ValueError, match="recordings"):
        select("judge_stream_session", names, scores, 20, rng, 0, 0.1, threshold=1.0)


def test_streamed_share_ranks_only_frames_that_can_be_sent() -> None:
    """As the daemon: near duplicates of a reviewed frame (score 0) count in the share's window
    but take no rank, so the next doubtful frame of another scene is sent."""
    from exporter.simulate_select import stream_take

    dup = _score("a00", "mirror", 0.0, 12345)
    stream = [_score(f"a{i:02d}", "mirror", 0.0, 12345) for i in range(1, 10)]
    stream += [_score("b00", "mirror", 0.3, 2**40 + 99), _score("b01", "mirror", 0.35, 2**62 - 1),
               _score("b02", "mirror", 0.4, 2**61 - 1)]
    sent = stream_take(stream, 10, 0.5, seen=[dup], share=0.1)
    # 10, 11, 12 frames in the window: 1.0, 1.1, 1.2 ranks; b02 has two candidates before it
    assert [s.file_name for s in sent] == ["b00", "b01"]


def test_schedules_pick_by_round() -> None:
    assert [round_rule("random_then_judge", r) for r in (1, 2, 3)] == ["random", "judge", "judge"]
    assert [round_rule("judge", r) for r in (1, 2)] == ["judge", "judge"]


def test_oracle_strategies_follow_their_key() -> None:
    scores = {f"im{i}": _score(f"im{i}", f"camera{i}", i / 20, i * 2**20) for i in range(20)}  # no cap binds
    names = sorted(scores)
    errors = {n: (0.9 if n in ("im5", "im11", "im17") else 0.1 + i / 100) for i, n in enumerate(names)}
    got = select("oracle_error", names, scores, 4, np.random.default_rng(0), 0, 0.1, oracle=errors)
    assert got[:3] == ["im11", "im17", "im5"] and got[3] == names[-1]  # ties by file name, then the next worst
    shifted = {n: float(n in ("im2", "im4", "im6", "im8")) for n in names}
    picks = [select("oracle_shift", names, scores, 4, np.random.default_rng(s), 0, 0.1, oracle=shifted) for s in range(6)]
    assert all(set(p) == {"im2", "im4", "im6", "im8"} for p in picks)  # all four, though one camera
    assert len({tuple(p) for p in picks}) > 1  # in seeded random order
    with pytest.raises(ValueError, match="oracle"):
        select("oracle_error", names, scores, 4, np.random.default_rng(0), 0, 0.1)
    # oracle_scene: the judge's ranking (score ascending), one image per scene; a scene reviewed
    # earlier counts as seen. Frames of one scene have far-apart dHashes here: only the tags know.
    scene = {n: float(i // 3) for i, n in enumerate(f"im{i}" for i in range(20))}  # scenes of 3 frames
    got = select("oracle_scene", names, scores, 4, np.random.default_rng(0), 0, 0.1, oracle=scene)
    assert got == ["im0", "im3", "im6", "im9"]
    got = select("oracle_scene", names, scores, 4, np.random.default_rng(0), 0, 0.1, oracle=scene, reviewed=["im4"])
    assert got == ["im0", "im6", "im9", "im12"]
    assert select("judge", names, scores, 4, np.random.default_rng(0), 0, 0.1) == ["im0", "im1", "im2", "im3"]


def test_typiclust_takes_the_typical_image_of_each_uncovered_cluster() -> None:
    # Four tight blobs of 10 points (one point of each blob off-centre); blob 0 already reviewed twice.
    rng = np.random.default_rng(3)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    feats: dict[str, np.ndarray] = {}
    for b, c in enumerate(centres):
        for i in range(10):
            feats[f"b{b}_{i}"] = c + (np.array([0.0, 0.0]) if i == 0 else rng.normal(0, 0.3 if i < 9 else 1.5, 2))
    labels = kmeans(np.stack(list(feats.values())), 4, np.random.default_rng(0))
    assert len(set(labels.tolist())) == 4 and all(len(set(labels[b * 10:(b + 1) * 10].tolist())) == 1 for b in range(4))
    reviewed = ["b0_3", "b0_4"]
    cands = [n for n in feats if n not in reviewed]
    got = select("typiclust", cands, None, 3, np.random.default_rng(1), 0, 0.1, reviewed=reviewed, features=feats)
    assert {g.split("_")[0] for g in got} == {"b1", "b2", "b3"}  # the uncovered blobs first, one each
    assert all(not g.endswith("_9") for g in got)  # the off-centre points are the least typical
    more = select("typiclust", cands, None, 8, np.random.default_rng(1), 0, 0.1, reviewed=reviewed, features=feats)
    assert len(more) == len(set(more)) == 8 and set(more) <= set(cands)
    with pytest.raises(ValueError, match="features"):
        select("typiclust", cands, None, 3, np.random.default_rng(1), 0, 0.1)
    # typiclust_judge: the same clusters, in each the image the judge doubts most (lowest score).
    scores = {n: _score(n, "mirror", 0.1 if n.endswith("_1") else 0.8, i * 2**20) for i, n in enumerate(feats)}
    got = select("typiclust_judge", cands, scores, 3, np.random.default_rng(1), 0, 0.1, reviewed=reviewed, features=feats)
    assert sorted(got) == ["b1_1", "b2_1", "b3_1"]


def test_pool_features_embed_real_images_and_cache(tmp_path: Path) -> None:
    import cv2

    images = tmp_path / "images"
    images.mkdir()
    infos = []
    for i in range(6):
        img = np.full((48, 64, 3), 30 if i < 3 else 220, np.uint8)
        img[:, : 8 * (i + 1)] = 120
        cv2.imwrite(str(images / f"im{i}.png"), img)
        infos.append({"id": i, "file_name": f"im{i}.png"})
    feats = pool_features({"images": infos}, images, tmp_path / "features.json")
    assert set(feats) == {f"im{i}.png" for i in range(6)} and feats["im0.png"].shape == (6,)  # rank <= pool size
    dark, bright = [feats[f"im{i}.png"] for i in range(3)], [feats[f"im{i}.png"] for i in range(3, 6)]
    assert np.linalg.norm(dark[0] - dark[1]) < np.linalg.norm(dark[0] - bright[0])
    again = pool_features({"images": infos}, images, tmp_path / "features.json")
    assert all(np.allclose(again[k], v, atol=1e-5) for k, v in feats.items())


@pytest.mark.slow
def test_initial_picks_source_domain_and_validation(tmp_path: Path) -> None:
    from exporter.simulate import SimConfig, initial_picks

    tags = [{"camera": c, "ir": ir} for c in ("mirror", "roof", "a_pillar", "dashboard") for ir in (False, True)]
    tags += [{"camera": "overhead", "ir": False}]  # the other new camera is not the source domain either
    coco = {"images": [{"file_name": f"im{i}.jpg", "tags": t} for i, t in enumerate(tags * 3)]}
    cfg = SimConfig(out=tmp_path, initial=6, pool=24, rounds=1, per_round=4)
    picks = initial_picks(cfg, coco, seed=0)
    by_name = {im["file_name"]: im["tags"] for im in coco["images"]}
    assert len(picks) == 6 and all(not by_name[n]["ir"] and by_name[n]["camera"] not in ("roof", "overhead")
                                   for n in picks)
    assert picks == initial_picks(cfg, coco, seed=0) != initial_picks(cfg, coco, seed=1)
    mixed = initial_picks(SimConfig(out=tmp_path, initial=20, pool=24, rounds=1, per_round=4, initial_domain="pool"),
                          coco, seed=0)
    assert len(mixed) == 20 and any(by_name[n]["ir"] for n in mixed)
    assert any(by_name[n]["camera"] == "roof" for n in mixed)
    with pytest.raises(ValueError, match="only 9 source-domain images"):
        initial_picks(SimConfig(out=tmp_path, initial=10, pool=24, rounds=1, per_round=4), coco, seed=0)
    with pytest.raises(ValueError, match="--initial-domain"):
        SimConfig(out=tmp_path, initial_domain="night")


def test_training_set_is_the_products_merged_dataset(tmp_path: Path) -> None:
    """Reviewed images keep their ground truth; every other pool image comes with its auto label
    (the first bundle's record, outside points 0, 0, 0) and origin "auto"; ids stay unique."""
    from exporter.mix import image_origins
    from exporter.simulate import SimConfig, training_set

    kp = {"x": 5.0, "y": 6.0, "main_conf": 0.9, "visible_conf": 0.8}
    person = {"box": [1, 2, 11, 22], "conf": 0.7, "keypoints": [{**kp, "visibility": "visible"},
                                                                 {**kp, "visibility": "outside"}]}
    coco = {"images": [{"id": i, "file_name": f"im{i}.jpg", "width": 32, "height": 32} for i in (1, 2, 3)],
            "annotations": [{"id": 10 + i, "image_id": i, "category_id": 1, "bbox": [0, 0, 4, 4]} for i in (1, 2, 3)],
            "categories": [{"id": 1, "name": "person", "keypoints": ["a", "b"]}, {"id": 2, "name": "head"}]}
    auto = {f"im{i}.jpg": {"width": 32, "height": 32, "persons": [person], "heads": [{"box": [2, 2, 6, 7], "conf": 0.5}]}
            for i in (1, 2, 3)}
    merged = training_set(coco, ["im2.jpg"], auto)
    assert image_origins(merged) == {2: "reviewed", 1: "auto", 3: "auto"}
    by_image: dict[int, list] = {}
    for a in merged["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    assert by_image[2] == [coco["annotations"][1]]  # the ground truth, not the auto label
    for i in (1, 3):
        p, h = by_image[i]
        assert p["keypoints"] == [5.0, 6.0, 2, 0, 0, 0] and p["bbox"] == [1.0, 2.0, 10.0, 20.0]
        assert h["category_id"] == 2 and h["bbox"] == [2.0, 2.0, 4.0, 5.0]
    ids = [a["id"] for a in merged["annotations"]]
    assert len(set(ids)) == len(ids)
    assert training_set(coco, ["im2.jpg"], None)["images"] == [{**coco["images"][1], "origin": "reviewed"}]
    assert SimConfig(out=tmp_path).auto_weight == 0.25
    with pytest.raises(ValueError, match="--auto-weight"):
        SimConfig(out=tmp_path, auto_weight=-1)


def test_training_set_propagates_a_reviewed_frame_to_its_sequence(tmp_path: Path) -> None:
    """``--propagate BITS``: an auto image of a reviewed frame's capture sequence within BITS
    dHash bits takes the reviewed frame's ground truth (still origin "auto"); the nearest frame
    in the sequence wins, the earlier on a tie; other sequences and far frames keep their auto label."""
    from exporter.mix import image_origins, propagated_images
    from exporter.simulate import SimConfig, training_set

    tags = [("cam", 1, 0), ("cam", 1, 1), ("cam", 1, 3), ("cam", 1, 4), ("cam", 1, 6), ("cam", 2, 1), ("cam", 1, 9)]
    coco = {"images": [{"id": i, "file_name": f"im{i}.jpg", "width": 32, "height": 32,
                        "tags": {"camera": c, "scene": sc, "frame": fr}} for i, (c, sc, fr) in enumerate(tags, 1)],
            "annotations": [{"id": 10 + i, "image_id": i, "category_id": 2, "bbox": [i, 0, 4, 4]} for i in range(1, 8)],
            "categories": [{"id": 1, "name": "person", "keypoints": []}, {"id": 2, "name": "head"}]}
    auto = {f"im{i}.jpg": {"width": 32, "height": 32, "persons": [], "heads": [{"box": [20, 20, 24, 24], "conf": 0.5}]}
            for i in range(1, 8)}
    dh = {f"im{i}.jpg": 0 for i in range(1, 7)} | {"im7.jpg": 0xFFFF}  # im7: 16 bits from the others

    def heads(merged: dict) -> dict[int, list]:
        return {im["id"]: [a["bbox"] for a in merged["annotations"] if a["image_id"] == im["id"]]
                for im in merged["images"]}

    plain = heads(training_set(coco, ["im1.jpg", "im5.jpg"], auto))
    merged = training_set(coco, ["im1.jpg", "im5.jpg"], auto, propagate=10, dhashes=dh)
    got = heads(merged)
    assert image_origins(merged) == {1: "reviewed", 5: "reviewed", 2: "auto", 3: "auto", 4: "auto", 6: "auto", 7: "auto"}
    assert got[2] == [[1, 0, 4, 4]]                      # frame 1: nearest reviewed frame 0
    assert got[3] == [[1, 0, 4, 4]]                      # frame 3: frames 0 and 6 are 3 away: the earlier
    assert got[4] == [[5, 0, 4, 4]]                      # frame 4: nearest reviewed frame 6
    assert got[6] == plain[6] == [[20.0, 20.0, 4.0, 4.0]]  # another sequence
    assert got[7] == plain[7]                            # 16 bits away
    assert heads(training_set(coco, ["im1.jpg", "im5.jpg"], auto, propagate=64, dhashes=dh))[7] == [[5, 0, 4, 4]]
    ids = [a["id"] for a in merged["annotations"]]
    assert len(set(ids)) == len(ids)
    # the provenance the product's export writes, so that --propagated-weight finds them
    assert propagated_images(merged) == {2, 3, 4}
    assert {a["provenance"].get("propagated_from") for a in merged["annotations"] if a["image_id"] == 4} == {"im5.jpg"}
    assert SimConfig(out=tmp_path).propagate == -1 and SimConfig(out=tmp_path).propagated_weight == 1
    with pytest.raises(ValueError, match="--propagate"):
        SimConfig(out=tmp_path, propagate=65)
    with pytest.raises(ValueError, match="--propagated-weight"):
        SimConfig(out=tmp_path, propagated_weight=-0.5)


def test_trusted_auto_keeps_the_most_sure_share(tmp_path: Path) -> None:
    from exporter.simulate import SimConfig, trusted_auto, training_set

    names = [f"im{i}.jpg" for i in range(1, 5)]
    auto = {n: {"persons": [], "heads": []} for n in names}
    scores = {n: _score(n, "mirror", s, 0) for n, s in zip(names, (0.9, 0.1, 0.5, 0.9))}
    assert set(trusted_auto(auto, scores, 0.5)) == {"im1.jpg", "im4.jpg"}  # the two highest default_scores
    assert set(trusted_auto(auto, scores, 0.75)) == {"im1.jpg", "im3.jpg", "im4.jpg"}
    assert trusted_auto(auto, scores, 1.0) == auto
    coco = {"images": [{"id": i, "file_name": n} for i, n in enumerate(names, 1)], "annotations": [],
            "categories": []}
    merged = training_set(coco, ["im2.jpg"], trusted_auto(auto, scores, 0.5))
    assert {im["file_name"]: im["origin"] for im in merged["images"]} == {
        "im2.jpg": "reviewed", "im1.jpg": "auto", "im4.jpg": "auto"}  # the doubtful im3 trains on nothing
    assert SimConfig(out=tmp_path).auto_trusted == 1.0
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="--auto-trusted"):
            SimConfig(out=tmp_path, auto_trusted=bad)


def test_shift_share_scales_the_pools_shift_only(tmp_path: Path) -> None:
    from exporter.simulate import SimConfig, pool_cameras

    # the first benchmark runs' mix, unchanged (their rendered data stays valid)
    assert pool_cameras(1.0) == (("mirror", 0.45), ("a_pillar", 0.25), ("dashboard", 0.15),
                                             ("overhead", pytest.approx(0.15)))
    assert dict(pool_cameras(1.0, "roof")) == pytest.approx({"mirror": 0.45, "a_pillar": 0.25, "dashboard": 0.15,
                                                            "roof": 0.15})
    rare = dict(pool_cameras(0.3, "roof"))
    assert sum(rare.values()) == pytest.approx(1.0) and rare["roof"] == pytest.approx(0.045)
    assert rare["mirror"] / rare["a_pillar"] == pytest.approx(0.45 / 0.25)  # the others keep their proportions
    for bad in (0.0, 2.5):
        with pytest.raises(ValueError, match="--shift-share"):
            SimConfig(out=tmp_path, shift_share=bad)
    with pytest.raises(ValueError, match="--shift-camera"):
        SimConfig(out=tmp_path, shift_camera="dashboard")
    with pytest.raises(ValueError, match="--lengths"):
        SimConfig(out=tmp_path, lengths="zipf")
    with pytest.raises(ValueError, match="--frames >= 2"):
        SimConfig(out=tmp_path, lengths="varied", frames=1)


def test_quick_benchmark(tmp_path: Path, ultralytics_offline: Path) -> None:
    pytest.importorskip("ultralytics")
    from exporter.simulate import SimConfig, run
    from exporter.simulate_select import STRATEGIES

    cfg = SimConfig(out=tmp_path / "sim").quick()
    results = run(cfg)
    out = cfg.out
    for name in ("results.json", "results.md", "accuracy.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["curves"]) == set(STRATEGIES) and saved["bar"]["limit"] == 0.5
    for c in saved["curves"].values():
        assert c["x"] == [0, cfg.per_round]
        for m in ("head_map50", "oks_ap50", "visibility_acc"):
            assert len(c[m]["mean"]) == 2 and all(0.0 <= v <= 1.0 for v in c[m]["mean"])
    assert set(saved["label_saving"]["strategies"]) == set(STRATEGIES)
    assert "| judge |" in (out / "results.md").read_text()
    assert "One training per unit" in (out / "results.md").read_text()  # the noise warning without --repeats
    assert results["bar"] == saved["bar"]

    root = out / "runs" / "seed0"
    picks = {s: json.loads((root / s / "round1" / "state.json").read_text())["selected"] for s in STRATEGIES}
    initial = json.loads((root / "initial" / "state.json").read_text())["labelled"]
    assert all(len(p) == cfg.per_round and not set(p) & set(initial) for p in picks.values())
    tags = {im["file_name"]: im["tags"] for im in json.loads(
        (out / "data" / f"pool_s0_{cfg.pool}_f2m{cfg.motion:g}" / "annotations.json").read_text())["images"]}
    assert all(not tags[n]["ir"] and tags[n]["camera"] != "overhead" for n in initial)  # the default shift
    assert {tags[n]["frame"] for n in tags} == {0, 1}  # the pool is capture sequences (2 frames in --quick)
    for s in STRATEGIES:  # new scenes: scenes of the round's picks that no earlier review showed
        comp = json.loads((root / s / "round1" / "state.json").read_text())["composition"]
        want = {tags[n]["scene"] for n in picks[s]} - {tags[n]["scene"] for n in initial}
        assert comp["scenes"] == len(want)
    assert picks["random"] != picks["judge"]
    # The rounds train on the product's merged dataset: the reviewed images with their ground
    # truth, every other pool image with the first bundle's auto label, at the auto weight; the
    # validation split (checkpoints, thresholds) holds reviewed images only.
    from exporter.mix import image_origins

    merged = json.loads((root / "judge" / "round1" / "labelled.json").read_text())
    origins = image_origins(merged)
    origin = {im["file_name"]: origins[im["id"]] for im in merged["images"]}
    assert len(origin) == cfg.pool
    assert {n for n, o in origin.items() if o == "reviewed"} == set(initial) | set(picks["judge"])
    records = json.loads((root / "initial" / "pool_records.json").read_text())["records"]
    assert set(records) == set(origin) and any(r["persons"] for r in records.values())
    mix = json.loads((root / "judge" / "round1" / "bundle" / "bundle.json").read_text())["lineage"]["dataset"]["mix"]
    assert mix["auto_weight"] == cfg.auto_weight and mix["validation_from"] == "reviewed"
    assert mix["images"] == {"reviewed": cfg.initial + cfg.per_round, "auto": cfg.pool - cfg.initial - cfg.per_round}
    pool = {d["file_name"]: d for d in json.loads((root / "initial" / "pool_scores.json").read_text())["scores"]}
    candidates = [n for n in pool if n not in set(initial)]
    median = statistics.median(pool[n]["score"] for n in candidates)
    assert statistics.median(pool[n]["score"] for n in picks["judge"]) <= median
    # Every pool image's score, the reviewed ones' too, as the benchmark passes them: the judge
    # skips near duplicates of the frames reviewed before, found by their dHash in these scores.
    ps = {n: PoolScore(**{**d, "reasons": tuple(d["reasons"])}) for n, d in pool.items()}
    assert select("judge", candidates, ps, cfg.per_round, np.random.default_rng(0), 0, cfg.audit_fraction,
                  reviewed=initial) == picks["judge"]  # the picks follow the cached scores, reproducibly
    # The audit strategy holds the seeded audit picks: the candidates with the lowest audit draw.
    as_scores = [ps[n] for n in candidates]
    n_audit = max(1, round(cfg.audit_fraction * cfg.per_round))
    assert {s.file_name for s in audit_picks(as_scores, n_audit, 0)} <= set(picks["judge_audit"])
    # oracle_error's key agrees with the evaluation: the point-weighted mean of the per-image
    # error shares is one minus the visibility accuracy `annotator evaluate` reports on the pool.
    from exporter.evaluate import evaluate
    from exporter.simulate_select import pool_errors

    pool_dir = out / "data" / f"pool_s0_{cfg.pool}_f2m{cfg.motion:g}"
    coco = json.loads((pool_dir / "annotations.json").read_text())
    errors = pool_errors(root / "initial" / "bundle", coco, pool_dir / "images", tmp_path / "errors.json")
    assert set(errors) == set(tags) and all(0.0 <= e <= 1.0 for e in errors.values())
    person = next(c for c in coco["categories"] if c["name"] == "person")
    k = len(person["keypoints"])
    points = {im["id"]: 0 for im in coco["images"]}
    for a in coco["annotations"]:
        if a["category_id"] == person["id"] and a.get("num_keypoints", 0) > 0 and not a.get("iscrowd", 0):
            points[a["image_id"]] += k
    by_name = {im["file_name"]: points[im["id"]] for im in coco["images"]}
    metrics = evaluate(root / "initial" / "bundle", pool_dir / "annotations.json", pool_dir / "images",
                       tmp_path / "pool-eval", progress=False)
    wrong = sum(errors[n] * by_name[n] for n in by_name) / sum(by_name.values())
    assert wrong == pytest.approx(1.0 - metrics["visibility"]["accuracy"], abs=1e-9)
    assert pool_errors(root / "initial" / "bundle", coco, pool_dir / "images", tmp_path / "errors.json") == errors

    # A re-run resumes: every unit is already done, nothing is trained again.
    stamp = (root / "judge" / "round1" / "state.json").stat().st_mtime
    run(cfg)
    assert (root / "judge" / "round1" / "state.json").stat().st_mtime == stamp
    # Other settings are refused on the same folder (the finished units would not match them).
    from dataclasses import replace

    with pytest.raises(ValueError, match="repeats"):
        run(replace(cfg, repeats=2))


def test_repeats_train_each_unit_again_and_report_the_mean(tmp_path: Path, ultralytics_offline: Path) -> None:
    pytest.importorskip("ultralytics")
    from exporter.simulate import SimConfig, run

    cfg = SimConfig(out=tmp_path / "sim", strategies=("random",), repeats=2).quick()
    assert cfg.repeats == 2
    run(cfg)
    for unit in ("initial", "random/round1"):
        state = json.loads((cfg.out / "runs" / "seed0" / unit / "state.json").read_text())
        each = state["metrics_each"]
        assert len(each) == 2 and each[0] != each[1]  # another training seed: another model
        for k, v in state["metrics"].items():
            assert v == pytest.approx((each[0][k] + each[1][k]) / 2)
        rep = cfg.out / "runs" / "seed0" / unit / "repeat1"
        assert json.loads((rep / "metrics.json").read_text()) == each[1] and not (rep / "bundle").exists()
    assert "mean of 2 trainings per unit" in (cfg.out / "results.md").read_text()
    noise = json.loads((cfg.out / "results.json").read_text())["training_noise"]
    assert noise["units"] == 2 and noise["trainings"] == 2 and noise["sd"] > 0
    with pytest.raises(ValueError, match="repeats"):
        SimConfig(out=tmp_path, repeats=0)


def test_settle_trains_every_earlier_point_as_long_as_the_last(tmp_path: Path, ultralytics_offline: Path) -> None:
    """``--settle`` on a finished run: the first bundle and round 1 are trained the rounds they
    lack on their own labels (chained, no new reviews), the label saving is read again on those
    points, and the units the loop trained are reused untouched."""
    pytest.importorskip("ultralytics")
    from dataclasses import replace

    from exporter.simulate import SimConfig, run
    from exporter.simulate_report import mean3

    cfg = replace(SimConfig(out=tmp_path / "sim", strategies=("random",)).quick(), rounds=2)
    root = cfg.out / "runs" / "seed0"
    plain = run(cfg)
    assert plain["settled"] is None and not (cfg.out / "accuracy_settled.png").exists()
    stamps = {u: (root / u / "state.json").stat().st_mtime for u in ("initial", "random/round1", "random/round2")}
    settled_cfg = replace(cfg, settle=True)  # resumes the same folder: --settle only adds units
    assert settled_cfg.units_per_seed == 1 + 2 + 2 + 1
    results = run(settled_cfg)
    assert {u: (root / u / "state.json").stat().st_mtime for u in stamps} == stamps

    def bundle(unit: str) -> dict:
        return json.loads((root / unit / "bundle" / "bundle.json").read_text())

    # chains: initial -> initial_again -> initial_again2; random/round1 -> random/round1_again
    for unit, parent in (("initial_again", "initial"), ("initial_again2", "initial_again"),
                         ("random/round1_again", "random/round1")):
        assert bundle(unit)["lineage"]["parent_bundle"] == bundle(parent)["id"]
    from exporter.mix import image_origins

    for unit, labels in (("initial_again2", "initial"), ("random/round1_again", "random/round1")):
        merged = json.loads((root / unit / "labelled.json").read_text())
        origins = image_origins(merged)
        reviewed = {im["file_name"] for im in merged["images"] if origins[im["id"]] == "reviewed"}
        assert reviewed == set(json.loads((root / labels / "state.json").read_text())["labelled"])  # no new reviews
    st = results["settled"]
    assert st["rounds"] == 2 and st["curves"]["random"]["x"] == [0, cfg.per_round, 2 * cfg.per_round]
    want = [mean3(json.loads((root / u / "metrics.json").read_text()))
            for u in ("initial_again2", "random/round1_again", "random/round2")]
    assert st["curves"]["random"]["mean3"]["mean"] == pytest.approx(want)
    as_trained = [mean3(json.loads((root / u / "state.json").read_text())["metrics"])
                  for u in ("initial", "random/round1", "random/round2")]
    assert results["curves"]["random"]["mean3"]["mean"] == pytest.approx(as_trained)
    assert want[:2] != pytest.approx(as_trained[:2])  # the extra rounds trained other weights
    assert json.loads((root / "random" / "round1_again" / "settled.json").read_text())["trained_rounds"] == 2
    md = (cfg.out / "results.md").read_text()
    assert "At equal training (`--settle`): every point trained 2 rounds" in md and "Bar read at equal training" in md
    assert (cfg.out / "accuracy_settled.png").stat().st_size > 0
    stamp = (root / "initial_again2" / "settled.json").stat().st_mtime
    assert run(settled_cfg)["settled"]["curves"] == st["curves"]  # resumed: nothing trained again
    assert (root / "initial_again2" / "settled.json").stat().st_mtime == stamp


def test_device_and_workers_reach_the_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--device`` / ``--workers`` go to every training of the benchmark (a GPU box trains there);
    bad values are refused with the flag's name."""
    import exporter.evaluate
    import exporter.train
    from exporter.simulate import SimConfig, _train_once

    seen = []
    monkeypatch.setattr(exporter.train, "train_bundle", lambda cfg: seen.append(cfg))
    monkeypatch.setattr(exporter.evaluate, "evaluate",
                        lambda *a, **k: {"head": {"map50": 0.5}, "keypoints": {"oks_ap50": 0.25},
                                         "visibility": {"accuracy": 0.75}})
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "width": 8, "height": 8}], "annotations": [], "categories": []}
    cfg = SimConfig(out=tmp_path, device="0", workers=6)
    m = _train_once(cfg, tmp_path / "unit", coco, ["a.jpg"], tmp_path, tmp_path, "pretrained", 1, 0, True)
    assert (seen[0].device, seen[0].workers) == ("0", 6) and m["head_map50"] == 0.5
    _train_once(SimConfig(out=tmp_path), tmp_path / "unit2", coco, ["a.jpg"], tmp_path, tmp_path, "pretrained", 1, 0, True)
    assert (seen[1].device, seen[1].workers) == ("cpu", 0)  # the 2-core default: in-process loading
    with pytest.raises(ValueError, match="--workers"):
        SimConfig(out=tmp_path, workers=-1)
    with pytest.raises(ValueError, match="--device"):
        SimConfig(out=tmp_path, device=" ")


def test_a_run_folder_from_before_a_setting_resumes_only_with_its_default(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder whose config.json predates --device/--workers holds CPU trainings with in-process
    loading: resuming it on those defaults goes on, on a GPU it is refused by name."""
    from dataclasses import asdict

    import exporter.simulate as sim

    class Rendered(Exception):
        pass

    def stop(cfg: sim.SimConfig) -> None:
        raise Rendered

    monkeypatch.setattr(sim, "prepare_data", stop)
    old = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(sim.SimConfig(out=tmp_path)).items()
           if k not in ("device", "workers")}
    (tmp_path / "config.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="other settings \\(device, workers\\)"):
        sim.run(sim.SimConfig(out=tmp_path, device="0", workers=8))
    with pytest.raises(Rendered):  # same settings: on to the data
        sim.run(sim.SimConfig(out=tmp_path))

    # --propagated-weight came after --propagate: a folder without it trained propagated images
    # at the auto weight; without propagation the weight is moot and any folder resumes
    old = {k: v for k, v in old.items() if k != "propagated_weight"}
    (tmp_path / "config.json").write_text(json.dumps(old))
    with pytest.raises(Rendered):
        sim.run(sim.SimConfig(out=tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**old, "propagate": 64}))
    with pytest.raises(ValueError, match="other settings \\(propagated_weight\\)"):
        sim.run(sim.SimConfig(out=tmp_path, propagate=64))
    (tmp_path / "config.json").write_text(json.dumps({**old, "propagate": 64}))
    with pytest.raises(Rendered):
        sim.run(sim.SimConfig(out=tmp_path, propagate=64, propagated_weight=-1.0))


def test_several_cpu_trainings_at_once_are_warned_about() -> None:
    """``--jobs`` > 1 with CPU trainings oversubscribes the cores (each training takes them all);
    one job, or trainings on a GPU, are not warned about."""
    from exporter.simulate import cpu_jobs_warning

    said = cpu_jobs_warning("cpu", 3, cores=2)
    assert said is not None and "--jobs 3" in said and "all 2 cores" in said and "use --jobs 1" in said
    assert cpu_jobs_warning("cpu", 1, cores=2) is None
    assert cpu_jobs_warning("0", 3, cores=16) is None and cpu_jobs_warning("cuda:0", 3) is None


def test_seeds_in_parallel_processes_give_a_sequential_runs_units(tmp_path: Path, ultralytics_offline: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """``--jobs 2``: two seeds train side by side, one process each; every unit is written as a
    sequential run writes it, so the folder is then resumed (nothing trained again) with jobs 1.
    On the CPU the run warns that the trainings share the cores."""
    pytest.importorskip("ultralytics")
    from dataclasses import replace

    from exporter.simulate import SimConfig, run

    cfg = replace(SimConfig(out=tmp_path / "sim", strategies=("random",)).quick(), seeds=2)
    with caplog.at_level("WARNING", logger="exporter.simulate"):
        results = run(cfg, jobs=2)
    assert any("--jobs 2 on the CPU" in r.getMessage() for r in caplog.records)
    states = {s: json.loads((cfg.out / "runs" / f"seed{s}" / "random" / "round1" / "state.json").read_text())
              for s in (0, 1)}
    assert [st["seed"] for st in states.values()] == [0, 1] and states[0]["selected"] != states[1]["selected"]
    assert results["settings"]["seeds"] == 2
    saved = json.loads((cfg.out / "results.json").read_text())
    assert len(saved["curves"]["random"]["x"]) == 2
    stamp = (cfg.out / "runs" / "seed1" / "random" / "round1" / "state.json").stat().st_mtime
    assert run(cfg)["curves"] == results["curves"]  # resumed sequentially: the same units, nothing retrained
    assert (cfg.out / "runs" / "seed1" / "random" / "round1" / "state.json").stat().st_mtime == stamp


_WORKER_SCRIPT = '''
import multiprocessing, os, sys, time
from concurrent.futures import ProcessPoolExecutor
from exporter.simulate import exit_with_parent

def job(parent, pidfile):
    exit_with_parent(parent, interval=0.1)
    with open(pidfile, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)

if __name__ == "__main__":
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
        ex.submit(job, os.getpid(), sys.argv[1]).result()
'''


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan's exit may wait for a reaper)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads the worker's state from /proc (Linux)")
def test_a_jobs_worker_stops_when_the_simulate_process_is_killed(tmp_path: Path) -> None:
    """``--jobs`` workers must not train on for nobody after ``kill -9`` of the simulate process
    (before: they ran their seeds to the end, holding the CPU)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script, pidfile = tmp_path / "sim.py", tmp_path / "worker.pid"
    script.write_text(_WORKER_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    parent = subprocess.Popen([sys.executable, str(script), str(pidfile)], env=env)
    worker = None
    try:
        deadline = time.monotonic() + 60
        while not (pidfile.is_file() and pidfile.read_text()) and parent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert parent.poll() is None, "the simulate stand-in died before its worker started"
        worker = int(pidfile.read_text())
        os.kill(worker, 0)  # the worker is alive
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _running(worker):
            time.sleep(0.05)
        if _running(worker):
            pytest.fail(f"worker {worker} still runs 30 s after its parent was killed")
    finally:
        if parent.poll() is None:
            parent.kill()
        if worker is not None:
            try:
                os.kill(worker, signal.SIGKILL)
            except ProcessLookupError:
                pass
