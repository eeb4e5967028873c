"""The drop folder against capture tools that misbehave: files deleted or replaced while they are
taken, names at the length limit, processed/ on another file system, a folder removed under the
walk, the drop folder itself removed and made again."""
from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import pytest

import service.dropfolder as dropfolder
from procs import FakeClock
from service.dropfolder import NAME_MAX, PROCESSED, QUARANTINE, REASON_SUFFIX, DropFolder
from service.imageio import DecodedImage


def _jpeg(seed: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    assert ok
    return buf.tobytes()


class Sink:
    """Collects the bytes ingested; ``during`` runs inside the ingest (a writer acting meanwhile)."""

    def __init__(self) -> None:
        self.got: list[bytes] = []
        self.during = lambda: None

    def __call__(self, data: bytes, source: str, meta: dict, decoded: DecodedImage) -> None:
        self.got.append(data)
        during, self.during = self.during, lambda: None
        during()


def _folder(root: Path, sink: Sink, mode: str = "move", **kw: object) -> DropFolder:
    return DropFolder(root, sink, mode, stable_seconds=0.0,  # type: ignore[arg-type]
                      max_bytes=200_000, max_pixels=1_000_000, **kw)


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir())


def _rename_over(path: Path, data: bytes, mtime_ns: int | None = None) -> None:
    """What a capture tool's atomic writer does: a temporary name, then a rename over ``path``."""
    tmp = path.with_name(f".{path.name}.new")
    tmp.write_bytes(data)
    if mtime_ns is not None:
        os.utime(tmp, ns=(mtime_ns, mtime_ns))
    os.replace(tmp, path)


def test_a_file_deleted_while_it_is_taken_is_left_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deleted between the scan's lstat and the read: it was quarantined as unreadable, which left
    a reason file with no image beside it, counted a quarantine and logged a failed move."""
    sink = Sink()
    drop = _folder(tmp_path / "drop", sink)
    (drop.root / "a.jpg").write_bytes(_jpeg(1))
    real = drop._take

    def take(path: Path, rel: Path, st: os.stat_result) -> int:
        path.unlink()  # the capture tool takes it back
        return real(path, rel, st)

    monkeypatch.setattr(drop, "_take", take)
    assert drop.scan_once() == 0
    assert _files(drop.root) == [] and drop.quarantined == 0 and not drop._stuck


@pytest.mark.parametrize("mode", ["move", "delete"])
def test_a_file_replaced_while_it_is_taken_is_taken_too(tmp_path: Path, mode: str) -> None:
    """A new file renamed over the name during the ingest was moved to processed/ (or deleted) as
    if it had been ingested: lost. Now it stays, and the next scan takes it."""
    sink = Sink()
    drop = _folder(tmp_path / "drop", sink, mode)
    old, new = _jpeg(2), _jpeg(3)
    (drop.root / "cam").mkdir(parents=True)
    (drop.root / "cam" / "latest.jpg").write_bytes(old)
    sink.during = lambda: _rename_over(drop.root / "cam" / "latest.jpg", new)
    assert drop.scan_once() == 1
    assert (drop.root / "cam" / "latest.jpg").read_bytes() == new  # was gone
    assert drop.scan_once(full=False) == 1  # from the dirty set, no full walk needed
    assert sink.got == [old, new]  # the old bytes are in the store; the rename removed the file
    assert _files(drop.root) == (["processed/cam/latest.jpg"] if mode == "move" else [])
    if mode == "move":
        assert (drop.root / PROCESSED / "cam" / "latest.jpg").read_bytes() == new


def test_a_good_file_replacing_a_bad_one_is_not_quarantined_in_its_place(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    sink = Sink()
    drop = _folder(tmp_path / "drop", sink)
    good = _jpeg(4)
    (drop.root / "a.jpg").write_bytes(b"not an image")
    real = dropfolder.decode_image

    def decode(data: bytes, **kw: object) -> DecodedImage:
        _rename_over(drop.root / "a.jpg", good)  # the tool rewrites the frame it botched
        monkeypatch.setattr(dropfolder, "decode_image", real)
        return real(data, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(dropfolder, "decode_image", decode)
    assert drop.scan_once() == 0 and drop.quarantined == 0
    assert drop.scan_once(full=False) == 1 and sink.got == [good]
    assert _files(drop.root) == ["processed/a.jpg"]


def test_keep_mode_takes_a_file_replaced_with_the_same_size_and_mtime(tmp_path: Path) -> None:
    """``rsync -t`` renames a new file over the old one and gives it the old one's mtime: with
    fixed-size frames (BMP) it looked like the file kept already, and was never taken."""
    sink = Sink()
    drop = _folder(tmp_path / "drop", sink, "keep")
    first, second = (cv2.imencode(".bmp", np.full((8, 8, 3), v, np.uint8))[1].tobytes() for v in (10, 200))
    assert len(first) == len(second)
    path = drop.root / "frame.bmp"
    path.write_bytes(first)
    assert drop.scan_once() == 1
    _rename_over(path, second, mtime_ns=os.lstat(path).st_mtime_ns)
    assert drop.scan_once() == 1 and sink.got == [first, second]
    assert drop.scan_once() == 0


def test_names_at_the_length_limit_are_quarantined_and_moved_out_again(tmp_path: Path) -> None:
    """``name.reason.txt`` and ``name-1.jpg`` of a 245-255 byte name are over the 255 bytes a
    name may have: the file was retried for ever, neither quarantined nor moved out."""
    sink = Sink()
    drop = _folder(tmp_path / "drop", sink)
    bad, reused = "b" * 247 + ".jpg", "ü" * 125 + ".jpg"  # 251 and 254 bytes
    (drop.root / bad).write_bytes(b"not an image")
    for seed in (5, 6):
        (drop.root / reused).write_bytes(_jpeg(seed))
        assert drop.scan_once() == 1
    assert drop.quarantined == 1 and not drop._stuck and not (drop.root / bad).exists()
    assert not (drop.root / reused).exists() and len(sink.got) == 2
    assert all(len(os.fsencode(p.name)) <= NAME_MAX for p in drop.root.rglob("*"))
    assert len(list((drop.root / PROCESSED).glob("*.jpg"))) == 2
    (reason,) = (drop.root / QUARANTINE).glob(f"*{REASON_SUFFIX}")
    assert reason.read_text(encoding="utf-8").endswith(f"(dropped as {bad})\n")
    assert reason.with_name(reason.name[:-len(REASON_SUFFIX)]).read_bytes() == b"not an image"


def _other_fs(tmp_path: Path) -> Path:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev or not os.access(shm, os.W_OK):
        pytest.skip("needs /dev/shm on a file system of its own")
    return Path(os.path.realpath(shm))


@contextlib.contextmanager
def split_drop(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A drop folder ``tmp_path/drop`` whose processed/ and quarantine/ lie on another file system
    (links into a folder there, removed after the test): yields (drop folder, that folder)."""
    other = _other_fs(tmp_path) / f"dropfolder-test-{os.getpid()}-{time.monotonic_ns()}"
    other.mkdir()
    try:
        root = tmp_path / "drop"
        root.mkdir()
        for name in (PROCESSED, QUARANTINE):
            (other / name).mkdir()
            (root / name).symlink_to(other / name)
        yield root, other
    finally:
        shutil.rmtree(other)


def arrives(root: Path, name: str, seed: int) -> None:
    """Write a JPEG into the drop folder as capture tools do (a hidden name, then a rename) and wait
    until it is in processed/."""
    tmp = root / f".{name}"
    tmp.write_bytes(_jpeg(seed))
    os.replace(tmp, root / name)
    deadline = time.monotonic() + 20
    while not (root / PROCESSED / name).exists():
        assert time.monotonic() < deadline, f"{name} was not taken"
        time.sleep(0.02)


def test_processed_and_quarantine_on_another_file_system(tmp_path: Path) -> None:
    """processed/ on a mount of its own: every os.replace failed with EXDEV, and every file was
    retried for ever, ingested but never moved out."""
    with split_drop(tmp_path) as (root, other):
        sink = Sink()
        drop = _folder(root, sink)
        (root / "cam").mkdir()
        (root / "cam" / "a.jpg").write_bytes(_jpeg(7))
        (root / "cam" / "b.jpg").write_bytes(b"not an image")
        assert drop.scan_once() == 1
        assert not drop._stuck and _files(root / "cam") == []
        assert (other / PROCESSED / "cam" / "a.jpg").read_bytes() == _jpeg(7)
        assert (other / QUARANTINE / "cam" / "b.jpg").read_bytes() == b"not an image"
        assert [p.name for p in other.rglob(".*")] == []  # no temporary copy left

        # a kill after the copy was renamed into place and before the original was removed:
        # the next start finds both, and the copy is reused, not doubled as a-1.jpg
        (root / "cam" / "a.jpg").write_bytes(_jpeg(7))
        again = _folder(root, sink, known=lambda image_id: True)
        assert again.scan_once() == 0 and again.stored_already == 1
        assert _files(other / PROCESSED) == ["cam/a.jpg"] and _files(root / "cam") == []


def test_a_folder_removed_during_the_walk_does_not_end_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The walk listed every folder a second time (for links to folders): a folder a capture tool
    removed in between raised out of the walk, and no file of that scan was taken."""
    sink = Sink()
    drop = _folder(tmp_path / "drop", sink)
    (drop.root / "gone").mkdir()
    (drop.root / "gone" / ".part").write_bytes(b"x")
    (drop.root / "z.jpg").write_bytes(_jpeg(8))
    real = os.walk

    def walk(top: str, **kw: object):  # type: ignore[no-untyped-def]
        for here, dirs, files in real(top, **kw):  # type: ignore[call-overload]
            if here.endswith("gone"):
                shutil.rmtree(here)
            yield here, dirs, files

    monkeypatch.setattr(dropfolder.os, "walk", walk)
    assert drop.scan_once() == 1 and len(sink.got) == 1


def test_a_drop_folder_removed_and_made_again_is_watched_again(tmp_path: Path) -> None:
    """Watchdog's watcher ends with its folder: files written into the folder made again were found
    only by the full walks (30 s to 10 min). The clock here never moves, so only the watcher can
    bring them in."""
    sink = Sink()
    root = tmp_path / "drop"
    drop = _folder(root, sink, poll_interval=0.02, clock=FakeClock())
    drop.start()
    try:
        arrives(root, "before.jpg", 9)
        shutil.rmtree(root)
        deadline = time.monotonic() + 20
        while all(e.is_alive() for e in drop._observer.emitters):  # type: ignore[union-attr]
            assert time.monotonic() < deadline
            time.sleep(0.02)
        root.mkdir()
        arrives(root, "after.jpg", 10)
        assert len(sink.got) == 2
    finally:
        drop.stop()


def test_a_file_gone_at_the_move_is_not_a_permission_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """Taken by another process (or by its writer) between the last look and the move: the move's
    ENOENT was logged as an error telling the user to grant write permission, and the path was
    held for a retry in 30 s. It is nothing to fix: logged as what happened, nothing held."""
    sink = Sink()
    drop = _folder(tmp_path / "drop", sink)
    (drop.root / "a.jpg").write_bytes(_jpeg(3))
    real_move = dropfolder.move_file

    def move(src: Path, dest: Path) -> None:
        os.unlink(src)  # another process's rename got there first
        real_move(src, dest)

    monkeypatch.setattr(dropfolder, "move_file", move)
    with caplog.at_level("INFO", logger="service.dropfolder"):
        drop.scan_once()
    assert len(sink.got) == 1 and not drop._stuck
    assert "permission" not in caplog.text and "was gone when it was to be moved" in caplog.text
