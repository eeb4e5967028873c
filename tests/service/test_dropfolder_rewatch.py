"""A drop folder moved away and made again under its name (``mv drop drop.old; mkdir drop``, a
clean-up script's way) is watched again, as one removed and made again is (found by the chaos
soak's watch probe: each file in the new folder waited for the full walk, 30 s to 10 min)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import cv2
import numpy as np

from procs import FakeClock
from service.dropfolder import PROCESSED, DropFolder
from service.imageio import DecodedImage


def _jpeg(seed: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    assert ok
    return buf.tobytes()


def test_a_drop_folder_moved_away_and_made_again_is_watched_again(tmp_path: Path) -> None:
    """Watchdog's watcher follows its folder's inode: moved away, the folder was still watched
    where it went (the watcher alive, so never replaced) and the new folder under the name not at
    all. The clock here never moves, so only the watcher can bring the files in."""
    got: list[bytes] = []

    def sink(data: bytes, source: str, meta: dict, decoded: DecodedImage) -> None:
        got.append(data)

    root = tmp_path / "drop"
    drop = DropFolder(root, sink, "move", stable_seconds=0.0, max_bytes=200_000, max_pixels=1_000_000,
                      poll_interval=0.02, clock=FakeClock())

    def arrives(name: str, seed: int) -> None:
        tmp = root / f".{name}"
        tmp.write_bytes(_jpeg(seed))
        os.replace(tmp, root / name)
        deadline = time.monotonic() + 20
        while not (root / PROCESSED / name).exists():
            assert time.monotonic() < deadline, f"{name} was not taken"  # HEAD: after.jpg was not taken
            time.sleep(0.02)

    drop.start()
    try:
        arrives("before.jpg", 9)
        os.rename(root, tmp_path / "drop.old")
        root.mkdir()
        arrives("after.jpg", 10)
        arrives("later.jpg", 11)
        assert len(got) == 3
    finally:
        drop.stop()
