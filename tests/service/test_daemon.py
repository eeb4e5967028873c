"""The daemon without gRPC: workers, failures, quarantine, reload under load, drop folder, shutdown."""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from procs import FakeClock
from service.daemon import Daemon
from service.dropfolder import PROCESSED, QUARANTINE
from service.errors import BundleError, ImageError, ShuttingDown
from service.store import image_id_of


def _wait(cond: Callable[[], bool], seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def test_stored_image_that_fails_to_decode_is_failed_and_quarantined(make_config: Callable[..., Any],
                                                                     small_jpeg: Callable[[int], bytes]) -> None:
    daemon = Daemon(make_config())
    bad = small_jpeg(1)[:-40]  # no end-of-image marker: bypasses submit's check via the store
    image_id, _ = daemon.store.ingest(bad, "test:direct")
    daemon.start()
    try:
        _wait(lambda: daemon.store.get(image_id).state == "failed")
        assert "truncated" in daemon.store.get(image_id).error
        assert daemon.store.counter("failed") == 1  # counted once, by the failing transaction
        reason = daemon.quarantine_dir / f"{image_id}.reason.txt"
        assert "truncated" in reason.read_text() and (daemon.quarantine_dir / image_id).read_bytes() == bad
        assert "(source: test:direct)" in reason.read_text()  # which file it was, for a copy named by its id
        with pytest.raises(ImageError, match="truncated"):
            daemon.submit(bad, "test:again").result(5)  # a failed image answers with its reason
        row = daemon.annotate_now(small_jpeg(2), "test:good", {"camera": "c1"}, timeout=60)
        assert row.state in ("auto_accepted", "review_pending") and row.camera == "c1"
        assert json.loads((daemon.sidecar_dir / f"{row.image_id}.json").read_text())["image_id"] == row.image_id
    finally:
        daemon.close()


def test_a_daemon_dying_between_quarantine_and_store_leaves_one_copy(make_config: Callable[..., Any],
                                                                    small_jpeg: Callable[[int], bytes]) -> None:
    """The quarantine copy is written before the store marks the image failed. A daemon that dies
    in between (the store's write raises here, leaving the disk as a kill -9 at that point would)
    leaves the image received and its copy with the reason; the next daemon tries it again, fails
    it, and reuses that copy: one image, one reason, no ``name-1``."""
    cfg = make_config()
    daemon = Daemon(cfg)
    bad = small_jpeg(3)[:-40]
    image_id, _ = daemon.store.ingest(bad, "test:direct")
    tried: list[str] = []

    def dies(image_id: str, *args: Any) -> None:
        tried.append(image_id)
        raise RuntimeError("killed before the store's write")

    daemon.store.fail = dies  # type: ignore[method-assign]
    daemon.start()
    try:
        _wait(lambda: bool(tried))
        assert daemon.store.get(image_id).state == "received"
        assert (daemon.quarantine_dir / image_id).read_bytes() == bad
        assert "truncated" in (daemon.quarantine_dir / f"{image_id}.reason.txt").read_text()
    finally:
        daemon.close()
    again = Daemon(cfg)
    again.start()
    try:
        _wait(lambda: again.store.get(image_id).state == "failed")
        assert sorted(p.name for p in again.quarantine_dir.iterdir()) == [image_id, f"{image_id}.reason.txt"]
    finally:
        again.close()


def test_reload_swaps_the_engine_without_failing_work_in_flight(make_config: Callable[..., Any], pose_bundle: Any,
                                                                 tmp_path: Path,
                                                                 small_jpeg: Callable[[int], bytes]) -> None:
    daemon = Daemon(make_config())
    daemon.start()
    try:
        broken = tmp_path / "broken-bundle"
        shutil.copytree(pose_bundle.path, broken)
        onnx = next(broken.glob("*.onnx"))
        onnx.write_bytes(onnx.read_bytes()[:-10])  # checksum mismatch
        futures = [daemon.submit(small_jpeg(10 + i), f"test:{i}") for i in range(12)]
        reloads: list[object] = []

        def reload_loop() -> None:
            for _ in range(2):
                reloads.append(daemon.reload().id)
                try:
                    daemon.reload(str(broken))
                except BundleError as exc:
                    reloads.append(str(exc))

        t = threading.Thread(target=reload_loop)
        t.start()
        rows = [f.result(120) for f in futures]
        t.join(120)
        assert all(r.state in ("auto_accepted", "review_pending") for r in rows)
        assert reloads.count(pose_bundle.id) == 2
        assert all("checksum mismatch" in r for r in reloads if r != pose_bundle.id)
        assert daemon.bundle.id == pose_bundle.id and daemon.status().bundle_path == str(pose_bundle.path)
    finally:
        daemon.close()


def test_drop_folder_feeds_the_daemon(make_config: Callable[..., Any], tmp_path: Path,
                                      photo_variants: Callable[..., list[bytes]]) -> None:
    drop = tmp_path / "drop"
    daemon = Daemon(make_config(drop__folder=str(drop), drop__stable_seconds=0.1, drop__poll_interval=0.1))
    (drop / "cam 1").mkdir(parents=True)
    images = photo_variants(3)
    (drop / "cam 1" / "früh.jpg").write_bytes(images[0])  # there before start: start-up scan
    daemon.start()
    try:
        for i, data in enumerate(images[1:]):
            (drop / f".tmp{i}").write_bytes(data)
            (drop / f".tmp{i}").rename(drop / f"img {i}.jpg")
        (drop / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
        _wait(lambda: daemon.store.counter("annotated") == 3 and (drop / QUARANTINE / "broken.jpg.reason.txt").exists())
        assert sorted(p.name for p in (drop / PROCESSED).rglob("*.jpg")) == ["früh.jpg", "img 0.jpg", "img 1.jpg"]
        rows, _ = daemon.store.list()
        assert {r.camera for r in rows} == {"cam 1", None}
        assert len(list(daemon.sidecar_dir.glob("*.json"))) == 3
    finally:
        daemon.close()


def test_close_releases_leases_and_answers_waiters(make_config: Callable[..., Any],
                                                   small_jpeg: Callable[[int], bytes]) -> None:
    cfg = make_config()
    daemon = Daemon(cfg)  # never started: nothing is annotated
    fut = daemon.submit(small_jpeg(30), "test:waiting")
    claimed = daemon.store.claim(f"{daemon.owner}/w0", 8)
    assert len(claimed) == 1
    daemon.close()
    with pytest.raises(ShuttingDown):
        fut.result(1)
    again = Daemon(cfg)
    try:
        assert again.store.get(claimed[0].image_id).lease_owner is None  # released, not left to expire
        with pytest.raises(ShuttingDown):
            again.stop_intake() or again.submit(small_jpeg(31), "late")
    finally:
        again.close()


@pytest.mark.parametrize("near_duplicate", [True, False])
def test_near_duplicates_and_budgets_through_the_daemon(make_config: Callable[..., Any],
                                                        photo_variants: Callable[..., list[bytes]],
                                                        near_duplicate: bool) -> None:
    # audit_fraction 1: every image would go to review, so only dedup and the budget decide.
    daemon = Daemon(make_config(judge__audit_fraction=1.0, judge__near_duplicate=near_duplicate,
                                judge__hourly_budget=2))
    first, other = photo_variants(2)  # two different photos
    near = photo_variants(1, salt=1)[0]  # the first photo re-encoded: other bytes, same look
    daemon.start()
    try:
        a = daemon.annotate_now(first, "t:a", {"camera": "cam1"}, timeout=60)
        b = daemon.annotate_now(near, "t:b", {"camera": "cam1"}, timeout=60)
        c = daemon.annotate_now(other, "t:c", {"camera": "cam1"}, timeout=60)
        assert a.decision == "review"
        if near_duplicate:
            assert b.decision == "auto_accepted" and "near_duplicate" in b.reasons
            assert c.decision == "review"  # a different scene is sent
        else:
            assert b.decision == "review" and "near_duplicate" not in b.reasons
            assert c.decision == "auto_accepted" and "over_budget" in c.reasons  # hourly budget of 2 spent
        # budgets and "annotated" are counted by the completing transactions
        assert daemon.store.counter("review:hour:" + time.strftime("%Y%m%d%H", time.gmtime(a.updated_at))) == 2
        assert daemon.store.counter("annotated") == 3
        assert daemon._judge.dedup is not None if near_duplicate else daemon._judge.dedup is None
    finally:
        daemon.close()


def _scene(seed: int, quality: int) -> bytes:
    """A 320x240 JPEG of smooth blocks (a "scene"): the same seed at another quality is a near
    duplicate (other bytes, the same dHash); other seeds differ by about half of the 64 bits."""
    import cv2
    import numpy as np

    blocks = np.random.default_rng(seed).integers(0, 255, (6, 8, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", cv2.resize(blocks, (320, 240), interpolation=cv2.INTER_CUBIC),
                           [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def test_near_duplicate_memory_survives_a_restart_and_a_bundle_swap(make_config: Callable[..., Any]) -> None:
    """The frames sent to review are remembered across a bundle swap and, read back from the
    store, across a restart: the next near duplicate of one is not sent to review again."""
    from service.imageio import decode_image
    from service.judge import dhash

    cfg = make_config(judge__audit_fraction=1.0, judge__near_duplicate=True)
    first, other, third = (_scene(s, 95) for s in (1, 2, 3))
    near1, near2, other_again = _scene(1, 80), _scene(2, 80), _scene(2, 70)
    bits = lambda a, b: bin(dhash(decode_image(a).pixels) ^ dhash(decode_image(b).pixels)).count("1")  # noqa: E731
    assert bits(first, near1) <= 2 and bits(other, near2) <= 2 and min(bits(first, other), bits(first, third),
                                                                       bits(other, third)) > 12
    daemon = Daemon(cfg)
    daemon.start()
    try:
        assert daemon.annotate_now(first, "t:a", {"camera": "cam1"}, timeout=60).decision == "review"
        assert daemon.annotate_now(other, "t:b", {"camera": "cam2"}, timeout=60).decision == "review"
        daemon.reload()  # a new judge for the re-read bundle, the same memory
        b = daemon.annotate_now(near1, "t:c", {"camera": "cam1"}, timeout=60)
        assert b.decision == "auto_accepted" and "near_duplicate" in b.reasons
    finally:
        daemon.close()
    again = Daemon(cfg)  # a new process would start like this: the memory comes from the store
    again.start()
    try:
        c = again.annotate_now(near2, "t:d", {"camera": "cam2"}, timeout=60)
        assert c.decision == "auto_accepted" and "near_duplicate" in c.reasons
        d = again.annotate_now(third, "t:e", {"camera": "cam1"}, timeout=60)
        assert d.decision == "review"  # a new scene still goes
        e = again.annotate_now(other_again, "t:f", {"camera": "cam1"}, timeout=60)
        assert e.decision == "review"  # memory is per camera: cam2's frame is not cam1's
    finally:
        again.close()


def test_reviews_per_session_through_the_daemon(make_config: Callable[..., Any], tmp_path: Path) -> None:
    """judge.reviews_per_session: one frame of each declared recording (the request's session, or
    the drop folder's sub-folder) goes to review, the rest of it is auto-accepted; a restart keeps
    the count (it lives in the store)."""
    drop = tmp_path / "drop"
    cfg = make_config(judge__audit_fraction=1.0, judge__near_duplicate=False, judge__reviews_per_session=1,
                      drop__folder=str(drop), drop__stable_seconds=0.1, drop__poll_interval=0.1)
    daemon = Daemon(cfg)
    daemon.start()
    try:
        run1 = [daemon.annotate_now(_scene(s, 95), f"t:{s}", {"camera": "cam1", "session": "run1"}, timeout=60)
                for s in (1, 2)]
        assert [r.decision for r in run1] == ["review", "auto_accepted"]
        assert "session_reviewed" in run1[1].reasons
        assert daemon.annotate_now(_scene(3, 95), "t:3", {"camera": "cam1", "session": "run2"},
                                   timeout=60).decision == "review"
        assert daemon.annotate_now(_scene(4, 95), "t:4", {"camera": "cam1"}, timeout=60).decision == "review"
        (drop / "cam2" / "drive-7").mkdir(parents=True)
        for s in (5, 6):
            (drop / f".tmp{s}").write_bytes(_scene(s, 95))
            (drop / f".tmp{s}").rename(drop / "cam2" / "drive-7" / f"{s}.jpg")
        _wait(lambda: daemon.store.counter("annotated") == 6)
        rows, _ = daemon.store.list()
        from_drop = sorted(r.decision for r in rows if r.camera == "cam2")
        assert from_drop == ["auto_accepted", "review"]
    finally:
        daemon.close()
    again = Daemon(cfg)
    again.start()
    try:
        late = again.annotate_now(_scene(7, 95), "t:7", {"camera": "cam1", "session": "run1"}, timeout=60)
        assert late.decision == "auto_accepted" and "session_reviewed" in late.reasons
        assert again.annotate_now(_scene(8, 95), "t:8", {"camera": "cam1", "session": "run3"},
                                  timeout=60).decision == "review"
    finally:
        again.close()


def width_score(prediction: Any, bundle: Any) -> tuple[float, list[str]]:
    """A plugged-in scoring function for the test below: the wider the image, the surer."""
    return min(max((prediction.width - 200) / 400.0, 0.0), 1.0), ["by_width"]


def _wide(seed: int, width: int) -> bytes:
    import cv2
    import numpy as np

    blocks = np.random.default_rng(seed).integers(0, 255, (6, 8, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", cv2.resize(blocks, (width, 240), interpolation=cv2.INTER_CUBIC))
    assert ok
    return buf.tobytes()


def test_review_share_through_the_daemon_and_a_restart(make_config: Callable[..., Any]) -> None:
    """judge.review_share: a doubtful image goes to review only among the most doubtful share of
    the last images; a restart ranks against the images the same bundle judged before (from the
    store), so the first image after it is not waved through by an empty window. Frames held back
    by their recording's cap count in the window but are recalled as no candidates."""
    cfg = make_config(judge__score_fn=f"{__name__}:width_score", judge__threshold=1.0, judge__audit_fraction=0.0,
                      judge__near_duplicate=False, judge__review_share=0.25, judge__review_window=20,
                      judge__reviews_per_session=1)
    widths = [200 + 33 * k for k in (5, 0, 9, 3, 11, 7, 1, 10, 4, 8, 2, 6)]  # scores 0 .. 0.99, mixed
    daemon = Daemon(cfg)
    daemon.start()
    try:
        rows = [daemon.annotate_now(_wide(i, w), f"t:{i}", {"camera": "cam1"}, timeout=60) for i, w in enumerate(widths)]
        run = [daemon.annotate_now(_wide(30 + i, 200), f"t:r{i}", {"camera": "cam1", "session": "run1"}, timeout=60)
               for i in range(3)]
    finally:
        daemon.close()
    assert [r.decision for r in run] == ["review", "auto_accepted", "auto_accepted"]
    assert [r.reasons[-1] for r in run[1:]] == ["session_reviewed"] * 2  # held back, not outranked
    reviewed = [w for w, r in zip(widths, rows) if r.decision == "review"]
    outranked = [w for w, r in zip(widths, rows) if "outranked" in r.reasons]
    assert len(reviewed) + len(outranked) == len(widths) and outranked
    assert all(r.record["judgement"]["doubt"] == 0.0 for r in rows)  # a plugged-in score has no tie-break
    assert min(outranked) > 200  # the most doubtful image (width 200, score 0) always went
    again = Daemon(cfg)
    again.start()
    try:
        assert len(again._judge.share) == len(widths) + 3  # recalled from the store  # type: ignore[arg-type]
        assert len(again._judge.share._ranked) == len(widths) + 1  # type: ignore[union-attr]
        middle = again.annotate_now(_wide(50, 200 + 33 * 6), "t:m", {"camera": "cam1"}, timeout=60)
        assert middle.decision == "auto_accepted" and "outranked" in middle.reasons  # 7 of 14 were more doubtful
        low = again.annotate_now(_wide(51, 201), "t:l", {"camera": "cam1"}, timeout=60)
        assert low.decision == "review"
    finally:
        again.close()


def test_a_batch_slower_than_its_lease_keeps_it(make_config: Callable[..., Any],
                                                small_jpeg: Callable[[int], bytes]) -> None:
    """Inference and finishing together take longer than ``store.lease_seconds`` (5 s here): the
    batch renews its leases as it goes, so no other worker takes its images over meanwhile."""
    daemon = Daemon(make_config())  # not started: the workers are driven by hand
    clock = daemon.store.clock = FakeClock(time.time())  # type: ignore[method-assign]
    try:
        futures = [daemon.submit(small_jpeg(60 + i), f"test:{i}") for i in range(2)]
        real = daemon._engine.predict

        def slow(decoded: Any) -> Any:
            clock.t += 4.0  # a slow inference
            return real(decoded)

        daemon._engine.predict = slow  # type: ignore[method-assign]
        claimed = daemon.store.claim("w-A", 4)
        predicted = daemon._predict("w-A", claimed)
        clock.t += 3.0  # waiting for the finisher: 7 s since the claim
        assert daemon.store.claim("w-B", 4) == []  # still held by w-A
        daemon._finish(predicted)
        rows = [f.result(1) for f in futures]
        assert all(r.state in ("auto_accepted", "review_pending") for r in rows)
        assert daemon.store.counter("annotated") == 2
    finally:
        daemon.close()


def test_a_lost_lease_leaves_the_waiters_to_the_new_owner(make_config: Callable[..., Any],
                                                          photo_variants: Callable[..., list[bytes]]) -> None:
    """A batch that loses a lease all the same (the worker stalled past it, another worker took
    the image over) does not answer the image's waiters with the untouched "received" row: the
    new owner's completion answers them, with its annotation. The new owner judges the image
    afresh: not a near duplicate of the first worker's uncommitted verdict on the same image."""
    daemon = Daemon(make_config(judge__audit_fraction=1.0, judge__near_duplicate=True))
    clock = daemon.store.clock = FakeClock(time.time())  # type: ignore[method-assign]
    try:
        fut = daemon.submit(photo_variants(1)[0], "grpc:cam1", {"camera": "cam1"})
        a = daemon._predict("w-A", daemon.store.claim("w-A", 4))
        clock.t += 10.0  # w-A stalls past its lease
        b = daemon._predict("w-B", daemon.store.claim("w-B", 4))
        assert a is not None and b is not None and a.rows[0].image_id == b.rows[0].image_id
        daemon._finish(a)  # LeaseLost for its only row
        assert not fut.done()
        daemon._finish(b)
        row = fut.result(1)
        assert row.state == "review_pending" and "near_duplicate" not in row.reasons  # sent, as every image here
        assert row.record is not None and row.record["persons"]
        assert daemon.store.get(row.image_id).state == "review_pending"  # type: ignore[union-attr]
    finally:
        daemon.close()


def test_a_lost_lease_leaves_the_new_owners_sidecar_alone(make_config: Callable[..., Any],
                                                         small_jpeg: Callable[[int], bytes]) -> None:
    """A worker stalls past its leases; another worker takes one of its images over, completes it
    and writes its sidecar. When the stalled worker finishes, it writes no sidecar (and completes
    nothing) for the image it lost, so the sidecar keeps the annotation the store holds; the image
    it still holds is finished as usual."""
    daemon = Daemon(make_config(), workers=1)  # not started: the workers are driven by hand
    clock = daemon.store.clock = FakeClock(time.time())  # type: ignore[method-assign]
    try:
        futures = {}
        for i in range(2):
            data = small_jpeg(110 + i)
            futures[image_id_of(data)] = daemon.submit(data, f"test:{i}")
        a = daemon._predict("w-A", daemon.store.claim("w-A", 4))
        assert a is not None and len(a.rows) == 2
        clock.t += 10.0  # w-A stalls past its leases
        b = daemon._predict("w-B", daemon.store.claim("w-B", 4))  # a retry is claimed alone
        assert b is not None and len(b.rows) == 1
        taken = b.rows[0].image_id
        [kept] = [r.image_id for r in a.rows if r.image_id != taken]
        daemon._finish(b)
        sidecar = daemon.sidecar_dir / f"{taken}.json"  # type: ignore[operator]
        written = sidecar.read_bytes()
        daemon._finish(a)
        assert sidecar.read_bytes() == written  # not overwritten by the losing annotation
        for image_id in (taken, kept):
            row = futures[image_id].result(1)
            assert row.state in ("auto_accepted", "review_pending")
            side = json.loads((daemon.sidecar_dir / f"{image_id}.json").read_text())  # type: ignore[operator]
            assert side == row.record == daemon.store.get(image_id).record  # type: ignore[union-attr]
        assert [h[1] for h in daemon.store.history(taken)].count("annotated") == 1
        assert daemon.store.counter("annotated") == 2
    finally:
        daemon.close()


def test_a_failed_image_is_counted_in_the_failing_transaction(make_config: Callable[..., Any],
                                                             small_jpeg: Callable[[int], bytes]) -> None:
    """The daemon's failure path counts the image in the store's failing transaction, not in a
    second one: a kill after the failure (a count that raises here) still leaves it counted."""
    daemon = Daemon(make_config())  # not started
    bad = small_jpeg(5)[:-40]
    image_id, _ = daemon.store.ingest(bad, "test:direct")
    real = daemon.store.counter

    def dies(name: str, delta: int = 0) -> int:
        if delta:
            raise RuntimeError("killed before a separate count")
        return real(name, delta)

    daemon.store.counter = dies  # type: ignore[method-assign]
    try:
        owner = f"{daemon.owner}/w0"
        assert daemon._predict(owner, daemon.store.claim(owner, 4, fail_exhausted=False)) is None
        assert daemon.store.get(image_id).state == "failed"  # type: ignore[union-attr]
        assert daemon.store.counter("failed") == 1
    finally:
        daemon.close()


def test_a_lost_lease_taken_over_by_another_process_answers_the_waiters(make_config: Callable[..., Any],
                                                                        small_jpeg: Callable[[int], bytes]) -> None:
    """The worker that took the lease over belongs to another daemon sharing the store: its
    completion answers nobody here, so the daemon answers its own waiters once the row settles."""
    from service.store import Store

    cfg = make_config()
    daemon = Daemon(cfg, workers=1)
    clock = daemon.store.clock = FakeClock(time.time())  # type: ignore[method-assign]
    other = Store(Path(cfg.store.root), lease_seconds=5.0, clock=clock)
    try:
        fut = daemon.submit(small_jpeg(70), "test:x")
        a = daemon._predict("w-A", daemon.store.claim("w-A", 4))
        clock.t += 10.0
        [row] = other.claim("host-2:1/w0", 4)
        daemon._finish(a)
        assert not fut.done()
        other.complete(row.image_id, "host-2:1/w0", {"width": 60, "height": 40}, "b-other", "auto_accepted",
                       1.0, [], False)
        daemon.start()
        done = fut.result(30)
        assert done.state == "auto_accepted" and done.bundle_id == "b-other"
    finally:
        daemon.close()
        other.close()


def test_an_image_that_crashes_its_worker_fails_alone_and_is_quarantined(
        make_config: Callable[..., Any], small_jpeg: Callable[..., bytes]) -> None:
    """One image kills the batch it is in every time (a stand-in for a crash of the runtime):
    the batch comes back after the lease, its images one by one; the poison image fails after
    ``max_attempts`` claims through the daemon's failure path (quarantine copy and reason,
    waiters answered, "failed" counted), and the others are annotated."""
    daemon = Daemon(make_config(), workers=1)
    clock = daemon.store.clock = FakeClock(time.time())  # type: ignore[method-assign]
    real = daemon._engine.predict

    def crashes(decoded: Any) -> Any:
        if any(d.width == 70 for d in decoded):
            clock.t += 6.0  # the worker is gone and its leases run out
            raise RuntimeError("stand-in for a crash in the runtime")
        return real(decoded)

    daemon._engine.predict = crashes  # type: ignore[method-assign]
    poison = small_jpeg(80, (50, 70))
    futures = [daemon.submit(data, f"test:{i}")
               for i, data in enumerate([small_jpeg(81), small_jpeg(82), poison, small_jpeg(83)])]
    daemon.start()
    try:
        _wait(lambda: all(f.done() for f in futures), seconds=30)
        with pytest.raises(ImageError, match="claimed 5 times without finishing"):
            futures[2].result(0)
        assert all(f.result(0).state in ("auto_accepted", "review_pending") for i, f in enumerate(futures) if i != 2)
        assert daemon.store.counter("failed") == 1 and daemon.store.counter("annotated") == 3
        poison_id = daemon.store.list(state="failed")[0][0].image_id
        assert (daemon.quarantine_dir / poison_id).read_bytes() == poison
        assert "crash loop" in (daemon.quarantine_dir / f"{poison_id}.reason.txt").read_text()
    finally:
        daemon.close()


def test_reload_gives_the_drop_folder_the_new_input_size(make_config: Callable[..., Any], tmp_path: Path,
                                                         yolo11n_pose_pt: Path,
                                                         small_jpeg: Callable[[int], bytes]) -> None:
    """The drop folder decodes JPEGs at reduced size for the models' input; after a swap to a
    bundle with a larger input it must decode for that one, and decodes cached for the old size
    are not used."""
    from exporter.bundle_build import build_bundle

    larger = build_bundle(tmp_path / "b416", None, yolo11n_pose_pt, None, 416, head_from_face=True)
    daemon = Daemon(make_config(drop__folder=str(tmp_path / "drop")))  # not started
    try:
        assert daemon.drop is not None and daemon.drop.max_side_hint == daemon.max_side_hint == 320
        assert daemon.drop.paused == daemon.store.paused_reason  # nothing decoded while the store is full
        daemon.submit(small_jpeg(90), "test:cached")
        assert len(daemon._decoded) == 1
        daemon.reload(str(larger.path))
        assert daemon.max_side_hint == 416 and daemon.drop.max_side_hint == 416
        assert not daemon._decoded
    finally:
        daemon.close()


def test_reload_without_a_path_reads_the_configured_bundle(make_config: Callable[..., Any], tmp_path: Path,
                                                           pose_bundle: Any, pose_two_model_bundle: Any) -> None:
    """ReloadModels("") re-reads engine.bundle (e.g. the `current` link the model pull and
    `annotator models adopt` move), not whichever path the last reload named."""
    current = tmp_path / "current"
    current.symlink_to(pose_bundle.path)
    daemon = Daemon(make_config(engine__bundle=str(current)))  # not started
    try:
        assert daemon.reload(str(pose_two_model_bundle.path)).id == pose_two_model_bundle.id
        assert daemon.reload().id == pose_bundle.id
    finally:
        daemon.close()


def _old(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (time.time() - 60,) * 2)  # stable at once


def test_drop_folder_images_leave_no_futures(make_config: Callable[..., Any], tmp_path: Path,
                                             small_jpeg: Callable[[int], bytes]) -> None:
    """Every file the drop folder took left a Future in ``_futures`` that nobody waits on until its
    image was annotated: a backlog of 20k files, 20k futures (+92 MB). A gRPC caller still gets
    one, and it is answered as before."""
    drop = tmp_path / "drop"
    daemon = Daemon(make_config(drop__folder=str(drop), drop__stable_seconds=0.0))  # workers not started
    try:
        n = 12
        for i in range(n):
            _old(drop / f"cam{i % 3}" / f"f{i:02d}.jpg", small_jpeg(200 + i))
        assert daemon.drop is not None and daemon.drop.scan_once(full=True) == n
        assert daemon.store.counts()["received"] == n and len(daemon._decoded) == n
        assert len(daemon._futures) == 0  # was n
        fut = daemon.submit(small_jpeg(300), "test:grpc")
        assert len(daemon._futures) == 1 and not fut.done()
        daemon.start()
        assert fut.result(60).state in ("auto_accepted", "review_pending")
        _wait(lambda: daemon.store.counter("annotated") == n + 1)
        assert len(daemon._futures) == 0
    finally:
        daemon.close()


def test_a_drop_folder_take_after_close_leaves_the_file(make_config: Callable[..., Any], tmp_path: Path,
                                                        small_jpeg: Callable[[int], bytes]) -> None:
    """A take that outlived ``DropFolder.stop``'s wait (a slow share) ran into the store that
    ``close`` had closed: "the store is closed" quarantined a good image. Now it stays for the
    next start, and that start takes it."""
    drop = tmp_path / "drop"
    cfg = make_config(drop__folder=str(drop), drop__stable_seconds=0.0)
    daemon = Daemon(cfg)
    good = drop / "cam" / "good.jpg"
    _old(good, small_jpeg(310))
    daemon.close()  # what serve() does after drop.stop() returned on its timeout
    assert daemon.drop is not None and daemon.drop._consider(good) == 0  # the take in flight
    assert good.exists() and not (drop / QUARANTINE).exists() and daemon.drop.quarantined == 0
    daemon.drop.known = None  # the sink alone meets the closed store too
    assert daemon.drop._consider(good) == 0
    assert good.exists() and not (drop / QUARANTINE).exists() and daemon.drop.quarantined == 0
    again = Daemon(cfg)
    try:
        assert again.drop is not None and again.drop.scan_once(full=True) == 1
        assert (drop / PROCESSED / "cam" / "good.jpg").is_file() and again.store.counts()["received"] == 1
    finally:
        again.close()


def test_keep_mode_restart_ingests_nothing_twice(make_config: Callable[..., Any], tmp_path: Path,
                                                 small_jpeg: Callable[[int], bytes],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """drop.processed_mode="keep": after a restart every kept file was decoded and submitted again;
    the daemon's drop folder now asks the store first."""
    import service.dropfolder as dropfolder

    drop = tmp_path / "drop"
    cfg = make_config(drop__folder=str(drop), drop__stable_seconds=0.0, drop__processed_mode="keep")
    for i in range(6):
        _old(drop / "cam" / f"f{i}.jpg", small_jpeg(320 + i))
    daemon = Daemon(cfg)
    try:
        assert daemon.drop is not None and daemon.drop.scan_once(full=True) == 6
    finally:
        daemon.close()
    decodes: list[int] = []
    real = dropfolder.decode_image
    monkeypatch.setattr(dropfolder, "decode_image", lambda data, **kw: decodes.append(1) or real(data, **kw))
    again = Daemon(cfg)
    try:
        assert again.drop is not None and again.drop.scan_once(full=True) == 0
        assert decodes == [] and again.drop.stored_already == 6 and len(again.drop._kept) == 6
        assert len(list((drop / "cam").iterdir())) == 6
    finally:
        again.close()


def test_near_duplicate_recall_decodes_a_bounded_number_of_frames(make_config: Callable[..., Any],
                                                                  small_jpeg: Callable[[int], bytes],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The start decoded ``near_duplicate_memory`` review frames of every camera the store ever
    saw (a dated drop folder makes a camera per day); now at most ``RECALL_MAX_FRAMES`` in all,
    those of the cameras that sent frames to review most recently."""
    import service.daemon as daemon_module
    from service.store import REVIEW_PENDING, Store

    cfg = make_config(judge__near_duplicate=True, judge__near_duplicate_memory=2)
    clock = FakeClock(1_700_000_000.0)
    store = Store(Path(cfg.store.root), clock=clock)
    for day in range(5):  # five "cameras", two review frames each, day by day
        for k in range(2):
            clock.t += 60
            image_id, _ = store.ingest(small_jpeg(400 + 2 * day + k), "t", {"camera": f"day{day}"})
            assert store.set_state(image_id, ["received"], REVIEW_PENDING, decision="review")
    store.close()
    monkeypatch.setattr(daemon_module, "RECALL_MAX_FRAMES", 3)
    decoded: list[int] = []
    real = daemon_module._decode
    monkeypatch.setattr(daemon_module, "_decode", lambda data, *a: decoded.append(1) or real(data, *a))
    daemon = Daemon(cfg)
    try:
        assert len(decoded) == 3  # was 10
        assert daemon._dedup is not None and daemon._dedup.cameras() == ["day3", "day4"]
        assert len(daemon._dedup._recent["day4"]) == 2 and len(daemon._dedup._recent["day3"]) == 1
    finally:
        daemon.close()


def test_the_engines_letterbox_comes_from_the_config_and_survives_a_reload(make_config: Callable[..., Any]) -> None:
    daemon = Daemon(make_config(engine__letterbox="rect"))
    try:
        assert daemon._engine.letterbox == "rect"
        daemon.reload()
        assert daemon._engine.letterbox == "rect"
    finally:
        daemon.close()
    square = Daemon(make_config())
    try:
        assert square._engine.letterbox == "square"
    finally:
        square.close()


def test_the_same_bytes_again_after_the_upload_failed_answer_with_the_record(make_config: Callable[..., Any],
                                                                             coco_people_photos: list[Path]) -> None:
    """An image annotated, then failed by the sync agent (it could never be uploaded for review),
    has its record: sent again, the client gets that row, not INVALID_ARGUMENT about input that
    was fine (an image that failed before it was annotated still answers with its reason:
    test_stored_image_that_fails_to_decode_is_failed_and_quarantined)."""
    daemon = Daemon(make_config())
    daemon.start()
    try:
        data = coco_people_photos[0].read_bytes()
        row = daemon.annotate_now(data, "test:a")
        assert daemon.store.set_state(row.image_id, (row.state,), "failed", error="not uploaded for review: test")
        again = daemon.annotate_now(data, "test:a")
        assert again.state == "failed" and again.record == row.record
    finally:
        daemon.close()


@pytest.mark.parametrize("where", ["finisher", "worker"])
def test_a_thread_wedged_inside_a_batch_makes_the_daemon_unhealthy_until_it_moves(
        make_config: Callable[..., Any], small_jpeg: Callable[[int], bytes], where: str) -> None:
    """A thread alive but stuck (a hung disk under the sidecars, a driver in inference) is
    unhealthy after ``engine.stall_seconds``: the watchdog and gRPC health see it, and the
    daemon is restarted. An idle daemon, however long idle, stays healthy."""
    daemon = Daemon(make_config(engine__stall_seconds=10.0))
    daemon.stall_seconds = 0.3  # the setting's floor is 10 s; a test waits less
    release = threading.Event()
    if where == "finisher":
        real = daemon._finish
        daemon._finish = lambda p: (release.wait(60), real(p))  # type: ignore[method-assign]
    else:
        engine = daemon._loaded[0]
        real_predict = engine.predict
        engine.predict = lambda images: (release.wait(60), real_predict(images))[1]  # type: ignore[method-assign]
    daemon.start()
    try:
        time.sleep(0.5)
        assert daemon.healthy()  # idle longer than stall_seconds: not a stall
        future = daemon.submit(small_jpeg(7), "test")
        deadline = time.monotonic() + 30
        # The wedged thread itself busy (a worker's entry alone, on a loaded box, left the
        # finisher wedged for less than stall_seconds when health was asked).
        while not any((k == "finisher") == (where == "finisher") for k in list(daemon._busy)):
            assert time.monotonic() < deadline, "no batch started"
            time.sleep(0.02)
        time.sleep(0.4)
        assert not daemon.healthy()
        release.set()
        row = future.result(timeout=60)
        assert row.state in ("auto_accepted", "review_pending") and daemon.healthy()
        assert daemon.store.counter("annotated") == 1
    finally:
        release.set()
        daemon.close()
