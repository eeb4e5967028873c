"""The drop folder's costs that grow with the files it has seen: counted in probes and decodes,
never in seconds (a shared machine's timings say nothing)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

import service.dropfolder as dropfolder
from service.dropfolder import PROCESSED, QUARANTINE, DropFolder, write_quarantine
from service.imageio import DecodedImage
from service.store import Store

from test_dropfolder import _count_decodes

COPIES = 1000  # copies of one name left by a capture tool that reuses it


def _jpeg(seed: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", np.random.default_rng(seed).integers(0, 255, (24, 32, 3), dtype=np.uint8))
    assert ok
    return buf.tobytes()


def _copies(folder: Path, stem: str, suffix: str, n: int) -> None:
    """``stem.suffix`` and ``stem-1.suffix`` .. ``stem-(n-1).suffix``, as n earlier takes left them."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}{suffix}").touch()
    for k in range(1, n):
        (folder / f"{stem}-{k}{suffix}").touch()


def _count_lexists(monkeypatch: pytest.MonkeyPatch, stem: str) -> list[str]:
    """The names ``os.path.lexists`` is asked about that start with ``stem``."""
    asked: list[str] = []
    real = os.path.lexists

    def counting(path: object) -> bool:
        name = os.path.basename(os.fsdecode(path))  # type: ignore[arg-type]
        if name.startswith(stem):
            asked.append(name)
        return real(path)  # type: ignore[arg-type]

    monkeypatch.setattr(dropfolder.os.path, "lexists", counting)
    return asked


def test_a_reused_name_is_moved_out_without_probing_every_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """cam1/latest.jpg taken for the 1001st time: ``unique_path`` tried latest-1 .. latest-1000
    one lexists at a time, O(copies) per take (127 ms per take with 20k copies). Now a
    doubling-then-halving search: O(log copies) probes, and the same name as before."""
    got: list[str] = []
    drop = DropFolder(tmp_path / "drop", lambda data, source, meta, decoded: got.append(source), stable_seconds=0.0)
    _copies(drop.root / PROCESSED / "cam1", "latest", ".jpg", COPIES)
    (drop.root / "cam1").mkdir()
    (drop.root / "cam1" / "latest.jpg").write_bytes(_jpeg(1))
    asked = _count_lexists(monkeypatch, "latest")
    assert drop.scan_once() == 1 and got == ["drop:cam1/latest.jpg"]
    assert (drop.root / PROCESSED / "cam1" / f"latest-{COPIES}.jpg").read_bytes() == _jpeg(1)
    assert len(asked) <= 2 * COPIES.bit_length() + 2, len(asked)  # 22 here; was 1001
    asked.clear()
    (drop.root / "cam1" / "latest.jpg").write_bytes(_jpeg(2))  # and the next take
    assert drop.scan_once() == 1 and (drop.root / PROCESSED / "cam1" / f"latest-{COPIES + 1}.jpg").is_file()
    assert len(asked) <= 2 * COPIES.bit_length() + 2, len(asked)


def test_a_reused_name_is_quarantined_without_probing_every_copy(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The same for quarantine/, and a retry of the same bytes (the daemon died before the store
    marked the image failed) still reuses the copy it wrote instead of adding one more name."""
    q = tmp_path / QUARANTINE
    _copies(q / "cam1", "latest", ".jpg", COPIES)
    src = tmp_path / "latest.jpg"
    src.write_bytes(b"not an image")
    asked = _count_lexists(monkeypatch, "latest")
    moved = write_quarantine(q, Path("cam1/latest.jpg"), "not an image", source=src)
    assert moved == q / "cam1" / f"latest-{COPIES}.jpg" and moved.read_bytes() == b"not an image"
    assert len([n for n in asked if not n.endswith(".reason.txt")]) <= 2 * COPIES.bit_length() + 2, len(asked)
    asked.clear()
    first = write_quarantine(q, Path("cam1/latest.jpg"), "truncated", data=b"bad bytes")
    again = write_quarantine(q, Path("cam1/latest.jpg"), "truncated again", data=b"bad bytes")
    assert first == again == q / "cam1" / f"latest-{COPIES + 1}.jpg" and again.read_bytes() == b"bad bytes"
    assert not (q / "cam1" / f"latest-{COPIES + 2}.jpg").exists()
    assert (q / "cam1" / f"latest-{COPIES + 1}.jpg.reason.txt").read_text() == "truncated again\n"
    assert len([n for n in asked if not n.endswith(".reason.txt")]) <= 2 * (2 * COPIES.bit_length() + 2)


def _store_sink(store: Store, got: list[str]):  # type: ignore[no-untyped-def]
    def sink(data: bytes, source: str, meta: dict, decoded: DecodedImage) -> None:
        got.append(source)
        store.ingest(data, source, meta)
    return sink


def _known(store: Store):  # type: ignore[no-untyped-def]
    return lambda image_id: store.get(image_id) is not None


def test_keep_mode_restart_decodes_nothing_already_stored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """processed_mode="keep" remembers what it took in memory only: after a restart every kept file
    was read, decoded and handed to the sink again (100k photos: minutes). With the store's
    ``known`` probe a file whose bytes are stored is only remembered as kept."""
    n = 30
    store = Store(tmp_path / "store")
    got: list[str] = []
    decodes = _count_decodes(monkeypatch)
    root = tmp_path / "drop"
    for i in range(n):
        (root / f"cam{i % 3}").mkdir(parents=True, exist_ok=True)
        (root / f"cam{i % 3}" / f"f{i:03d}.jpg").write_bytes(_jpeg(100 + i))
    first = DropFolder(root, _store_sink(store, got), "keep", stable_seconds=0.0, known=_known(store))
    assert first.scan_once() == n and len(decodes) == n and len(got) == n
    (root / "cam0" / "new.jpg").write_bytes(_jpeg(999))  # arrived while the daemon was down
    decodes.clear()
    got.clear()
    again = DropFolder(root, _store_sink(store, got), "keep", stable_seconds=0.0, known=_known(store))  # a restart
    assert again.scan_once() == 1 and got == ["drop:cam0/new.jpg"] and len(decodes) == 1  # was n + 1 of each
    assert again.stored_already == n and len(again._kept) == n + 1
    assert again.scan_once() == 0 and len(decodes) == 1  # kept, not looked at again
    assert len(list(root.rglob("*.jpg"))) == n + 1 and store.counts()["received"] == n + 1
    store.close()


def test_move_mode_only_moves_out_a_file_already_stored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file whose bytes are stored (a crash between the ingest and the move, the same bytes
    dropped again) is moved out without being decoded or ingested again."""
    store = Store(tmp_path / "store")
    got: list[str] = []
    data = _jpeg(7)
    store.ingest(data, "drop:a.jpg", {})
    decodes = _count_decodes(monkeypatch)
    drop = DropFolder(tmp_path / "drop", _store_sink(store, got), stable_seconds=0.0, known=_known(store))
    (drop.root / "a.jpg").write_bytes(data)
    (drop.root / "b.jpg").write_bytes(_jpeg(8))
    assert drop.scan_once() == 1 and got == ["drop:b.jpg"] and len(decodes) == 1
    assert (drop.root / PROCESSED / "a.jpg").read_bytes() == data and not (drop.root / "a.jpg").exists()
    assert drop.stored_already == 1 and not (drop.root / QUARANTINE).exists()
    store.close()


def test_full_walks_are_spaced_by_their_own_cost_not_by_the_time_taking_files(tmp_path: Path) -> None:
    """Keep mode makes the drop folder an archive that every full walk stats again (100k files:
    3.4 s of CPU a walk, 11 % of a core every 30 s). A walk's own cost sets the next one's
    distance (50 times it, 30 s to 10 min); the time spent taking new files does not count."""
    from service.dropfolder import RESCAN_MAX_SECONDS, RESCAN_SECONDS, rescan_interval

    assert rescan_interval(0.0) == rescan_interval(0.5) == RESCAN_SECONDS
    assert rescan_interval(3.4) == pytest.approx(170.0)
    assert rescan_interval(60.0) == RESCAN_MAX_SECONDS

    class SlowSink:
        def __call__(self, data: bytes, source: str, meta: dict, decoded: object) -> None:
            time.sleep(0.3)  # a slow ingest: fsyncs on a busy disk

    root = tmp_path / "drop"
    (root / "cam1").mkdir(parents=True)
    for n in range(3):
        cv2.imwrite(str(root / "cam1" / f"{n}.png"), np.full((16, 16, 3), n, np.uint8))
    drop = DropFolder(root, SlowSink(), "keep", stable_seconds=0.0)  # type: ignore[arg-type]
    assert drop.scan_once(full=True) == 3
    assert drop.walk_seconds < 0.3  # the 0.9 s of ingest is not the walk's
    assert drop.scan_once(full=True) == 0
    assert drop.walk_seconds < 0.3


def test_the_watch_loop_walks_at_start_then_by_the_walks_cost_and_at_once_when_events_were_lost(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop itself, on its own thread: the first scan walks the folder; a walk that cost 2 s
    spaces the next by 100 s of the (fake) clock, scans between do not walk; lost events ask for
    a walk at once."""
    import threading

    from procs import FakeClock

    clock = FakeClock()
    root = tmp_path / "drop"
    root.mkdir()
    drop = DropFolder(root, lambda *a: None, "move", stable_seconds=0.0, poll_interval=0.01, clock=clock)  # type: ignore[arg-type]
    scans: list[tuple[float, bool]] = []  # (clock, walked)
    lock = threading.Lock()
    real_scan, real_walk = drop.scan_once, drop._walk
    walked = [False]

    def walk() -> list[Path]:
        walked[0] = True
        return real_walk()

    def scan_once(full: bool = True) -> int:
        walked[0] = False
        n = real_scan(full)
        with lock:
            scans.append((clock.t, walked[0]))
        if walked[0]:
            drop.walk_seconds = 2.0  # as if the walk had cost 2 s of CPU: the next in 100 s
        clock.t += 10.0
        return n

    monkeypatch.setattr(drop, "_walk", walk)
    monkeypatch.setattr(drop, "scan_once", scan_once)

    def wait_for(n: int) -> list[tuple[float, bool]]:
        deadline = time.monotonic() + 20
        while True:
            with lock:
                if len(scans) >= n:
                    return list(scans)
            assert time.monotonic() < deadline
            time.sleep(0.01)

    drop.start()
    try:
        first = wait_for(25)[:25]
        t0 = first[0][0]
        assert [w for _, w in first] == [(t - t0) % 100.0 == 0.0 for t, _ in first]  # at 0, 100, 200 s
        with lock:
            seen = len(scans)
        drop.request_full_scan()  # watchdog's events_lost
        later = wait_for(seen + 2)[seen:seen + 2]
        assert later[0][1] or later[1][1]  # at the next scan (or the one after, if one was running)
    finally:
        drop.stop()
