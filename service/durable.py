"""Durable file writes: a temporary file in the target folder, fsync, rename (DESIGN: practices).

A reader never sees a half-written file: the data goes to a hidden ``.<name>.<random>.tmp``
next to the target (same file system, so the rename is atomic), is flushed and fsynced, and
only then renamed over the target. On any error the temporary file is removed and the old
target, if any, stays as it was. The rename itself survives a power loss only once the folder
is fsynced too: pass ``sync_dir=True``, or call ``fsync_dir`` once after a batch of writes
(one directory sync instead of one per file). A folder filled with plain writes (a bundle
downloaded or copied) is made durable as a whole with ``fsync_tree`` before it is renamed into
place.

Temporary names start with ``.`` and end with ``.tmp``, which the drop folder and the local
object store skip as work in progress.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

__all__ = ["atomic_file", "fsync_dir", "fsync_tree", "make_dirs", "write_bytes_atomic", "write_json_atomic"]

# Temporary names keep only the start of the target's name: a long name plus the random part
# and the suffix must stay under the file system's limit on name length.
_NAME_KEPT = 24


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(folder: Path | str) -> None:
    """fsync a folder, so that the renames and creations inside it survive a power loss."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(folder: Path | str) -> None:
    """Create ``folder`` and its missing parents (``mkdir -p``), each new folder's name made
    durable: the parent of every folder created here is fsynced. A file fsynced, renamed into a
    new folder and the folder fsynced is otherwise not on disk for POSIX until the new folder's
    own entry is (ext4 commits both in one journal transaction; other file systems need not).
    Costs nothing where the folder exists already (one stat)."""
    folder = Path(folder)
    missing: list[Path] = []
    p = folder
    while not p.is_dir() and p.parent != p:
        missing.append(p)
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    for parent in dict.fromkeys(m.parent for m in reversed(missing)):
        fsync_dir(parent)


def fsync_tree(path: Path | str) -> None:
    """fsync every file and folder under ``path`` (``path`` included), then its parent.

    For a folder written with plain writes and then renamed into place: without it a power
    loss can keep the rename but bring the files back empty (ext4's delayed allocation).
    Files first, then the folders from the deepest up, so that each folder's entries name
    data that is on disk. Symbolic links are not followed."""
    path = Path(path)
    for folder, dirs, files in os.walk(path, topdown=False):
        for name in files:
            file = os.path.join(folder, name)
            if os.path.islink(file):
                continue
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(folder)
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_file(path: Path | str, *, sync_dir: bool = False) -> Iterator[IO[bytes]]:
    """A binary file object whose content replaces ``path`` when the block ends without error.

    The parent folder is created when missing (with ``sync_dir``, durably: ``make_dirs``). An
    exception inside the block (e.g. a checksum that does not match what was streamed) removes
    the temporary file and leaves ``path`` alone.
    """
    path = Path(path)
    if sync_dir:  # durable down to the folder: a folder made for it too (``make_dirs``)
        make_dirs(path.parent)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:_NAME_KEPT]}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; the finished file gets the usual mode (0666 less the umask),
        # so that sidecars, bundles and exports can be read by the group that shares them.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def write_bytes_atomic(path: Path | str, data: bytes, *, sync_dir: bool = False) -> None:
    """Write ``data`` to ``path`` durably (temporary file, fsync, rename; see the module doc)."""
    with atomic_file(path, sync_dir=sync_dir) as f:
        f.write(data)


# An indented JSON array holding numbers only (JSON strings never hold a raw newline, so this
# cannot match inside one).
_NUMBER_ARRAY = re.compile(r"\[\n\s*(-?[0-9][0-9.eE+-]*(?:,\n\s*-?[0-9][0-9.eE+-]*)*)\n\s*\]")


def json_text(data: Any, *, flat_number_lists: bool = False) -> str:
    """``data`` as JSON (indent 2, keys in the given order, a final newline). With
    ``flat_number_lists`` every array of plain numbers sits on one line (a matrix: one row per
    line): a bundle's calibration weights take 1,400 lines instead of 120,000."""
    text = json.dumps(data, indent=2, sort_keys=False)
    if flat_number_lists:
        text = _NUMBER_ARRAY.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)
    return text + "\n"


def write_json_atomic(path: Path | str, data: Any, *, sync_dir: bool = False, flat_number_lists: bool = False) -> None:
    """Write ``json_text(data)`` durably."""
    write_bytes_atomic(path, json_text(data, flat_number_lists=flat_number_lists).encode("utf-8"), sync_dir=sync_dir)
