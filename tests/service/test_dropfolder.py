"""The drop folder on real files: what is taken, what is quarantined and why, what is ignored."""
from __future__ import annotations

import os
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from service.dropfolder import PROCESSED, QUARANTINE, DropFolder, is_temporary, write_quarantine
from service.errors import StoreFull
from service.imageio import DecodedImage


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
    sink = Sink()
    sink.full = True
    drop = _folder(tmp_path, sink)
    (drop.root / "a.jpg").write_bytes(_jpeg(5))
    assert drop.scan_once() == 0
    assert (drop.root / "a.jpg").exists() and not (drop.root / QUARANTINE).exists()
    sink.full = False
    assert drop.scan_once() == 1


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
