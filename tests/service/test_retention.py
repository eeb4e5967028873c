"""Retention ([retention], ``annotator prune``): what goes, what never does, a kill half-way."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from procs import REPO, FakeClock, command_env
from service.config import RetentionConfig
from service.errors import ImageNotFound
from service.outputs import export_coco
from service.retention import DAY, run_pass
from service.store import PRUNED_NOTE, RESTORED_NOTE, REVIEW_PENDING, UPLOADED, Store, image_id_of

T0 = 1_800_000_000.0


def _record(width: int = 64, height: int = 48) -> dict:
    return {"width": width, "height": height, "heads": [], "persons": []}


def _image(store: Store, data: bytes, decision: str | None) -> str:
    """An image in the store: annotated with ``decision``, or left ``received`` (None)."""
    image_id, _ = store.ingest(data, "test")
    if decision is not None:
        [row] = store.claim("w", limit=1)
        store.complete(row.image_id, "w", _record(), "b1", decision, 0.5, [], audit=False)
    return image_id


@pytest.fixture()
def clock() -> FakeClock:
    c = FakeClock()
    c.t = T0
    return c


@pytest.fixture()
def store(tmp_path: Path, clock: FakeClock):
    s = Store(tmp_path / "store", clock=clock)
    yield s
    s.close()


def test_only_old_auto_accepted_images_lose_their_bytes(store: Store, clock: FakeClock) -> None:
    clock.t += 20 * DAY
    young_auto = _image(store, b"young auto", "auto_accepted")
    clock.t = T0
    old_auto = _image(store, b"old auto", "auto_accepted")
    old_review = _image(store, b"old review", "review")
    old_reviewed = _image(store, b"old reviewed", "review")
    store.set_state(old_reviewed, (REVIEW_PENDING,), UPLOADED)
    store.set_state(old_reviewed, (UPLOADED,), "reviewed")
    old_failed = _image(store, b"old failed", None)
    store.fail(old_failed, None, "bad")
    old_received = _image(store, b"old received", None)  # never claimed: the claims above took theirs
    clock.t += 31 * DAY
    before = store.counts()

    report = run_pass(store, RetentionConfig(auto_image_days=30), None)

    assert report.processed is None and report.auto_images is not None
    assert (report.auto_images.files, report.auto_images.bytes) == (1, len(b"old auto"))
    assert not store.image_path(old_auto).exists()
    for kept in (old_review, old_reviewed, old_failed, old_received, young_auto):
        assert store.image_path(kept).exists() and store.get(kept).pruned_at is None  # type: ignore[union-attr]
    row = store.get(old_auto)
    assert row is not None and row.state == "auto_accepted" and row.record == _record() and row.pruned_at == clock.t
    assert store.history(old_auto)[-1] == ("auto_accepted", "auto_accepted", clock.t, PRUNED_NOTE)
    assert store.counts() == before
    with pytest.raises(ImageNotFound, match="removed by retention"):
        store.image_bytes(old_auto)
    again = run_pass(store, RetentionConfig(auto_image_days=30), None)
    assert again.auto_images is not None and again.auto_images.files == 0 and again.swept == 0


def test_a_dry_run_counts_and_removes_nothing(store: Store, clock: FakeClock, tmp_path: Path) -> None:
    drop = tmp_path / "drop"
    copy = drop / "processed" / "cam1" / "a.jpg"
    copy.parent.mkdir(parents=True)
    copy.write_bytes(b"auto bytes")
    os.utime(copy, (T0, T0))
    image_id = _image(store, b"auto bytes", "auto_accepted")
    clock.t += 40 * DAY
    report = run_pass(store, RetentionConfig(processed_days=7, auto_image_days=30), drop, dry_run=True)
    assert report.processed is not None and report.auto_images is not None
    assert (report.processed.files, report.auto_images.files, report.auto_images.bytes) == (1, 1, 10)
    assert copy.exists() and store.image_path(image_id).exists() and store.get(image_id).pruned_at is None  # type: ignore[union-attr]


def test_processed_copies_go_only_when_the_store_took_their_bytes_long_enough_ago(
        store: Store, clock: FakeClock, tmp_path: Path) -> None:
    drop = tmp_path / "drop"
    processed = drop / "processed"

    def copy(rel: str, data: bytes, mtime: float) -> Path:
        p = processed / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        os.utime(p, (mtime, mtime))
        return p

    taken = copy("cam1/a.jpg", b"taken long ago", T0)
    _image(store, b"taken long ago", "auto_accepted")
    by_hand = copy("cam1/by-hand.jpg", b"never taken", T0)  # old, but the store has no row for its bytes
    renamed = copy("cam1/latest.jpg", b"other bytes, an old name", T0)
    clock.t += 10 * DAY
    # An old capture (cp -p keeps its mtime) the store took only now: its row is young.
    late = copy("cam2/old-capture.jpg", b"taken today", T0)
    _image(store, b"taken today", "review")
    _image(store, b"other bytes, an old name", "auto_accepted")  # young row: the copy stays
    young = copy("cam1/b.jpg", b"young copy", clock.t)
    _image(store, b"young copy", "auto_accepted")
    temp = copy("cam1/.c.jpg.tmp", b"taken long ago", T0)

    report = run_pass(store, RetentionConfig(processed_days=7), drop)

    assert report.processed is not None and report.auto_images is None
    assert (report.processed.files, report.processed.bytes, report.processed.kept_unknown) == (1, 14, 1)
    assert not taken.exists()
    assert all(p.exists() for p in (by_hand, renamed, late, young, temp))
    assert store.image_bytes(image_id_of(b"taken long ago")) == b"taken long ago"  # the store's copy stays


def test_a_pass_killed_between_its_commit_and_its_unlinks_is_finished_by_the_next(tmp_path: Path) -> None:
    """A real kill -9 of a first pass right after the rows were marked: the next pass removes the files."""
    root = tmp_path / "store"
    store = Store(root, clock=lambda: T0)
    ids = [_image(store, b"auto %d" % n, "auto_accepted") for n in range(3)]
    store.close()
    script = textwrap.dedent(f"""
        import os, signal
        from service.config import RetentionConfig
        from service.retention import run_pass
        from service.store import Store
        store = Store({str(root)!r}, clock=lambda: {T0 + 40 * 86400.0!r})
        store._unlink = lambda ids: os.kill(os.getpid(), signal.SIGKILL)
        run_pass(store, RetentionConfig(auto_image_days=30), None)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=command_env(), capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    store = Store(root, clock=lambda: T0 + 41 * DAY)
    try:
        assert all(store.get(i).pruned_at is not None and store.image_path(i).exists() for i in ids)  # type: ignore[union-attr]
        report = run_pass(store, RetentionConfig(auto_image_days=30), None)
        assert report.swept == 3 and report.auto_images is not None and report.auto_images.files == 0
        assert not any(store.image_path(i).exists() for i in ids)
    finally:
        store.close()


def test_the_store_export_leaves_pruned_images_out(store: Store, clock: FakeClock, tmp_path: Path) -> None:
    gone = _image(store, b"\xff\xd8 old auto", "auto_accepted")
    clock.t += 31 * DAY
    kept = _image(store, b"\xff\xd8 young auto", "auto_accepted")
    run_pass(store, RetentionConfig(auto_image_days=30), None)
    out = export_coco(store, tmp_path / "export" / "coco.json")
    shas = [im["sha256"] for im in json.loads(out.read_text())["images"]]
    assert shas == [kept] and gone not in shas


def test_a_store_from_before_retention_opens_and_gains_the_column(tmp_path: Path) -> None:
    """A store written by the code before this column: opened, migrated once, its rows intact."""
    import sqlite3

    root = tmp_path / "store"
    store = Store(root)
    image_id = _image(store, b"old store", "auto_accepted")
    store.close()
    db = sqlite3.connect(root / "store.sqlite3")
    db.executescript("DROP INDEX images_unpruned_by_update; DROP INDEX images_by_pruned; ALTER TABLE images DROP COLUMN pruned_at;")
    db.close()
    store = Store(root)
    try:
        row = store.get(image_id)
        assert row is not None and row.state == "auto_accepted" and row.pruned_at is None
    finally:
        store.close()


def test_the_daemon_runs_retention_on_its_own_thread(make_config: Callable[..., Any], small_jpeg: Callable[[int], bytes],
                                                     tmp_path: Path) -> None:
    from service.daemon import Daemon

    drop = tmp_path / "drop"
    drop.mkdir()
    first = Daemon(make_config(drop__folder=str(drop), drop__stable_seconds=0.0))
    assert first.retention is None  # off unless set
    first.start()
    try:
        (drop / "cam1").mkdir()
        src = tmp_path / "a.jpg"
        src.write_bytes(small_jpeg(1))
        os.utime(src, (time.time() - 3600, time.time() - 3600))
        os.replace(src, drop / "cam1" / "a.jpg")
        deadline = time.monotonic() + 60
        while not (drop / "processed" / "cam1" / "a.jpg").exists():
            assert time.monotonic() < deadline, "the drop folder never took the file"
            time.sleep(0.05)
    finally:
        first.close()
    time.sleep(0.2)  # older than the 0.000001 days (86 ms) below

    from service.metrics import MetricsRecorder

    metrics = MetricsRecorder()
    daemon = Daemon(make_config(drop__folder=str(drop), retention__processed_days=0.000001), metrics=metrics)
    assert daemon.retention is not None
    daemon.retention.first_delay = 0.0
    daemon.start()
    try:
        deadline = time.monotonic() + 30
        while daemon.retention.passes < 1:
            assert time.monotonic() < deadline, "no retention pass ran"
            time.sleep(0.05)
        assert not (drop / "processed" / "cam1" / "a.jpg").exists()
        sample = metrics.registry.get_sample_value
        assert sample("annotator_retention_removed_files_total", {"rule": "processed"}) == 1
        assert sample("annotator_retention_removed_bytes_total", {"rule": "processed"}) == len(small_jpeg(1))
        assert sample("annotator_retention_removed_files_total", {"rule": "auto_images"}) == 0
        assert sample("annotator_retention_removed_files_total", {"rule": "quarantine"}) == 0
        assert daemon.store.image_bytes(image_id_of(small_jpeg(1))) == small_jpeg(1)
    finally:
        daemon.close()
    assert not daemon.retention._thread.is_alive()


def test_prune_command(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = Store(root, clock=lambda: time.time() - 40 * DAY)
    image_id = _image(store, b"cli auto", "auto_accepted")
    store.close()
    config = tmp_path / "annotator.toml"
    config.write_text(f'[store]\nroot = "{root}"\n[retention]\nauto_image_days = 30\n')
    cmd = [sys.executable, "-m", "service.cli", "prune", "--config", str(config)]
    dry = subprocess.run(cmd + ["--dry-run"], cwd=REPO, env=command_env(), capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    assert "would remove" in dry.stdout and "auto-accepted images  30 days" in dry.stdout
    assert (root / "images" / image_id[:2] / image_id).exists()
    real = subprocess.run(cmd, cwd=REPO, env=command_env(), capture_output=True, text=True)
    assert real.returncode == 0, real.stderr
    assert "removed" in real.stdout and not (root / "images" / image_id[:2] / image_id).exists()
    off = subprocess.run(cmd + ["--set", "retention.auto_image_days=none"], cwd=REPO, env=command_env(),
                         capture_output=True, text=True)
    assert off.returncode == 2 and "no rule set" in off.stderr


def test_pruned_bytes_that_come_in_again_are_kept_again_and_rejoin_the_dataset(store: Store, clock: FakeClock,
                                                                               tmp_path: Path) -> None:
    """An archive copied back (cp -p) after its images' bytes were pruned: the store keeps the
    bytes again (no second annotation), the merge puts the auto label back, and processed/ never
    removes a copy the store does not hold."""
    from sync.dataset import Dataset
    from sync.merge import Merger

    data = b"\xff\xd8 accepted long ago"
    image_id = _image(store, data, "auto_accepted")
    dataset = Dataset(tmp_path / "dataset")
    merger = Merger(store, dataset)
    merger.merge([])
    clock.t += 31 * DAY
    run_pass(store, RetentionConfig(auto_image_days=30), None)
    assert merger.merge([]).auto_removed == 1 and dataset.get(image_id) is None
    # The only copy left, in processed/, old enough: kept, and said why.
    copy = tmp_path / "drop" / "processed" / "a.jpg"
    copy.parent.mkdir(parents=True)
    copy.write_bytes(data)
    os.utime(copy, (T0, T0))
    report = run_pass(store, RetentionConfig(processed_days=7), tmp_path / "drop")
    assert report.processed is not None and report.processed.kept_only_copy == 1 and copy.exists()

    assert store.ingest(data, "drop:again") == (image_id, False)
    row = store.get(image_id)
    assert row is not None and row.pruned_at is None and row.state == "auto_accepted"
    assert store.image_bytes(image_id) == data and store.counter("annotated") == 1
    assert store.history(image_id)[-1][3] == RESTORED_NOTE
    assert merger.merge([]).auto_added == 1 and dataset.get(image_id) is not None
    dataset.close()


def test_an_image_accepted_late_is_kept_its_days_from_acceptance(store: Store, clock: FakeClock) -> None:
    """A backlog (or a crash loop) accepted 31 days after it arrived is not pruned at once."""
    image_id, _ = store.ingest(b"late", "test")
    clock.t += 31 * DAY
    store.claim("w")
    store.complete(image_id, "w", _record(), "b1", "auto_accepted", 0.5, [], audit=False)
    report = run_pass(store, RetentionConfig(auto_image_days=30), None)
    assert report.auto_images is not None and report.auto_images.files == 0 and store.image_path(image_id).exists()
    clock.t += 31 * DAY
    assert run_pass(store, RetentionConfig(auto_image_days=30), None).auto_images.files == 1  # type: ignore[union-attr]


def test_a_full_disk_still_gets_processed_copies_removed(store: Store, clock: FakeClock, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """On a disk so full that SQLite cannot commit, the processed/ rule (no database write) still
    gives space back; the auto-image rule fails and is tried again on the next pass."""
    import sqlite3

    data = b"\xff\xd8 old"
    _image(store, data, "auto_accepted")
    copy = tmp_path / "drop" / "processed" / "a.jpg"
    copy.parent.mkdir(parents=True)
    copy.write_bytes(data)
    os.utime(copy, (T0, T0))
    clock.t += 40 * DAY

    def full(*args: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(store, "set_counter", full)
    with pytest.raises(sqlite3.OperationalError):
        run_pass(store, RetentionConfig(processed_days=7, auto_image_days=30), tmp_path / "drop")
    assert not copy.exists()


def test_the_same_bytes_through_the_daemon_restore_a_pruned_image(make_config: Callable[..., Any],
                                                                  coco_people_photos: list[Path],
                                                                  tmp_path: Path) -> None:
    """gRPC's submit and the drop folder's probe took any row as "stored": bytes retention had
    removed were answered or disposed of and lost. They reach the store now, which keeps them."""
    from service.daemon import Daemon

    drop = tmp_path / "drop"
    drop.mkdir()
    daemon = Daemon(make_config(drop__folder=str(drop), drop__processed_mode="delete", drop__stable_seconds=0.0))
    daemon.start()
    try:
        photos = [p.read_bytes() for p in coco_people_photos[:2]]
        rows = [daemon.annotate_now(d, f"test:{n}") for n, d in enumerate(photos)]
        for row in rows:
            assert daemon.store.set_state(row.image_id, (row.state,), "auto_accepted")
        daemon.store.prune_auto_images(time.time() + 1)
        assert not any(daemon.store.image_path(r.image_id).exists() for r in rows)
        again = daemon.annotate_now(photos[0], "test:again")  # gRPC's path
        assert again.image_id == rows[0].image_id and again.pruned_at is None
        assert daemon.store.image_bytes(rows[0].image_id) == photos[0]
        (drop / ".b.jpg.tmp").write_bytes(photos[1])  # the drop folder's path, in delete mode, written as
        os.replace(drop / ".b.jpg.tmp", drop / "b.jpg")  # capture tools do (stable_seconds = 0: no waiting)
        deadline = time.monotonic() + 30
        while (drop / "b.jpg").exists() or not daemon.store.image_path(rows[1].image_id).exists():
            assert time.monotonic() < deadline, "the dropped bytes were not kept again"
            time.sleep(0.05)
        assert daemon.store.image_bytes(rows[1].image_id) == photos[1]
        assert daemon.store.counter("annotated") == 2  # neither was annotated again
    finally:
        daemon.close()


def test_prune_refuses_a_store_root_with_no_store(tmp_path: Path) -> None:
    config = tmp_path / "annotator.toml"
    config.write_text(f'[store]\nroot = "{tmp_path / "typo"}"\n[retention]\nauto_image_days = 30\n')
    res = subprocess.run([sys.executable, "-m", "service.cli", "prune", "--config", str(config)], cwd=REPO,
                         env=command_env(), capture_output=True, text=True)
    assert res.returncode == 2 and "no store at" in res.stderr and not (tmp_path / "typo").exists()


def test_quarantined_files_go_with_their_reasons_once_the_reason_is_old(store: Store, clock: FakeClock,
                                                                         tmp_path: Path) -> None:
    from service.dropfolder import write_quarantine

    drop = tmp_path / "drop"
    qdir = drop / "quarantine"
    old = write_quarantine(qdir, Path("cam1/broken.jpg"), "not an image", data=b"x" * 100)
    os.utime(old, (T0 - 400 * DAY, T0 - 400 * DAY))  # a moved file keeps its own (old) mtime
    os.utime(old.with_name("broken.jpg.reason.txt"), (T0, T0))  # quarantined at T0
    lone_reason = qdir / "cam1" / "gone.jpg.reason.txt"  # its file removed by hand (or a kill)
    lone_reason.write_text("too large\n")
    os.utime(lone_reason, (T0, T0))
    by_hand = qdir / "cam2" / "copied-here.jpg"  # no reason: not put there by the appliance
    by_hand.parent.mkdir(parents=True)
    by_hand.write_bytes(b"hand")
    os.utime(by_hand, (T0, T0))
    clock.t = T0 + 10 * DAY
    recent = write_quarantine(qdir, Path("cam1/recent.jpg"), "truncated", data=b"y" * 50)
    os.utime(recent, (T0 - 400 * DAY, T0 - 400 * DAY))  # an old capture quarantined only now
    recent_reason = recent.with_name("recent.jpg.reason.txt")
    os.utime(recent_reason, (clock.t, clock.t))
    settings = RetentionConfig(quarantine_days=7)

    dry = run_pass(store, settings, drop, dry_run=True)
    assert dry.quarantine is not None and (dry.quarantine.files, dry.quarantine.kept_no_reason) == (2, 1)
    assert old.exists() and lone_reason.exists()

    report = run_pass(store, settings, drop)
    assert report.processed is None and report.auto_images is None and report.quarantine is not None
    reason_bytes = len("not an image\n") + len("too large\n")
    assert (report.quarantine.files, report.quarantine.bytes, report.quarantine.kept_no_reason) == (2, 100 + reason_bytes, 1)
    assert not old.exists() and not old.with_name("broken.jpg.reason.txt").exists() and not lone_reason.exists()
    assert by_hand.exists() and recent.exists() and recent_reason.exists()
    assert "quarantined files" in report.summary()


def test_without_a_drop_folder_the_store_roots_quarantine_is_pruned(store: Store, clock: FakeClock) -> None:
    from service.dropfolder import write_quarantine

    image_id = _image(store, b"failed bytes", None)
    store.fail(image_id, None, "decoder crashed")
    copy = write_quarantine(store.root / "quarantine", Path(image_id), "decoder crashed", data=b"failed bytes")
    clock.t += 8 * DAY
    os.utime(copy.with_name(copy.name + ".reason.txt"), (T0, T0))
    report = run_pass(store, RetentionConfig(quarantine_days=7), None)
    assert report.quarantine is not None and report.quarantine.files == 1 and not copy.exists()
    row = store.get(image_id)
    assert row is not None and row.state == "failed" and row.error == "decoder crashed"  # the record stays


def test_prune_command_quarantine_days(tmp_path: Path) -> None:
    root = tmp_path / "store"
    Store(root).close()
    reason = root / "quarantine" / "x.jpg.reason.txt"
    reason.parent.mkdir()
    (root / "quarantine" / "x.jpg").write_bytes(b"bad")
    reason.write_text("bad\n")
    for p in (reason, root / "quarantine" / "x.jpg"):
        os.utime(p, (time.time() - 3 * DAY, time.time() - 3 * DAY))
    config = tmp_path / "annotator.toml"
    config.write_text(f'[store]\nroot = "{root}"\n')
    cmd = [sys.executable, "-m", "service.cli", "prune", "--config", str(config), "--quarantine-days", "2"]
    res = subprocess.run(cmd, cwd=REPO, env=command_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "quarantined files" in res.stdout and "2 days" in res.stdout
    assert not reason.exists() and not (root / "quarantine" / "x.jpg").exists()
    bad = subprocess.run(cmd[:-1] + ["0"], cwd=REPO, env=command_env(), capture_output=True, text=True)
    assert bad.returncode == 2 and "--quarantine-days" in bad.stderr
    bad = subprocess.run(cmd[:-2] + ["--set", "retention.quarantine_days=-1"], cwd=REPO, env=command_env(),
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "retention.quarantine_days" in bad.stderr
