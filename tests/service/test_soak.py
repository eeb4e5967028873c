"""Long-run (soak) checks of the daemon's parts: what one unit of work leaves behind must not add
up over months. Each test repeats the work and counts the resource (not wall-clock time)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import cv2
import numpy as np

from service.dropfolder import DropFolder
from service.imageio import DecodedImage

EMPTY_FOLDER_SECONDS = 3600.0  # drop.remove_empty_hours = 1


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    ok, buf = cv2.imencode(".jpg", rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    assert ok
    return buf.tobytes()


def _inotify_watches() -> int:
    """Inotify watches this process holds (all its inotify descriptors together)."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if "inotify" not in os.readlink(f"/proc/self/fd/{fd}"):
                continue
            with open(f"/proc/self/fdinfo/{fd}") as f:
                n += sum(1 for line in f if line.startswith("inotify wd:"))
        except OSError:
            continue
    return n


def _subfolders(root: Path) -> list[Path]:
    return [Path(d) for d, _, _ in os.walk(root) if Path(d) != root]


def test_recording_folders_do_not_pile_up_as_folders_and_inotify_watches(tmp_path: Path) -> None:
    """A capture tool writes each recording into ``<camera>/<session>/``. Once the files are taken
    the folder is empty; it stayed for ever, and the recursive watcher held one inotify watch per
    folder: one watch and one folder more per recording, without bound (8192 watches is the
    limit on older kernels). With ``drop.remove_empty_hours`` set, an empty folder untouched that long goes at the
    next full walk; one a writer just made stays."""
    got: list[str] = []

    def sink(data: bytes, source: str, meta: dict, decoded: DecodedImage) -> None:
        got.append(source)

    drop = DropFolder(tmp_path / "drop", sink, "delete", stable_seconds=0.0,
                      remove_empty_seconds=EMPTY_FOLDER_SECONDS)
    before = _inotify_watches()
    drop._watch()  # the watcher alone: this test drives the scans (a second scanning thread took files twice)
    try:
        sessions = 40
        for k in range(sessions):
            folder = drop.root / f"cam{k % 2}" / f"session{k:03d}"
            folder.mkdir(parents=True)
            tmp = folder / ".frame.jpg.tmp"
            tmp.write_bytes(_jpeg(k))
            tmp.rename(folder / "frame.jpg")
        deadline = time.monotonic() + 30
        while len(got) < sessions and time.monotonic() < deadline:
            drop.scan_once(full=True)
            time.sleep(0.05)
        assert len(got) == sessions
        while _inotify_watches() < before + sessions and time.monotonic() < deadline:  # the watcher caught up
            time.sleep(0.05)
        assert _inotify_watches() >= before + sessions

        # Hours later: every recording folder is old and empty; one more was made just now.
        old = time.time() - EMPTY_FOLDER_SECONDS - 60
        for folder in _subfolders(drop.root):
            os.utime(folder, (old, old))
        fresh = drop.root / "cam0" / "session-new"
        fresh.mkdir()
        drop.scan_once(full=True)

        left = sorted(p.relative_to(drop.root).as_posix() for p in _subfolders(drop.root))
        assert left == ["cam0", "cam0/session-new", "cam1"]
        deadline = time.monotonic() + 10
        while _inotify_watches() > before + 4 and time.monotonic() < deadline:  # root, 2 cameras, the new one
            time.sleep(0.05)
        assert _inotify_watches() <= before + 4, "a watch per finished recording folder was kept"
    finally:
        drop.stop()


def test_retention_leaves_no_empty_recording_folders(tmp_path: Path) -> None:
    """Retention removed old files under ``processed/<camera>/<session>/`` and ``quarantine/...``
    but kept their folders: one empty folder (and, with ``processed/`` inside the drop folder,
    one inotify watch of the daemon) more per recording, for ever. An empty folder last
    changed before the cut-off goes with the pass; a folder changed since stays."""
    from service.dropfolder import REASON_SUFFIX
    from service.retention import prune_processed, prune_quarantine
    from service.store import Store

    store = Store(tmp_path / "store")
    try:
        processed, quarantine = tmp_path / "drop" / "processed", tmp_path / "drop" / "quarantine"
        for k in range(30):
            rel = Path(f"cam{k % 2}") / f"session{k:03d}"
            data = _jpeg(100 + k)
            store.ingest(data, f"drop:{rel}/frame.jpg", {})
            (processed / rel).mkdir(parents=True)
            (processed / rel / "frame.jpg").write_bytes(data)
            (quarantine / rel).mkdir(parents=True)
            (quarantine / rel / "bad.jpg").write_bytes(b"not an image")
            (quarantine / rel / f"bad.jpg{REASON_SUFFIX}").write_text("not an image\n")
        old = time.time() - 3600
        for path in [*_subfolders(quarantine), *(p for p in quarantine.rglob("*") if p.is_file())]:
            os.utime(path, (old, old))

        removed = prune_processed(store, processed, before=time.time() + 60)
        assert removed.files == 30
        assert _subfolders(processed) == [], "empty recording folders were left under processed/"

        prune_quarantine(quarantine, before=time.time() - 60)  # the files go; their folders changed just now
        assert not any(p.is_file() for p in quarantine.rglob("*"))
        for folder in _subfolders(quarantine):
            os.utime(folder, (old, old))
        (quarantine / "cam0" / "session-new").mkdir()  # made since the cut-off: stays
        prune_quarantine(quarantine, before=time.time() - 60)
        left = sorted(p.relative_to(quarantine).as_posix() for p in _subfolders(quarantine))
        assert left == ["cam0", "cam0/session-new", "cam1"], "empty recording folders were left under quarantine/"
    finally:
        store.close()


def test_empty_folders_stay_unless_asked(tmp_path: Path) -> None:
    """Off by default: a capture tool writing into fixed sub-folders made once (``<camera>/rgb/``)
    and never made again would lose its frames once an idle hour removed them."""
    drop = DropFolder(tmp_path / "drop", lambda *a: None, "delete", stable_seconds=0.0)
    fixed = drop.root / "cabin-front" / "rgb"
    fixed.mkdir(parents=True)
    old = time.time() - 10 * 24 * 3600
    os.utime(fixed, (old, old))
    drop.scan_once(full=True)
    assert fixed.is_dir()
