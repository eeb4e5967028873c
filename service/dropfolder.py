"""The drop folder: images written into a directory are ingested, then moved out of the way.

Writers should use the **rename-into-place convention**: write to a temporary name in the same
folder (``.name.jpg``, ``name.jpg.tmp``, ``name.jpg.part`` or ``~name.jpg``, all ignored, as are
the other ``TEMP_SUFFIXES`` of common transfer tools, in any case), then rename to the final
name, which is atomic on one file system. Writers that cannot rename are handled by a
stability check: a file is taken only when its size and mtime have not changed for
``stable_seconds`` (or its mtime is already that old).

Layout under the folder ``root``::

    <anything>/<name>.jpg          taken (nested folders too; the first folder of a nested
                                   path is recorded as the camera name)
    processed/<same relative path> the original after ingestion (``processed_mode="move"``)
    quarantine/<relative path>     files that cannot be used, each with ``<name>.reason.txt``

``processed/`` and ``quarantine/`` are never ingested. Files that arrived while the daemon
was down are found by the start-up scan; a periodic rescan covers missed watchdog events.
Order of work per file: validate (size, readable), dispose of it at once when the store holds
its bytes already (``known``), validate (decodable, pixel limit), ingest the bytes into the
store, then move/keep/delete the original. A crash between ingest and the move is
harmless: on restart the file is found stored already and is only moved out.

With a ``known`` probe (the daemon passes one that asks its store) a file whose bytes the store holds already
is not decoded nor handed to the sink, only disposed of: in ``processed_mode="keep"`` the files
taken are remembered in memory only, so after a restart every kept file came again, and each was
decoded and ingested anew (100k files: minutes of decoding for photos); now each is read and
hashed once per start, nothing more. A new file is hashed twice, by the probe and again by
``Store.ingest`` (the sink takes bytes, and the store computes the content address itself): the
second sha256 was measured at 1-3 % of a take (0.04-1.2 ms against 5-40 ms of decode, fsyncs
and the move per 80 KB-1 MB JPEG; up to 6 % on a CPU without SHA instructions), not worth a
store that trusts an id handed in by its caller.

Writers that misbehave: a file deleted while it is taken is left alone (not quarantined as
unreadable); a file replaced under the same name while it is taken (its bytes ingested, a new
file renamed over it) is not moved out, deleted or quarantined in its place: the new file stays
and is taken next (the check is on the inode, just before the move; what is left is the
microseconds between that check and the rename). ``processed/`` and ``quarantine/`` may be on
another file system (a copy under a temporary name, fsynced and renamed into place, then the
original removed: a kill leaves the original, or both, never a part). A name too long for
``name-N`` or ``.reason.txt`` (the limit is 255 bytes) is shortened there. A drop folder removed
and made again is watched again.

One file never holds up the others: whatever one file raises is logged and the scan goes on
(an ingest that fails for a reason of its own quarantines the file; a store that cannot be
reached right now, or is closed at shutdown, leaves it for the next scan). File names need not
be valid UTF-8 (a FAT card or an SMB share may write Latin-1): the store, the logs and the
reason files get them with the undecodable bytes written as ``\\xNN`` (``text_name``), the file
system keeps the real name.

While the store refuses ingest (disk below its floor, or full), nothing is read or decoded: the
``paused`` probe is asked once per scan, and after a ``StoreFull`` the scan stops and no file is
looked at again for ``pause_retry_seconds``; the files wait where they are.
"""
from __future__ import annotations

import errno
import logging
import math
import os
import re
import shutil
import sqlite3
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from watchdog.events import EVENT_TYPE_CLOSED_NO_WRITE, EVENT_TYPE_OPENED, FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

try:  # Linux; see _DropWatchGroup
    from watchdog.observers.inotify import InotifyEmitter, InotifyObserver, InotifyWatchGroup
    from watchdog.version import VERSION_INFO as WATCHDOG_VERSION
except ImportError:  # pragma: no cover - another platform's watchdog observer
    InotifyWatchGroup = None  # type: ignore[assignment,misc]

from .durable import fsync_dir, make_dirs, write_bytes_atomic
from .errors import (AnnotatorError, ImageError, ShuttingDown, StoreError, StoreFull, StoreUnavailable, is_disk_full,
                     is_io_fault, store_write_error)
from .imageio import DecodedImage, decode_image
from .store import image_id_of

log = logging.getLogger(__name__)

PROCESSED, QUARANTINE = "processed", "quarantine"
PROCESSED_MODES = ("move", "keep", "delete")
REASON_SUFFIX = ".reason.txt"  # beside each quarantined file
# Names a writer is still working on, compared in lower case: Windows' GetTempFileName makes
# NAME.TMP, and WinSCP (.filepart), Chromium (.crdownload), rclone (.partial) and Safari
# (.download) write under names of their own; a transfer stalled past stable_seconds on a slow
# link had its first half taken and quarantined as an image, the rest then arriving alone.
TEMP_SUFFIXES = (".tmp", ".part", ".filepart", ".crdownload", ".partial", ".download", REASON_SUFFIX)
RESCAN_SECONDS = 30.0
# The full walk is the safety net for files no event announced (a share written by another host
# raises no inotify event here). In keep mode the drop folder is also the archive, and the walk
# stats every file ever dropped: 100k files cost 3.4 s of CPU per walk, 11 % of a core at one
# walk per 30 s. So a walk comes at most every RESCAN_SECONDS and at least every
# RESCAN_MAX_SECONDS, spaced so that its own cost (this thread's CPU time outside taking files)
# stays within 1 / WALK_SPACING of the time (``rescan_interval``).
RESCAN_MAX_SECONDS, WALK_SPACING = 600.0, 50.0
WATCH_RETRY_SECONDS = 3600.0  # inotify's watch limit reached: how often watching is tried again
PAUSE_RETRY_SECONDS = 5.0  # after a StoreFull, how long no file is read or decoded
MOVE_RETRY_SECONDS, MOVE_RETRY_MAX_SECONDS = 30.0, 1800.0  # a file that cannot be moved out: back-off
NAME_MAX = 255  # bytes in one name (ext4, XFS, btrfs, tmpfs...)
_NAME_ROOM = len("-") + 12 + len(REASON_SUFFIX)  # what unique_path and a reason file add to a name

# sink(data, source, meta, decoded) ingests the bytes; raises StoreFull when ingest is paused.
Sink = Callable[[bytes, str, dict, DecodedImage], object]


def text_name(path: Path | str) -> str:
    """``path`` as text that is always valid UTF-8, for the store, logs and reason files.

    Python keeps the bytes of a name that is not valid UTF-8 as lone surrogates, which SQLite,
    JSON consumers and UTF-8 log files refuse; here each such byte becomes ``\\xNN`` instead.
    """
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def rescan_interval(walk_seconds: float) -> float:
    """Seconds from one full walk's start to the next: ``WALK_SPACING`` times what the last one
    cost, within [RESCAN_SECONDS, RESCAN_MAX_SECONDS] (see RESCAN_MAX_SECONDS)."""
    return min(max(RESCAN_SECONDS, WALK_SPACING * walk_seconds), RESCAN_MAX_SECONDS)


def temporary_name(name: str) -> bool:
    """True for a name a writer is still working on: hidden, ``~``, or ending in a
    ``TEMP_SUFFIXES`` in any case (``F1.TMP``, ``frame.JPG.PART``)."""
    return name.startswith((".", "~")) or name.lower().endswith(TEMP_SUFFIXES)


def is_temporary(rel: Path) -> bool:
    """True for paths a writer is still working on (any component a ``temporary_name``)."""
    return any(temporary_name(p) for p in rel.parts)


def _same_fs(a: Path, b: Path) -> bool:
    try:
        return os.lstat(a).st_dev == os.stat(b).st_dev
    except OSError:
        return False


def unique_path(path: Path, reuse: Callable[[Path], bool] | None = None) -> Path:
    """``path``, or ``name-N.ext`` for a free ``N`` when it exists already; an existing one for
    which ``reuse`` says yes is returned as it is.

    ``N`` is found by doubling, then bisecting between the last name taken and the first free one
    (``name-1``, ``-2``, ``-4``, ``-8``... then halves), not by trying 1, 2, 3...: a capture tool that
    reuses a name (``cam1/latest.jpg``, numbering that restarts daily) leaves thousands of copies
    in ``processed/``, and trying each one cost every take O(copies) (127 ms with 20k). Now
    O(log copies), with no state to lose at a restart. Where copies ``1..k`` are all there, as a
    capture tool leaves them, ``N`` is ``k+1`` as before; where some were deleted, ``N`` may fill
    a gap, free all the same. The search is deterministic, so a retry in the same folder probes
    the name the first try took, and ``reuse`` gets to accept it (``write_quarantine``).
    """
    def named(n: int) -> Path:
        return path if n == 0 else path.with_name(f"{path.stem}-{n}{path.suffix}")

    def probe(n: int) -> tuple[bool, bool]:  # (free or reusable, reusable)
        candidate = named(n)
        if not os.path.lexists(candidate):
            return True, False
        same = reuse is not None and reuse(candidate)
        return same, same

    if probe(0)[0]:
        return path
    taken, free = 0, 1  # named(taken) is in use; named(free) is the next to look at
    while True:
        usable, same = probe(free)
        if same:
            return named(free)
        if usable:
            break
        taken, free = free, free * 2
    while free - taken > 1:
        mid = (taken + free) // 2
        usable, same = probe(mid)
        if same:
            return named(mid)
        taken, free = (taken, mid) if usable else (mid, free)
    return named(free)


def fit_name(path: Path) -> Path:
    """``path`` with its last name cut (its extension kept) so that ``name-N`` and
    ``name.reason.txt`` stay within ``NAME_MAX`` bytes: a dropped name of 245-255 bytes could
    otherwise never be quarantined, nor moved out a second time, and was retried for ever."""
    raw = os.fsencode(path.name)
    if len(raw) <= NAME_MAX - _NAME_ROOM:
        return path
    ext = os.fsencode(path.suffix)
    ext = ext if len(ext) <= 16 else b""
    return path.with_name(os.fsdecode(raw[:NAME_MAX - _NAME_ROOM - len(ext)] + ext))


def move_file(source: Path, dest: Path) -> None:
    """Move ``source`` (a file or a symbolic link) to ``dest``, whose folder exists.

    On one file system a rename. Across file systems (``processed/`` a mount of its own) a copy
    under a temporary name beside ``dest``, fsynced and renamed into place, then ``source``
    removed: a kill at any point leaves ``source``, or both, never part of ``dest``. The folder
    of ``dest`` is fsynced before ``source`` goes: the two file systems commit on their own, and a
    power cut kept the removal of the original but lost the rename, so the file was left only as
    the hidden temporary copy (found with a real cut, ``tests/service/test_power_order.py``)."""
    if _same_fs(source, dest.parent):
        os.replace(source, dest)
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name[:24]}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        if os.path.islink(source):
            os.unlink(tmp)
            os.symlink(os.readlink(source), tmp)
        else:
            shutil.copy2(source, tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    os.unlink(source)


def _holds(data: bytes) -> Callable[[Path], bool]:
    return lambda p: p.is_file() and not p.is_symlink() and p.stat().st_size == len(data) and p.read_bytes() == data


def _holds_file(source: Path) -> Callable[[Path], bool]:
    """``_holds`` for the bytes of the file ``source`` (a link: the same target), read only for a
    candidate of its size. Byte for byte every time: ``filecmp.cmp`` answers from a cache keyed on
    (size, mtime), and a second raw frame of the same size and a 2-second FAT mtime took the
    quarantined copy of the first for its own and replaced it."""
    def same(p: Path) -> bool:
        if os.path.islink(source) or p.is_symlink():
            return os.path.islink(source) and p.is_symlink() and os.readlink(source) == os.readlink(p)
        try:
            if not p.is_file() or p.stat().st_size != source.stat().st_size:
                return False
            with open(p, "rb") as a, open(source, "rb") as b:
                while True:
                    x, y = a.read(1 << 20), b.read(1 << 20)
                    if x != y:
                        return False
                    if not x:
                        return True
        except OSError:
            return False
    return same


def quarantine_dir(drop_folder: Path | str | None, store_root: Path | str) -> Path:
    """Where failed and refused images go: ``<drop folder>/quarantine``, else ``<store root>/quarantine``."""
    return Path(drop_folder) / QUARANTINE if drop_folder else Path(store_root) / QUARANTINE


def write_quarantine(qdir: Path, rel: Path, reason: str, source: Path | None = None, data: bytes | None = None) -> Path:
    """Move ``source`` (or write ``data``) to ``qdir/rel`` and write ``<name>.reason.txt`` beside it.

    Safe against a kill at any point: the reason file is written first, so a quarantined image
    never lacks its reason (a leftover reason file without its image is overwritten when the image
    comes again); both writes are atomic, so nothing half-written is left; and ``data`` that is
    already quarantined byte for byte under the name (the daemon died after writing the copy and
    before the store marked the image failed, so the image is tried again) reuses that copy
    instead of adding ``name-1``. So does a ``source`` moved to another file system (a copy, then
    the original removed): a kill between the two left both, and the restart quarantined the
    original again as ``name-1`` (one file dropped, two in quarantine). Safe against a power cut
    too: the folders made, the reason file and the copy are on disk (fsynced, their folder
    too) before this returns, and across file systems before the original is removed
    (``move_file``).
    """
    target = fit_name(qdir / rel)
    if target.name != (qdir / rel).name:
        reason = f"{reason.rstrip()}\n(dropped as {text_name(rel.name)})"
    reuse = _holds(data) if data is not None else None
    make_dirs(target.parent)
    if source is not None and not _same_fs(source, target.parent):
        reuse = _holds_file(source)
    dest = unique_path(target, reuse)
    reason_file = dest.with_name(dest.name + REASON_SUFFIX)
    write_bytes_atomic(reason_file, (reason.rstrip() + "\n").encode("utf-8", "backslashreplace"))
    if source is not None:
        move_file(source, dest)
    elif data is not None and not dest.is_file():
        write_bytes_atomic(dest, data)
    fsync_dir(dest.parent)  # the renames of the reason file and of the copy
    log.warning("quarantined %s: %s", text_name(rel), text_name(reason))
    return dest


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    since: float  # monotonic time when this size/mtime was first seen


# inotify events that say nothing about a file's content or presence. The daemon's own read of a
# file raises them: reacting to them turned every retry of a file that cannot be moved out
# (a folder the service user cannot write) into the next one at once, a core at 100 %.
_IGNORED_EVENTS = frozenset({EVENT_TYPE_OPENED, EVENT_TYPE_CLOSED_NO_WRITE})
EVENT_TYPE_EVENTS_LOST = "events_lost"  # watchdog 7.1.1+ reports an inotify overflow so (7.0 does not)


class _Handler(FileSystemEventHandler):
    def __init__(self, folder: "DropFolder") -> None:
        self.folder = folder

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type == EVENT_TYPE_EVENTS_LOST:  # the kernel's queue overflowed: look at everything
            self.folder.request_full_scan()
            return
        if event.event_type in _IGNORED_EVENTS or (event.is_directory and event.event_type != "moved"):
            return
        for p in (event.src_path, getattr(event, "dest_path", "")):
            if p:
                self.folder.notify(Path(os.fsdecode(p)))


_NOT_WATCHED = (os.fsencode(PROCESSED), os.fsencode(QUARANTINE))

if InotifyWatchGroup is not None:
    class _DropWatchGroup(InotifyWatchGroup):
        """watchdog's recursive inotify watch, less ``processed/`` and ``quarantine/``.

        Each folder watched costs one of the user's inotify watches (``fs.inotify.max_user_watches``:
        8192 on kernels before 5.11), and ``processed/`` mirrors every recording folder ever
        taken (``<camera>/<session>/``) and keeps it: 2000 recordings held 4013 watches, their
        empty folders in the drop area plus the mirrors nobody needs events from (the walk and
        ``_relative`` skip both folders). watchdog has no setting that leaves a subtree out;
        every watch it adds for a folder goes through ``_add_all_callbacks`` (at start, for a
        folder made or moved in, after a queue overflow), so that is where both are left out.
        A watch per top-level folder instead (tried before) meant a thread per camera, and a
        camera folder renamed was never watched again."""

        def _left_out(self, path: bytes) -> bool:
            root, here = os.path.normpath(self.path), os.path.normpath(path)
            rel = here[len(root):].lstrip(os.sep.encode()) if here.startswith(root + os.sep.encode()) else b""
            return rel.split(os.sep.encode(), 1)[0] in _NOT_WATCHED

        def _add_all_callbacks(self, path: bytes) -> None:
            if self._left_out(path):
                return
            if os.path.normpath(path) != os.path.normpath(self.path):
                super()._add_all_callbacks(path)
                return
            self._add_callback(path)  # the drop folder itself: raises when it cannot be watched
            try:
                with os.scandir(path) as entries:
                    below = [e.path for e in entries if e.name not in _NOT_WATCHED and e.is_dir(follow_symlinks=False)]
            except OSError:  # removed meanwhile: its IN_DELETE_SELF ends the watcher, _keep_watching follows
                below = []
            for folder in below:
                super()._add_all_callbacks(folder)

    class _DropEmitter(InotifyEmitter):
        def on_thread_start(self) -> None:  # watchdog 7.1's, with the watch group above
            try:
                group = _DropWatchGroup(self._inotify_fd, os.fsencode(self.watch.path),
                                        is_recursive=self.watch.is_recursive,
                                        event_mask=self.get_event_mask_from_filter(),
                                        follow_symlink=self.watch.follow_symlink)
            except (TypeError, AttributeError):  # a 7.x whose internals moved: its own watch, every folder
                log.debug("watchdog's inotify internals differ; processed/ and quarantine/ are watched too",
                          exc_info=True)
                super().on_thread_start()
                return
            self._inotify = group

    class _DropObserver(InotifyObserver):
        def __init__(self) -> None:
            super().__init__()
            self._emitter_class = _DropEmitter


def _observer() -> Observer:  # type: ignore[valid-type]
    """The watcher for a drop folder: inotify less ``processed/`` and ``quarantine/`` where the
    watchdog is one whose internals ``_DropWatchGroup`` was written for (7.x), else watchdog's own
    (every folder watched, as before)."""
    if InotifyWatchGroup is not None and WATCHDOG_VERSION[0] == 7 \
            and hasattr(InotifyWatchGroup, "_add_all_callbacks") and hasattr(InotifyWatchGroup, "_add_callback") \
            and Observer is InotifyObserver:
        return _DropObserver()
    return Observer()


def inotify_watch_limit(what: str = "watches") -> int | None:
    """The user's inotify limit of ``what`` ("watches" or "instances"):
    ``fs.inotify.max_user_<what>``, or in a container (a user namespace, Linux 5.11+)
    ``user.max_inotify_<what>`` where that is lower; None where neither can be read (not Linux)."""
    limits = []
    for name in (f"/proc/sys/fs/inotify/max_user_{what}", f"/proc/sys/user/max_inotify_{what}"):
        try:
            limits.append(int(Path(name).read_text()))
        except (OSError, ValueError):
            pass
    return min(limits) if limits else None


def _said(limit: int | None) -> str:
    return "?" if limit is None else str(limit)


def watched_folders(root: Path) -> int:
    """How many inotify watches the drop folder's watch takes: every folder under ``root`` (hidden
    ones too) but ``processed/`` and ``quarantine/`` (``_DropWatchGroup``), ``root`` included."""
    count = 0
    for dirpath, dirnames, _ in os.walk(root, followlinks=False):
        if Path(dirpath) == root:
            dirnames[:] = [d for d in dirnames if d not in (PROCESSED, QUARANTINE)]
        count += 1
    return count


def took_from_a_drop_folder(store_root: Path) -> bool:
    """Whether the store under ``store_root`` holds an image taken from a drop folder (a
    ``drop:`` source): read-only (``mode=ro``, a running daemon is not disturbed); False without
    a store, or one that cannot be read now (the store's own checks say why)."""
    db_path = Path(store_root) / "store.sqlite3"
    if not os.path.isfile(db_path):
        return False
    try:
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5.0)
        try:
            return bool(db.execute("SELECT EXISTS (SELECT 1 FROM images WHERE source LIKE 'drop:%')").fetchone()[0])
        finally:
            db.close()
    except sqlite3.Error as exc:
        log.debug("cannot tell whether %s took files from a drop folder: %s", db_path, exc)
        return False


def on_tmpfs(path: Path) -> bool:
    """Whether ``path`` lies on a file system in memory (tmpfs, ramfs: /run, /dev/shm), from the
    longest mount point above it in ``/proc/self/mounts``; False where that cannot be read. A
    drop folder there is gone after every boot: made again at each start (review: the daemon
    refused to start after a reboot, and the unit gave up after its restart burst)."""
    try:
        real = os.path.realpath(path)
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return False
    best, kind = "", ""
    for fields in mounts:
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind in ("tmpfs", "ramfs")


def missing_drop_folder(folder: Path, store_root: Path) -> str | None:
    """Why the missing drop folder ``folder`` must not be made (None: it is there, or making it is
    what a first start wants). ``annotator serve`` makes it when it may (``service.daemon``) and
    ``annotator doctor`` says the same (``service.doctor``).

    A fresh install wants it made; a wrong path must not be: a typo'd ``drop.folder`` made a new,
    empty folder that no capture tool writes into, and the daemon ran on, taking nothing, while
    the files piled up in the real one. So it is made only where the folder above it exists (a
    typo in a folder above, or a disk or share not mounted, names none) and the store has never
    taken a file from a drop folder (a store that has was fed by one: this folder is missing
    because its path changed or its disk is not there, not because this is a first start), or
    the folder above it is in memory (``on_tmpfs``: every boot empties it)."""
    folder = Path(folder)
    if os.path.isdir(folder):
        return None
    parent = folder.absolute().parent
    if not os.path.isdir(parent):
        return (f"{text_name(folder)} does not exist, nor does {text_name(parent)} (a typo in the path, or the disk "
                f"or share it is on not mounted?)")
    if took_from_a_drop_folder(store_root) and not on_tmpfs(parent):
        return (f"{text_name(folder)} does not exist, and the store {text_name(store_root)} has taken files from a "
                f"drop folder before, so this is not a first start (a typo in the path, or the disk or share it is "
                f"on not mounted?)")
    return None


def walk_ingested(root: Path):  # type: ignore[no-untyped-def]
    """``os.walk`` of the folders a drop folder takes files from (not processed/, quarantine/
    nor hidden or temporary ones): the folders its watch and its full walks cover."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        if Path(dirpath) == root:
            dirnames[:] = [d for d in dirnames if d not in (PROCESSED, QUARANTINE)]
        dirnames[:] = [d for d in dirnames if not temporary_name(d)]
        yield dirpath, dirnames, filenames


class DropFolder:
    """Watches ``root`` and feeds stable image files to ``sink``; see the module docstring."""

    def __init__(self, root: Path, sink: Sink, processed_mode: str = "move", stable_seconds: float = 2.0,
                 max_bytes: int = 50_000_000, max_pixels: int = 50_000_000, poll_interval: float = 0.5,
                 max_side_hint: int | None = None, clock: Callable[[], float] = time.monotonic,
                 paused: Callable[[], str | None] | None = None,
                 pause_retry_seconds: float = PAUSE_RETRY_SECONDS, known: Callable[[str], bool] | None = None,
                 remove_empty_seconds: float = 0.0, max_bytes_setting: str = "drop.max_bytes") -> None:
        """``max_bytes_setting``: what set ``max_bytes``, for the reason a larger file is refused
        with (the daemon lowers it to what ``ulimit -f`` lets it write). ``paused``: why the store refuses ingest right now, or None (``Store.paused_reason``);
        asked once per scan so that nothing is decoded for a sink that would refuse it.
        ``known``: whether the store holds the image with this id (sha256 of the bytes) already;
        such a file is disposed of without decoding or ingesting it (see the module docstring).
        ``remove_empty_seconds``: when > 0, an empty recording folder untouched that long is
        removed by the full walk (``_remove_if_stale``); 0 (the default) removes none."""
        if processed_mode not in PROCESSED_MODES:
            raise ValueError(f"drop.processed_mode: expected one of {PROCESSED_MODES}, got {processed_mode!r}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.real_root = Path(os.path.realpath(self.root))
        self.sink = sink
        self.processed_mode = processed_mode
        self.stable_seconds = float(stable_seconds)
        self.max_bytes, self.max_pixels = int(max_bytes), int(max_pixels)
        self.max_bytes_setting = max_bytes_setting
        self.poll_interval = float(poll_interval)
        self.max_side_hint = max_side_hint
        self.clock = clock
        self.paused = paused
        self.remove_empty_seconds = float(remove_empty_seconds)
        self.pause_retry_seconds = float(pause_retry_seconds)
        self.known = known
        self._held_until = -math.inf  # clock time before which no file is looked at (StoreFull)
        self._held_reason = ""
        self._pause_logged: str | None = None  # the pause reason last logged, None when running
        self._full_owed = False  # a full walk is owed: skipped while paused, or events were lost
        self._seen: dict[Path, _Seen] = {}
        # processed_mode="keep": taken already (size, mtime_ns, inode: a file renamed over it with
        # the same size and mtime, as ``rsync -t`` leaves one, is a new file)
        self._kept: dict[Path, tuple[int, int, int]] = {}
        # A file that could not be moved out (size, mtime_ns, clock time of the next try, delay):
        # tried again after a delay that doubles up to MOVE_RETRY_MAX_SECONDS, or when it changes.
        self._stuck: dict[Path, tuple[int, int, float, float]] = {}
        self._dirty: set[Path] = set()
        # The backlog: every file seen and not taken yet (announced, found by a walk, settling,
        # held by a pause, waiting for a retry) -> clock time it was first seen, in that order
        # (so the oldest is the first); a file leaves it when taken, quarantined or gone.
        # ``backlog`` reads it for the metrics and the status, with no walk of its own.
        self._waiting: dict[Path, float] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._observer: Observer | None = None  # type: ignore[valid-type]
        self._rewatch_at = -math.inf  # clock time of the next try to watch again (see _keep_watching)
        self._watched: tuple[int, int] | None = None  # (device, inode) of the folder the watch began on
        self.watch_lost: str | None = None  # why the folder is not watched (found by the full walks only)
        self.taken = self.quarantined = 0
        self.walk_seconds = 0.0  # the last full scan's own cost: its time less the time taking files
        self._take_seconds = 0.0
        self.stored_already = 0  # files disposed of without ingest: ``known`` had their bytes
        self.on_quarantine: Callable[[], None] | None = None  # e.g. a metrics counter

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Start watching, then scan what is already there (in the worker thread)."""
        self._watch()
        self._thread = threading.Thread(target=self._run, name="dropfolder", daemon=True)
        self._thread.start()
        log.info("%s drop folder %s (processed: %s, stable after %.1f s)",
                 "watching" if self.watch_lost is None else "walking", self.root, self.processed_mode,
                 self.stable_seconds)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the watcher and the worker thread (the file in hand is finished first)."""
        with self._lock:  # _keep_watching starts no observer after this
            self._stop.set()
            observer = self._observer
        self._wake.set()
        if observer is not None:
            observer.stop()
            if observer.ident is not None:  # not one that never started (no watch to spare, _watch_failed)
                observer.join(timeout)
        if self._thread is not None:
            self._thread.join(timeout)

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the worker thread to end (after ``stop``); True when it
        has (or never started). The daemon closes its store only after this, so that the file in
        hand is not refused by a closed store."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def notify(self, path: Path) -> None:
        """A file changed (from watchdog, or a test): look at it soon."""
        waits = self._relative(path) is not None
        with self._lock:
            self._dirty.add(path)
            if waits:
                self._waiting.setdefault(path, self.clock())
        self._wake.set()

    def backlog(self) -> tuple[int, float]:
        """(files waiting, seconds the oldest of them has waited): files seen in the folder and
        not taken yet (being written or settling for ``stable_seconds``, announced and not
        looked at yet, found by a walk and queued behind others, held while ingest is paused, or
        waiting for a retry after their move out failed); (0, 0.0) when none. Waiting is
        counted from when this process first saw the file (a file there at the start: from the
        first walk), not from its mtime, which a copy (``rsync -t``, a card) keeps from the
        camera. Files found by the full walks only (an unwatched folder, a network share) count
        from the walk that found them (no walk runs while ingest is paused). Temporary names, ``processed/`` and ``quarantine/`` never
        count. Cheap: the watcher's own bookkeeping is read, the folder is not walked."""
        with self._lock:
            n = len(self._waiting)
            first = next(iter(self._waiting.values()), None)
        return n, 0.0 if first is None else max(0.0, self.clock() - first)

    def _waits(self, path: Path) -> None:
        with self._lock:
            self._waiting.setdefault(path, self.clock())

    def _done(self, path: Path) -> None:
        """``path`` is no longer waiting: taken, quarantined, gone, or nothing to take."""
        if path in self._waiting:  # most calls (a kept file, at every walk) find nothing: no lock
            with self._lock:
                self._waiting.pop(path, None)

    def request_full_scan(self) -> None:
        """Events were lost (inotify's queue overflowed): walk the whole folder on the next scan."""
        with self._lock:
            self._full_owed = True
        self._wake.set()

    def _folder_id(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.root)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def _watch(self) -> None:
        observer = _observer()
        observer.daemon = True
        self._watched = self._folder_id()
        try:
            observer.schedule(_Handler(self), str(self.root), recursive=True)  # 7.1.1: EMFILE here
            observer.start()
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EMFILE):
                raise
            observer.stop()  # its reader thread; no emitter runs, so _keep_watching tries again
            reader = getattr(observer, "_inotify_fd", None)
            if reader is not None:  # watchdog 7.1.1: stopped before its thread first read, it never closes its fd
                reader.join(5)
                if not reader.is_alive() and getattr(reader, "_is_reading", False):
                    reader._close_resources()
            self._observer = observer
            self._watch_failed(exc)
            return
        self._observer = observer
        if self.watch_lost is not None:
            log.warning("drop folder %s is watched for new files again", self.root)
            self.watch_lost = None

    def _watch_failed(self, exc: OSError) -> None:
        """The user's inotify watches (or instances) are used up: one folder each, and a drop
        folder with more folders than ``fs.inotify.max_user_watches`` (8192 before Linux 5.11)
        could not be watched. ``start`` raised then, so the daemon did not start at all (and
        systemd restarted it for ever), and a watcher lost later was tried again with a
        traceback every RESCAN_SECONDS. Now the files are found by the full walks, which run
        anyway; it is said once, with what to do, and tried again every WATCH_RETRY_SECONDS."""
        self._rewatch_at = self.clock() + WATCH_RETRY_SECONDS
        first = self.watch_lost is None
        if exc.errno == errno.EMFILE:  # no inotify instance to spare (other programs of this user hold them)
            self.watch_lost = (f"cannot watch the drop folder {self.root} for new files ({exc.strerror or exc}; "
                               f"fs.inotify.max_user_instances is {_said(inotify_watch_limit('instances'))}); new "
                               f"files are found by the full walk instead, every {RESCAN_SECONDS:.0f}-"
                               f"{RESCAN_MAX_SECONDS:.0f} s: raise the limit (sysctl fs.inotify.max_user_instances="
                               f"1024, kept in /etc/sysctl.d/) or stop what holds this user's instances")
        else:
            self.watch_lost = (f"cannot watch the drop folder {self.root} for new files ({exc.strerror or exc}; "
                               f"{watched_folders(self.root)} folders to watch, fs.inotify.max_user_watches is "
                               f"{_said(inotify_watch_limit())}); new files are found by the full walk instead, every "
                               f"{RESCAN_SECONDS:.0f}-{RESCAN_MAX_SECONDS:.0f} s: raise the limit (sysctl "
                               f"fs.inotify.max_user_watches=524288, kept in /etc/sysctl.d/) or remove the empty "
                               f"recording folders (drop.remove_empty_hours)")
        if first:
            log.warning("%s; watching is tried again every %.0f s", self.watch_lost, WATCH_RETRY_SECONDS)
        else:
            log.info("drop folder %s: still no inotify watch to spare; tried again in %.0f s", self.root,
                     WATCH_RETRY_SECONDS)

    def _keep_watching(self) -> None:
        """Watch again when the watcher has ended: the drop folder was removed (a clean-up
        script, a card taken out) and made again. Watchdog's watcher ends with its folder, and
        files in the new one were found only by the full walks, up to RESCAN_MAX_SECONDS later.
        While the folder is missing nothing is tried; a watcher that ends for another reason is
        tried again at most every RESCAN_SECONDS. A folder moved away (``mv drop drop.old; mkdir
        drop``) does not end the watcher, which follows the inode where it went: the folder under
        the name was never watched again. So a watcher whose folder is no longer the one under the
        name (another inode) is replaced too, at once: the wait between tries is for a watcher
        that ends on the same folder (a folder made again may get the removed one's inode number,
        and then waits for it)."""
        observer = self._observer
        if observer is None:
            return
        here = self._folder_id()
        if observer.emitters and all(e.is_alive() for e in observer.emitters) and here in (None, self._watched):
            return
        if here is None or not self.root.is_dir() or here == self._watched and self.clock() < self._rewatch_at:
            return
        self._rewatch_at = self.clock() + RESCAN_SECONDS
        with self._lock:
            if self._stop.is_set():
                return
            observer.stop()
            lost = self.watch_lost is not None
            self._watch()
        if not lost:
            log.warning("drop folder %s was removed or moved away, or its watcher ended; watching it again", self.root)
        self.request_full_scan()  # what was written before the new watch began

    def _run(self) -> None:
        next_full = -math.inf
        while not self._stop.is_set():
            try:
                self._keep_watching()
            except Exception:  # the full walks still find the files
                log.exception("cannot watch the drop folder again; its files are found by the full walks")
            full = self.clock() >= next_full
            started = self.clock()
            try:
                self.scan_once(full=full)
            except Exception:  # keep watching whatever one file did; logged with its traceback
                log.exception("drop folder scan failed; retrying")
            if full:
                next_full = started + rescan_interval(self.walk_seconds)
            self._wake.wait(self.poll_interval)
            self._wake.clear()

    # -- scanning ------------------------------------------------------------------------
    def _walk(self) -> list[Path]:
        out = []
        for dirpath, dirnames, filenames in walk_ingested(self.root):
            here = Path(dirpath)
            if self.remove_empty_seconds > 0 and not dirnames and not filenames \
                    and len(here.relative_to(self.root).parts) >= 2:
                self._remove_if_stale(here)  # a recording's (a camera's own folder stays)
            out.extend(here / f for f in filenames)
            # links to folders are in dirnames (walk does not follow them); a listdir of ``here``
            # raised when a capture tool removed the folder meanwhile, and ended the whole walk
            out.extend(here / d for d in dirnames if os.path.islink(here / d))
        return out

    def _remove_if_stale(self, folder: Path) -> None:
        """Remove an empty recording folder (``<camera>/<session>/`` and deeper; a camera's own
        folder stays) nothing was made or removed in for ``remove_empty_seconds`` (the setting
        ``drop.remove_empty_hours``; off by default: a capture tool that writes into fixed
        sub-folders it does not make again, ``<camera>/rgb/`` made once at install, would lose
        its frames once the folder went).

        Capture tools make a folder per camera and recording (``<camera>/<session>/``), and once
        their files were taken the empty folders stayed for ever: over months thousands of them,
        each one an inotify watch of the recursive watcher (``fs.inotify.max_user_watches`` is
        8192 on older kernels; beyond it the watcher fails) and a step of every full walk. Its
        mtime is the last time an entry was made or removed in it, so a folder a writer still
        uses is not this old; ``rmdir`` never removes a folder that is not empty."""
        try:
            if folder.lstat().st_mtime < time.time() - self.remove_empty_seconds:
                folder.rmdir()
                log.debug("drop folder: removed the empty folder %s", text_name(folder))
        except OSError:  # written into meanwhile, removed by someone else, not ours to remove
            pass

    def scan_once(self, full: bool = True) -> int:
        """Look at changed files (every file when ``full``); take the stable ones. Returns how many.

        While the store refuses ingest nothing is read (``_pause_reason``); the changed files stay
        remembered and a full walk skipped meanwhile is done on the first scan after. The first
        ``StoreFull`` ends the scan: every later file would be read and decoded only to be
        refused the same way. Anything else one file raises is logged and the scan goes on.
        """
        if self._pause_reason() is not None:
            with self._lock:
                self._full_owed |= full
            return 0
        with self._lock:
            full, self._full_owed = full or self._full_owed, False
            candidates = set(self._dirty) | set(self._seen)
            self._dirty.clear()
        # CPU time of this thread, not wall time: a walk of a network share that waits on the
        # network costs no CPU and must not push the next walk (its very purpose there) away.
        t0, take0 = time.thread_time(), self._take_seconds
        if full:
            walked = self._walk()
            candidates.update(walked)
            with self._lock:
                # files found by the walk wait too (kept ones and temporary names do not); what
                # waited and is neither found nor announced again has gone without an event
                now = self.clock()
                for path in walked:
                    if path not in self._waiting and path not in self._kept and not temporary_name(path.name):
                        self._waiting[path] = now
                for path in [p for p in self._waiting if p not in candidates and p not in self._dirty]:
                    del self._waiting[path]
        order = sorted(candidates)
        taken = 0
        for i, path in enumerate(order):
            if self._stop.is_set():
                break
            try:
                taken += self._consider(path)
            except (StoreFull, StoreUnavailable) as exc:  # the store's disk, not this file: hold every file
                cause = exc.__cause__
                self._hold(str(exc), order[i:], key=f"{type(exc).__name__}:"
                           f"{getattr(cause, 'errno', None) or getattr(cause, 'sqlite_errorcode', None)}")
                break
            except Exception:  # one file's surprise must not keep the files after it from being taken
                log.exception("drop folder: %s failed; going on with the other files", text_name(path))
        if full:
            self.walk_seconds = max(0.0, time.thread_time() - t0 - (self._take_seconds - take0))
        if taken and self._pause_logged is not None:
            log.info("drop folder resumed: ingest is accepted again")
            self._pause_logged = None
        return taken

    def _pause_reason(self) -> str | None:
        """Why no file should be read now: a recent ``StoreFull``, or the ``paused`` probe."""
        if self.clock() < self._held_until:
            return self._held_reason
        reason = None
        if self.paused is not None:
            try:
                reason = self.paused()
            except Exception:  # the sink still refuses with StoreFull if the disk is really full
                log.exception("cannot tell whether the store accepts images; trying anyway")
        # Logged once per kind of reason: the store's names the free space, which changes on a
        # disk others write to, and every scan (each poll_interval) logged the pause again
        # (79 warnings in 35 s, on the disk that was short of space).
        key = None if reason is None else re.sub(r"\d+", "#", reason)
        if key is not None and key != self._pause_logged:
            log.warning("drop folder paused, no file is read until ingest resumes: %s", reason)
            self._pause_logged = key
        return reason

    def _hold(self, reason: str, pending: list[Path], key: str | None = None) -> None:
        """After a ``StoreFull`` (or ``StoreUnavailable``): look at no file for
        ``pause_retry_seconds``, then at ``pending``. Logged once per ``key`` (the kind of fault;
        default the reason), not at each retry: the reason names a file and the free space."""
        self._held_until = self.clock() + self.pause_retry_seconds
        self._held_reason = reason
        with self._lock:
            self._dirty.update(pending)
        key = reason if key is None else key
        if key != self._pause_logged:
            log.warning("drop folder paused, retrying in %.0f s: %s", self.pause_retry_seconds, reason)
            self._pause_logged = key

    def _relative(self, path: Path) -> Path | None:
        try:
            rel = path.relative_to(self.root)
        except ValueError:
            return None
        if not rel.parts or rel.parts[0] in (PROCESSED, QUARANTINE) or is_temporary(rel):
            return None
        return rel

    def _consider(self, path: Path) -> int:
        rel = self._relative(path)
        if rel is None:
            self._seen.pop(path, None)
            self._done(path)
            return 0
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            self._seen.pop(path, None)
            self._kept.pop(path, None)
            self._stuck.pop(path, None)
            self._done(path)
            return 0
        if stat.S_ISDIR(st.st_mode):
            self._done(path)
            return 0
        if self._kept.get(path) == (st.st_size, st.st_mtime_ns, st.st_ino):
            self._done(path)
            return 0
        self._waits(path)  # until taken, quarantined or gone (a kept file changed: again)
        now = self.clock()
        stuck = self._stuck.get(path)
        if stuck is not None and stuck[:2] == (st.st_size, st.st_mtime_ns) and now < stuck[2]:
            return 0
        seen = self._seen.get(path)
        if seen is None or (seen.size, seen.mtime_ns) != (st.st_size, st.st_mtime_ns):
            self._seen[path] = seen = _Seen(st.st_size, st.st_mtime_ns, now)
        age = time.time() - st.st_mtime_ns / 1e9
        if now - seen.since < self.stable_seconds and age < self.stable_seconds:
            return 0  # still being written, look again later
        self._seen.pop(path, None)
        t0 = time.thread_time()
        try:
            taken = self._take(path, rel, st)
        except OSError as exc:  # StoreFull (not an OSError) goes to scan_once, which stops
            if is_disk_full(exc):
                raise store_write_error(exc) from exc
            if isinstance(exc, FileNotFoundError) and not os.path.lexists(path):
                # gone between the last look and the move (another process took it, a writer took
                # it back): nothing to move, and no permission to fix
                log.info("%s was gone when it was to be moved (%s); nothing left to do", text_name(rel), exc)
                self._done(path)
                return 0
            delay = min(max(2 * stuck[3], MOVE_RETRY_SECONDS) if stuck else MOVE_RETRY_SECONDS, MOVE_RETRY_MAX_SECONDS)
            self._stuck[path] = (st.st_size, st.st_mtime_ns, now + delay, delay)
            log.error("cannot move %s out of the drop folder (%s); it will be retried in %.0f s (the service user "
                      "needs write permission on its folder)", text_name(rel), exc, delay)
            return 0
        finally:
            self._take_seconds += time.thread_time() - t0
        self._stuck.pop(path, None)
        return taken

    def _problem(self, path: Path, st: os.stat_result) -> str | None:
        """Why this file cannot be used as it is, or None."""
        if stat.S_ISLNK(st.st_mode):
            target = Path(os.path.realpath(path))
            if target != self.real_root and self.real_root not in target.parents:
                return f"symbolic link to {target}, outside the drop folder; copy or move the file in instead"
            if target.is_dir():
                return None  # a linked folder inside the drop folder: walked where it really is
            if not target.exists():
                return f"symbolic link to {target}, which does not exist"
            st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file (device, socket or pipe)"
        if st.st_size == 0:
            return "empty file (0 bytes)"
        if st.st_size > self.max_bytes:
            return f"file is {st.st_size} bytes, more than the limit of {self.max_bytes} ({self.max_bytes_setting})"
        return None

    def _take(self, path: Path, rel: Path, st: os.stat_result) -> int:
        reason = self._problem(path, st)
        if reason is None and stat.S_ISLNK(st.st_mode) and path.is_dir():
            self._done(path)  # a link to a folder inside: its files are walked where they are
            return 0
        data = b""
        if reason is None:
            try:  # O_NONBLOCK: a pipe renamed over the file since the lstat must not hang the thread
                with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
                    if stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                        data = f.read(self.max_bytes + 1)
                    else:
                        reason = "not a regular file (device, socket or pipe)"
            except FileNotFoundError:  # deleted (or renamed away) since the lstat: nothing to take
                self._done(path)
                return 0
            except OSError as exc:
                reason = f"cannot read the file: {exc.strerror or exc}"
        if reason is None and self.known is not None:
            try:
                stored = self.known(image_id_of(data))
            except Exception as exc:  # the store, not this file (closed, locked...): the next scan decides
                log.error("cannot tell whether %s is stored already (%s); it will be retried", text_name(rel), exc)
                return 0
            if stored:  # a restart in keep mode, a crash before the move, the same bytes dropped again
                self._dispose(path, rel, st, data)
                self.stored_already += 1
                return 0
        decoded: DecodedImage | None = None
        if reason is None:
            try:
                decoded = decode_image(data, max_pixels=self.max_pixels, max_side_hint=self.max_side_hint)
            except ImageError as exc:
                reason = str(exc)
            except Exception as exc:  # a decoder failure of its own: set this file aside, not retried forever
                log.error("decoding %s failed", text_name(rel), exc_info=exc)
                reason = f"cannot decode the image ({type(exc).__name__}: {exc})"
        if reason is not None:
            self._quarantine(path, rel, st, reason)
            return 0
        assert decoded is not None
        name = text_name(rel.as_posix())
        meta = {"path": name, "size": st.st_size, "mtime": st.st_mtime_ns / 1e9}
        if len(rel.parts) > 1:
            meta["camera"] = text_name(rel.parts[0])
        try:
            self.sink(data, f"drop:{name}", meta, decoded)
        except (StoreFull, StoreUnavailable):
            raise
        except (StoreError, ShuttingDown) as exc:  # about the store (closed at shutdown...), not this file
            log.error("cannot ingest %s now (%s); it will be retried", name, exc)
            return 0
        except AnnotatorError as exc:  # ImageError and the like: this file's own fault
            self._quarantine(path, rel, st, str(exc))
            return 0
        except Exception as exc:
            if is_io_fault(exc):  # full, read-only, I/O errors: the store's disk (StoreFull or StoreUnavailable)
                raise store_write_error(exc) from exc
            # the store, not this file: locked, or its connection closed under a take at shutdown
            if isinstance(exc, (OSError, sqlite3.OperationalError, sqlite3.ProgrammingError)):
                log.error("cannot ingest %s now (%s); it will be retried", name, exc)
                return 0
            log.error("ingesting %s failed", name, exc_info=exc)
            self._quarantine(path, rel, st,
                             f"ingest failed ({type(exc).__name__}: {exc}); details are in the daemon log")
            return 0
        self._dispose(path, rel, st, data)
        self.taken += 1
        return 1

    def _replaced(self, path: Path, rel: Path, st: os.stat_result) -> bool:
        """Whether ``path`` is no longer the file taken (``st``): deleted, or another file renamed
        over it while it was read and ingested. Moving, deleting or quarantining ``path`` then
        handled the new file, never ingested, as the old one. The new file is looked at next."""
        try:
            now = os.lstat(path)
        except FileNotFoundError:
            self._done(path)
            return True
        if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            return False
        log.info("%s was replaced while it was taken; the new file is taken next", text_name(rel))
        with self._lock:
            self._dirty.add(path)
        self._wake.set()
        return True

    def _quarantine(self, path: Path, rel: Path, st: os.stat_result, reason: str) -> None:
        if self._replaced(path, rel, st):
            return
        self.quarantined += 1
        write_quarantine(self.root / QUARANTINE, rel, reason, source=path)
        self._done(path)
        if self.on_quarantine is not None:
            self.on_quarantine()

    def _dispose(self, path: Path, rel: Path, st: os.stat_result, data: bytes) -> None:
        if self._replaced(path, rel, st):
            return
        if self.processed_mode == "keep":
            self._kept[path] = (st.st_size, st.st_mtime_ns, st.st_ino)
        elif self.processed_mode == "delete":
            path.unlink(missing_ok=True)
        else:
            dest = fit_name(self.root / PROCESSED / rel)
            make_dirs(dest.parent)  # durably: the copy's folder must outlive the original (move_file)
            # across file systems a kill after the copy and before the unlink leaves both: the
            # copy holding these bytes is then reused, not doubled as name-1
            dest = unique_path(dest, None if _same_fs(path, dest.parent) else _holds(data))
            move_file(path, dest)
        self._done(path)
        log.debug("took %s (%s)", text_name(rel), self.processed_mode)
