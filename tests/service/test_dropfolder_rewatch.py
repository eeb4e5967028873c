"""A drop folder moved away and made again under its name (``mv drop drop.old; mkdir drop``, a
clean-up script's way) is watched again, as one removed and made again is (found by the chaos
soak's watch probe: each file in the new folder waited for the full walk, 30 s to 10 min)."""
from __future__ import annotations

import os
from pathlib import Path

from procs import FakeClock
from service.dropfolder import DropFolder
from service.imageio import DecodedImage
from test_dropfolder_adverse import arrives


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
    drop.start()
    try:
        arrives(root, "before.jpg", 9)
        os.rename(root, tmp_path / "drop.old")
        root.mkdir()
        arrives(root, "after.jpg", 10)  # HEAD: after.jpg was not taken
        arrives(root, "later.jpg", 11)
        assert len(got) == 3
    finally:
        drop.stop()
