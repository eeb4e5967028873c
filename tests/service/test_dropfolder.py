"""The drop folder on real files: what is taken, what is quarantined and why, what is ignored."""
from __future__ import annotations

import errno
import os
import sqlite3
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

import service.dropfolder as dropfolder
import service.errors as errors
from procs import FakeClock
from service.dropfolder import PROCESSED, QUARANTINE, DropFolder, is_temporary, write_quarantine
from service.errors import StoreFull
from service.imageio import DecodedImage
from service.store import Store


def _jpeg(seed: int, size: tuple[int, int] = (48, 64)) -> bytes:
    rng = np.random.default_rng(seed)
    ok, buf = cv2.imencode(".jpg", rng.integers(0, 255, (*size, 3), dtype=np.uint8))
    assert ok
    return buf.tobytes()


class Sink:
    """Collects what the drop folder ingests (a real callable, no mock library)."""

    def __init__(self) -> None:
        self.got: list[tuple[bytes, str, dict]] = []
        self.full = False

    def __call__(self, data: bytes, source: str, meta: dict, decoded: DecodedImage) -> None:
        if self.full:
            raise StoreFull("disk below the floor")
        assert decoded.width > 0
        self.got.append((data, source, meta))


def _folder(tmp_path: Path, sink: Sink, **kw: object) -> DropFolder:
    kw.setdefault("stable_seconds", 0.0)
    return DropFolder(tmp_path / "drop", sink, max_bytes=200_000, max_pixels=1_000_000, **kw)  # type: ignore[arg-type]


def _reason(root: Path, rel: str) -> str:
    return (root / QUARANTINE / f"{rel}.reason.txt").read_text(encoding="utf-8")


@pytest.mark.parametrize("name,temp", [
    ("a.jpg", False), (".a.jpg", True), ("a.jpg.tmp", True), ("a.jpg.part", True), ("~a.jpg", True),
    ("sub/.hidden/a.jpg", True), ("sub/a.jpg", False), ("", False),
])
def test_temporary_names(name: str, temp: bool) -> None:
    assert is_temporary(Path(name)) is temp


def test_good_files_taken_and_moved_keeping_relative_paths(tmp_path: Path) -> None:
    sink = Sink()
    drop = _folder(tmp_path, sink)
    names = ["plain.jpg", "with space.jpg", "ünïcödé ✓.jpg", "odd#%&'(name).jpg", "cam1/nested/deep.jpg"]
    for i, n in enumerate(names):
        (drop.root / n).parent.mkdir(parents=True, exist_ok=True)
        (drop.root / n).write_bytes(_jpeg(i))
    (drop.root / "writing.jpg.part").write_bytes(b"half")
    assert drop.scan_once() == len(names)
    assert sorted(s for _, s, _ in sink.got) == sorted(f"drop:{n}" for n in names)
    for n in names:
        assert (drop.root / PROCESSED / n).is_file() and not (drop.root / n).exists()
    assert [m.get("camera") for _, s, m in sink.got if "nested" in s] == ["cam1"]
    assert (drop.root / "writing.jpg.part").exists()  # temporary names are left alone
    assert drop.scan_once() == 0  # processed/ is never re-ingested


def test_bad_files_quarantined_with_reasons(tmp_path: Path) -> None:
    sink = Sink()
    drop = _folder(tmp_path, sink)
    good = _jpeg(1)
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(_jpeg(2))
    bad = {
        "empty.jpg": b"",
        "truncated.jpg": good[: len(good) // 2],
        "notes.txt.jpg": b"this is not an image at all",
        "huge.bin": b"\xff" * 300_000,
        "bomb.png": cv2.imencode(".png", np.zeros((1100, 1000, 3), np.uint8))[1].tobytes(),
    }
    for n, data in bad.items():
        (drop.root / n).write_bytes(data)
    (drop.root / "good.jpg").write_bytes(good)
    os.symlink(outside, drop.root / "link-out.jpg")
    os.symlink(drop.root / "gone.jpg", drop.root / "dangling.jpg")  # inside, but no target
    assert drop.scan_once() == 1
    assert [s for _, s, _ in sink.got] == ["drop:good.jpg"]
    expect = {"empty.jpg": "empty", "truncated.jpg": "truncated", "notes.txt.jpg": "not a decodable image",
              "huge.bin": "more than the limit of 200000", "bomb.png": "pixels, more than the limit",
              "link-out.jpg": "outside the drop folder", "dangling.jpg": "does not exist"}
    for n, words in expect.items():
        assert words in _reason(drop.root, n), (n, _reason(drop.root, n))
        assert os.path.lexists(drop.root / QUARANTINE / n) and not os.path.lexists(drop.root / n)
    assert outside.is_file()  # the link was moved, never its target
    assert drop.scan_once() == 0  # quarantine/ is never re-ingested


def test_quarantine_retry_reuses_the_same_bytes_and_keeps_other_files(tmp_path: Path) -> None:
    q = tmp_path / QUARANTINE
    first = write_quarantine(q, Path("cam/a.jpg"), "truncated", data=b"bad bytes")
    again = write_quarantine(q, Path("cam/a.jpg"), "truncated again", data=b"bad bytes")  # a retry after a kill
    assert first == again == q / "cam/a.jpg" and again.read_bytes() == b"bad bytes"
    assert (q / "cam/a.jpg.reason.txt").read_text() == "truncated again\n"
    other = write_quarantine(q, Path("cam/a.jpg"), "not an image", data=b"other bytes")  # same name, other file
    assert other == q / "cam/a-1.jpg" and other.read_bytes() == b"other bytes"
    # a kill after the reason file and before the image: the next try takes the same name
    (q / "cam/b.jpg.reason.txt").write_text("stale\n")
    src = tmp_path / "b.jpg"
    src.write_bytes(b"moved")
    moved = write_quarantine(q, Path("cam/b.jpg"), "empty", source=src)
    assert moved == q / "cam/b.jpg" and not src.exists() and (q / "cam/b.jpg.reason.txt").read_text() == "empty\n"
    assert sorted(p.name for p in (q / "cam").iterdir()) == ["a-1.jpg", "a-1.jpg.reason.txt", "a.jpg",
                                                           "a.jpg.reason.txt", "b.jpg", "b.jpg.reason.txt"]


def test_unstable_file_waits_until_it_stops_changing(tmp_path: Path) -> None:
    sink = Sink()
    drop = _folder(tmp_path, sink, stable_seconds=0.4)
    path = drop.root / "slow.jpg"
    data = _jpeg(3)
    path.write_bytes(data[:100])
    assert drop.scan_once() == 0  # fresh mtime: not stable yet
    path.write_bytes(data)
    assert drop.scan_once() == 0
    time.sleep(0.5)
    assert drop.scan_once(full=False) == 1  # remembered as pending, no full walk needed
    assert sink.got[0][0] == data


@pytest.mark.parametrize("mode", ["keep", "delete"])
def test_processed_modes(tmp_path: Path, mode: str) -> None:
    sink = Sink()
    drop = _folder(tmp_path, sink, processed_mode=mode)
    (drop.root / "a.jpg").write_bytes(_jpeg(4))
    assert drop.scan_once() == 1
    assert (drop.root / "a.jpg").exists() is (mode == "keep")
    assert drop.scan_once() == 0  # a kept file is not taken again
    assert not (drop.root / PROCESSED).exists()


def test_store_full_leaves_the_file_for_later(tmp_path: Path) -> None:
    sink, clock = Sink(), FakeClock(1000.0)
    sink.full = True
    drop = _folder(tmp_path, sink, clock=clock)
    (drop.root / "a.jpg").write_bytes(_jpeg(5))
    assert drop.scan_once() == 0
    assert (drop.root / "a.jpg").exists() and not (drop.root / QUARANTINE).exists()
    sink.full = False
    assert drop.scan_once() == 0  # held for pause_retry_seconds after the refusal
    clock.t += dropfolder.PAUSE_RETRY_SECONDS
    assert drop.scan_once(full=False) == 1  # remembered: no full walk needed


def _old_files(root: Path, names: list[bytes]) -> None:
    """Files (names as raw bytes) with an mtime long past, so each counts as stable at once."""
    for i, name in enumerate(names):
        path = os.fsencode(root) + b"/" + name
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(_jpeg(100 + i))
        os.utime(path, (1_000_000_000, 1_000_000_000))


def _count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = dropfolder.decode_image

    def counting(data: bytes, **kw: object) -> DecodedImage:
        calls.append(len(data))
        return real(data, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(dropfolder, "decode_image", counting)
    return calls


def test_name_that_is_not_utf8_is_ingested_and_the_files_after_it_too(tmp_path: Path) -> None:
    """A Latin-1 name (FAT card, SMB share) made SQLite raise UnicodeEncodeError in every full
    scan, so no file sorting after it was ever taken. Into a real store it goes as text with the
    odd bytes written \\xNN; on disk the file keeps its real name."""
    store = Store(tmp_path / "store")
    got: list[str] = []

    def sink(data: bytes, source: str, meta: dict, decoded: DecodedImage) -> object:
        got.append(source)
        return store.ingest(data, source, meta)

    drop = DropFolder(tmp_path / "drop", sink, stable_seconds=0.0)
    _old_files(drop.root, [b"cam1/Kamera_\xdc_001.jpg", b"cam1/z_good.jpg", b"Kamera_\xfc/b.jpg"])
    assert drop.scan_once(full=True) == 3
    assert sorted(got) == ["drop:Kamera_\\xfc/b.jpg", "drop:cam1/Kamera_\\xdc_001.jpg", "drop:cam1/z_good.jpg"]
    assert store.counts()["received"] == 3
    rows = {r.source: r for r in store.list()[0]}
    assert rows["drop:Kamera_\\xfc/b.jpg"].camera == "Kamera_\\xfc"
    assert rows["drop:cam1/Kamera_\\xdc_001.jpg"].meta["path"] == "cam1/Kamera_\\xdc_001.jpg"
    assert os.path.isfile(os.fsencode(drop.root / PROCESSED) + b"/cam1/Kamera_\xdc_001.jpg")
    assert not (drop.root / QUARANTINE).exists()


def test_unexpected_ingest_error_quarantines_that_file_only(tmp_path: Path) -> None:
    sink = Sink()
    drop = _folder(tmp_path, sink)
    real = sink.__call__

    def picky(data: bytes, source: str, meta: dict, decoded: DecodedImage) -> None:
        if source.endswith("b.jpg"):
            raise UnicodeEncodeError("utf-8", "b\udcdc", 1, 2, "surrogates not allowed")
        real(data, source, meta, decoded)

    drop.sink = picky
    for i, n in enumerate(["a.jpg", "b.jpg", "c.jpg"]):
        (drop.root / n).write_bytes(_jpeg(10 + i))
    assert drop.scan_once() == 2
    assert [s for _, s, _ in sink.got] == ["drop:a.jpg", "drop:c.jpg"]
    assert "ingest failed (UnicodeEncodeError" in _reason(drop.root, "b.jpg")
    assert (drop.root / QUARANTINE / "b.jpg").is_file() and not (drop.root / "b.jpg").exists()
    assert drop.quarantined == 1 and drop.scan_once() == 0


def test_store_busy_leaves_the_file_and_takes_the_others(tmp_path: Path) -> None:
    sink = Sink()
    drop = _folder(tmp_path, sink)
    real = sink.__call__
    locked = [True]

    def busy(data: bytes, source: str, meta: dict, decoded: DecodedImage) -> None:
        if source.endswith("a.jpg") and locked[0]:
            raise sqlite3.OperationalError("database is locked")
        real(data, source, meta, decoded)

    drop.sink = busy
    (drop.root / "a.jpg").write_bytes(_jpeg(20))
    (drop.root / "b.jpg").write_bytes(_jpeg(21))
    assert drop.scan_once() == 1 and [s for _, s, _ in sink.got] == ["drop:b.jpg"]
    assert (drop.root / "a.jpg").exists() and not (drop.root / QUARANTINE).exists()  # not the file's fault
    locked[0] = False
    assert drop.scan_once() == 1


def test_one_files_surprise_never_aborts_the_scan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sink = Sink()
    drop = _folder(tmp_path, sink)
    real = drop._dispose

    def dispose(path: Path, rel: Path, st: os.stat_result, data: bytes) -> None:
        if rel.name == "a.jpg":
            raise KeyError("a bug of our own, after the ingest")
        real(path, rel, st, data)

    monkeypatch.setattr(drop, "_dispose", dispose)
    for i, n in enumerate(["a.jpg", "b.jpg", "c.jpg"]):
        (drop.root / n).write_bytes(_jpeg(30 + i))
    assert drop.scan_once() == 2  # raised out of scan_once before, leaving b and c behind
    assert (drop.root / PROCESSED / "b.jpg").is_file() and (drop.root / PROCESSED / "c.jpg").is_file()
    assert (drop.root / "a.jpg").exists()  # retried later; the store de-duplicates its bytes


def test_store_full_decodes_nothing_while_paused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Thousands of queued files were each read and decoded every second while the store refused
    them. Now the first refusal ends the scan and nothing is decoded until the store takes
    images again (the probe says so, after the hold)."""
    decodes = _count_decodes(monkeypatch)
    sink, clock = Sink(), FakeClock(1000.0)
    reason: list[str | None] = [None]
    drop = _folder(tmp_path, sink, clock=clock, paused=lambda: reason[0])
    _old_files(drop.root, [f"f{i:02d}.jpg".encode() for i in range(20)])
    sink.full = True  # the floor is crossed between the probe and the ingest
    assert drop.scan_once() == 0 and len(decodes) == 1  # stopped at the first refusal
    for _ in range(5):
        assert drop.scan_once() == 0
    assert len(decodes) == 1  # held: not even the probe is asked
    clock.t += dropfolder.PAUSE_RETRY_SECONDS
    reason[0] = "free disk space 1 MB below the floor of 100 MB"
    for _ in range(5):
        assert drop.scan_once() == 0
    assert len(decodes) == 1  # the probe says paused: nothing is read
    reason[0], sink.full = None, False
    assert drop.scan_once(full=False) == 20  # the files were remembered, no full walk needed
    assert len(decodes) == 21 and not (drop.root / QUARANTINE).exists()


def test_paused_at_start_owes_the_full_walk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    decodes = _count_decodes(monkeypatch)
    sink = Sink()
    reason: list[str | None] = ["disk below the floor"]
    drop = _folder(tmp_path, sink, paused=lambda: reason[0])
    _old_files(drop.root, [b"a.jpg", b"b.jpg"])
    assert drop.scan_once(full=True) == 0 and decodes == []  # the start-up scan, while paused
    reason[0] = None
    assert drop.scan_once(full=False) == 2  # the skipped start-up walk is done now


@pytest.mark.parametrize("disk_full", [
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.EDQUOT, "Disk quota exceeded"),
])
def test_no_space_while_ingesting_is_store_full(tmp_path: Path, disk_full: Exception) -> None:
    sink, clock = Sink(), FakeClock(1000.0)
    calls: list[str] = []

    def full(data: bytes, source: str, meta: dict, decoded: DecodedImage) -> None:
        calls.append(source)
        raise disk_full

    drop = _folder(tmp_path, sink, clock=clock)
    drop.sink = full
    for i, n in enumerate(["a.jpg", "b.jpg", "c.jpg"]):
        (drop.root / n).write_bytes(_jpeg(40 + i))
    assert drop.scan_once() == 0
    assert calls == ["drop:a.jpg"]  # the scan stopped: the others would be refused too
    assert drop.scan_once() == 0 and len(calls) == 1  # held
    assert not (drop.root / QUARANTINE).exists() and (drop.root / "a.jpg").exists()
    drop.sink = sink
    clock.t += dropfolder.PAUSE_RETRY_SECONDS
    assert drop.scan_once() == 3


def test_sqlite_full_is_store_full() -> None:
    exc = sqlite3.OperationalError("database or disk is full")
    exc.sqlite_errorcode = sqlite3.SQLITE_FULL  # what sqlite3 sets when SQLITE_FULL is returned
    locked = sqlite3.OperationalError("database is locked")
    locked.sqlite_errorcode = sqlite3.SQLITE_BUSY
    assert errors.is_disk_full(exc) and errors.is_disk_full(OSError(errno.ENOSPC, "full"))
    assert not errors.is_disk_full(locked) and not errors.is_disk_full(OSError(errno.EACCES, "denied"))


def test_startup_scan_and_watcher(tmp_path: Path) -> None:
    sink = Sink()
    drop = _folder(tmp_path, sink, poll_interval=0.05)
    (drop.root / "before.jpg").write_bytes(_jpeg(6))  # arrived while "down"
    drop.start()
    try:
        tmp = drop.root / ".after.jpg"
        tmp.write_bytes(_jpeg(7))
        os.replace(tmp, drop.root / "after.jpg")  # the rename-into-place convention
        deadline = time.monotonic() + 10
        while len(sink.got) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        drop.stop()
    assert sorted(s for _, s, _ in sink.got) == ["drop:after.jpg", "drop:before.jpg"]


def _cannot_move(monkeypatch: pytest.MonkeyPatch, name: str) -> list[str]:
    """``_dispose`` refuses ``name`` as a folder the service user cannot write would (the tests
    run as root, which chmod cannot stop); returns the paths it was asked to move."""
    asked: list[str] = []
    real = DropFolder._dispose

    def dispose(self: DropFolder, path: Path, rel: Path, st: os.stat_result, data: bytes) -> None:
        asked.append(path.name)
        if path.name == name:
            raise PermissionError(13, "Permission denied", str(path))
        real(self, path, rel, st, data)

    monkeypatch.setattr(DropFolder, "_dispose", dispose)
    return asked


def test_a_file_that_cannot_be_moved_out_does_not_spin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon's own read of such a file raised inotify events (opened, closed without a write)
    that woke the next try at once: 6,500 tries and a core at 100 % in 12 s on a capture folder
    made with umask 022. Those events are ignored now, and the retries back off."""
    decodes = _count_decodes(monkeypatch)
    asked = _cannot_move(monkeypatch, "stuck.jpg")
    sink = Sink()
    drop = _folder(tmp_path, sink, poll_interval=0.01)
    _old_files(drop.root, [b"cam1/stuck.jpg"])
    drop.start()
    try:
        time.sleep(2.0)
        tmp = drop.root / "cam1" / ".later.jpg"
        tmp.write_bytes(_jpeg(9))
        os.replace(tmp, drop.root / "cam1" / "later.jpg")  # the others are still taken
        deadline = time.monotonic() + 10
        while "later.jpg" not in asked and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        drop.stop()
    assert asked.count("stuck.jpg") == 1 and "later.jpg" in asked and len(decodes) == 2


def test_moving_out_is_retried_with_a_growing_delay_or_when_the_file_changes(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    asked = _cannot_move(monkeypatch, "stuck.jpg")
    now = [1000.0]
    drop = _folder(tmp_path, Sink(), clock=lambda: now[0])
    _old_files(drop.root, [b"stuck.jpg"])
    for step in (0.0, 10.0, 21.0, 30.0, 59.0, 2.0):  # tries at 0, 31 (after 30 s), 92 (after 60 s)
        now[0] += step
        drop.scan_once(full=True)
    assert asked == ["stuck.jpg"] * 3
    os.utime(drop.root / "stuck.jpg", (1_000_000_100, 1_000_000_100))  # changed: tried at once
    drop.scan_once(full=True)
    assert asked == ["stuck.jpg"] * 4
    monkeypatch.undo()
    now[0] += dropfolder.MOVE_RETRY_MAX_SECONDS
    assert drop.scan_once(full=True) == 1 and (drop.root / PROCESSED / "stuck.jpg").is_file()
    assert not drop._stuck


def test_lost_events_ask_for_a_full_walk(tmp_path: Path) -> None:
    """inotify's queue overflowed (a burst of files): the watcher's events for some files are
    gone, so the next scan walks the whole folder instead of waiting for the 30 s rescan."""
    from watchdog.events import EVENT_TYPE_EVENTS_LOST, FileSystemEvent

    sink = Sink()
    drop = _folder(tmp_path, sink)
    _old_files(drop.root, [b"unseen.jpg"])
    assert drop.scan_once(full=False) == 0  # nobody said it was there
    event = FileSystemEvent("")
    assert dropfolder.EVENT_TYPE_EVENTS_LOST == EVENT_TYPE_EVENTS_LOST  # our name for it (watchdog < 7.1.1 lacks it)
    event.event_type = EVENT_TYPE_EVENTS_LOST  # type: ignore[misc]
    dropfolder._Handler(drop).on_any_event(event)
    assert drop.scan_once(full=False) == 1


@pytest.mark.parametrize("refusal", [errors.StoreError("/s/store.sqlite3: the store is closed"),
                                     errors.ShuttingDown("the annotator is shutting down")])
def test_a_store_that_is_closed_leaves_the_file_for_later(tmp_path: Path, refusal: Exception) -> None:
    """A take that outlived the daemon's shutdown met a closed store; "the store is closed" is an
    AnnotatorError, so a good image went to quarantine as if it were bad. A StoreError about the
    store (not StoreFull, not an ImageError) now leaves the file where it is, like a locked one."""
    sink = Sink()
    drop = _folder(tmp_path, sink)
    real = sink.__call__
    closed = [True]

    def refusing(data: bytes, source: str, meta: dict, decoded: DecodedImage) -> None:
        if closed[0]:
            raise refusal
        real(data, source, meta, decoded)

    drop.sink = refusing
    (drop.root / "good.jpg").write_bytes(_jpeg(40))
    assert drop.scan_once() == 0
    assert (drop.root / "good.jpg").exists() and not (drop.root / QUARANTINE).exists() and drop.quarantined == 0
    closed[0] = False
    assert drop.scan_once() == 1 and (drop.root / PROCESSED / "good.jpg").is_file()


def test_a_known_probe_that_fails_leaves_the_file_for_later(tmp_path: Path) -> None:
    sink = Sink()
    broken = [True]

    def known(image_id: str) -> bool:
        if broken[0]:
            raise errors.StoreError("the store is closed")
        return False

    drop = _folder(tmp_path, sink, known=known)
    (drop.root / "good.jpg").write_bytes(_jpeg(41))
    assert drop.scan_once() == 0 and sink.got == []
    assert (drop.root / "good.jpg").exists() and not (drop.root / QUARANTINE).exists()
    broken[0] = False
    assert drop.scan_once() == 1 and len(sink.got) == 1


def test_a_store_connection_closed_under_a_take_leaves_the_file(tmp_path: Path) -> None:
    """At shutdown the store may close a connection while a take is inside a transaction: SQLite
    then raises ProgrammingError, which quarantined a good image as "ingest failed"."""
    import sqlite3

    def closed(data: bytes, source: str, meta: dict, decoded: DecodedImage) -> None:
        raise sqlite3.ProgrammingError("Cannot operate on a closed database.")

    drop = _folder(tmp_path, closed)  # type: ignore[arg-type]
    _old_files(drop.root, [b"good.jpg"])
    assert drop.scan_once() == 0 and drop.quarantined == 0 and (drop.root / "good.jpg").is_file()
    assert not (drop.root / QUARANTINE).exists() or not any((drop.root / QUARANTINE).iterdir())
