"""Object stores: where uploads go. A small Protocol and two implementations.

- ``LocalFolderStore(root)``: the embedded default, a local folder laid out exactly like the
  bucket (``<root>/<prefix>/<key>``); writes are atomic (temporary file, fsync, rename).
- ``S3Store(bucket, prefix, ...)`` (``sync.s3store``): any S3-compatible server through boto3.

Keys are relative to the store's prefix, ``/``-separated, e.g. ``images/<sha256>.jpg``.
Every object carries the sha256 hex digest of its bytes (S3: the ``sha256`` user metadata;
local folder: computed from the file on ``head``), so that a re-run after a crash can tell
"already there with the right content" from "missing or different" without sending it again.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, Protocol, runtime_checkable

from service.durable import atomic_file

from .errors import ObjectNotFound, PermanentError

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


@dataclass(frozen=True)
class ObjectInfo:
    """What ``head`` says about one object: its size in bytes and the sha256 of its bytes.

    ``sha256`` is None for an object written by someone else without the metadata.
    """

    key: str
    size: int
    sha256: str | None
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PendingUpload:
    """A write in progress that a store can abort (S3: a multipart upload, ``upload_id`` its
    UploadId): ``last`` is when it last made progress (its newest part, else its start) by the
    store's clock, ``size`` the bytes of its parts so far (what it costs while it stays)."""

    key: str
    upload_id: str
    last: float
    size: int = 0


@dataclass(frozen=True)
class TimedListing:
    """What ``list_with_times`` says: ``objects`` maps every key under the prefix to (its last
    modification in epoch seconds, its size in bytes), and ``now`` is the store's own clock as it
    listed them: the clock that stamped those times. An object's age is ``now - time``, never
    this box's clock minus the server's stamp (a box clock an hour ahead of the bucket's took a
    publication running now for an hour-old one). ``writing``: key -> start time of a write in
    progress there, not an object yet (S3: an unfinished multipart upload; a folder: a hidden
    ``.tmp`` file); a big file going up over a slow link is one for a long while. ``uploads``:
    the same writes one by one where the store can abort them (S3's multipart uploads, several
    per key when a killed publication left one and another runs now; ``abort_upload``)."""

    objects: dict[str, tuple[float, int]]
    now: float
    writing: dict[str, float] = field(default_factory=dict)
    uploads: tuple[PendingUpload, ...] = ()


@runtime_checkable
class ObjectStore(Protocol):
    """A flat key -> bytes store under one prefix. Every method may raise ``SyncError``s."""

    def put(self, key: str, data: bytes | Path, content_type: str = "application/octet-stream",
            sha256: str | None = None, metadata: dict[str, str] | None = None) -> None:
        """Write ``data`` (bytes, or a file to stream) under ``key``, replacing any object there."""

    def head(self, key: str) -> ObjectInfo | None:
        """Size and checksum of ``key``, or None when there is no such object."""

    def get(self, key: str, progress: Callable[[], None] | None = None) -> bytes:
        """The bytes of ``key``; ``ObjectNotFound`` when missing. ``progress`` is called as the
        bytes arrive (per ``CHUNK``): a model file over a weak link outlasts the agent's watchdog."""

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys starting with ``prefix``, in lexical order."""

    # Optional (``getattr``): ``folders(prefix) -> list[str]``, the names of the "folders" right
    # under ``prefix`` (S3's delimiter listing), so that a reader of one file per folder does not
    # list every object under them.
    # Optional (``getattr``): ``list_with_times(prefix) -> TimedListing``, the keys with their
    # modification times and sizes, and the store's clock to judge those times by (what a
    # store without object times lacks: ``sync.registry`` then refuses to guess ages).
    # Optional (``getattr``): ``abort_upload(key, upload_id)``, abort a write in progress that
    # ``list_with_times`` listed in ``uploads`` (S3: AbortMultipartUpload; its parts are freed).

    def delete(self, key: str) -> None:
        """Remove ``key``; removing a missing key is not an error."""

    def check(self) -> None:
        """Raise ``PermanentError`` when the target cannot be used at all (missing bucket, bad credentials)."""

    def uri(self, key: str) -> str:
        """An absolute address of ``key`` for manifests (``s3://bucket/prefix/key`` or ``file:///...``)."""


CHUNK = 1 << 20  # bytes read between two ``progress`` calls of ``ObjectStore.get``


def read_chunks(chunks: Iterable[bytes], progress: Callable[[], None] | None) -> bytes:
    """The chunks joined, ``progress`` called after each."""
    parts = []
    for chunk in chunks:
        parts.append(chunk)
        if progress is not None:
            progress()
    return b"".join(parts)


def check_key(key: str) -> str:
    """Refuse keys that could escape the prefix or mean different things to different stores."""
    parts = key.split("/")
    if not key or key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"object key: expected a relative '/'-separated path without '.', '..' or "
                         f"empty parts, got {key!r}")
    return key


def sha256_of(data: bytes | Path) -> str:
    """sha256 hex digest of bytes, or of a file's contents (streamed)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return hashlib.sha256(data).hexdigest()
    h = hashlib.sha256()
    with open(data, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def open_source(data: bytes | Path) -> BinaryIO:
    """A readable binary file object over bytes or a file path (the caller closes it)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(data))
    return open(data, "rb")


def join_prefix(prefix: str, key: str) -> str:
    """``prefix/key`` with exactly one separator; an empty prefix gives ``key``."""
    prefix = prefix.strip("/")
    return f"{prefix}/{key}" if prefix else key


STALE_TEMP_S = 86400.0  # a hidden .tmp file this old in a local folder is a write a kill cut short


class LocalFolderStore:
    """A folder laid out like the bucket: the object ``key`` is the file ``<root>/<prefix>/<key>``.

    Writes go to a hidden temporary file in the target folder, are fsynced and renamed into
    place (then the folder is fsynced), so a reader never sees half an object. User metadata is
    not kept (a plain folder has nowhere to put it); ``head`` computes the sha256 from the file.
    """

    def __init__(self, root: Path | str, prefix: str = "") -> None:
        self.root = Path(root)
        self.prefix = prefix.strip("/")
        self.base = self.root / self.prefix if self.prefix else self.root

    def __repr__(self) -> str:
        return f"LocalFolderStore({str(self.base)!r})"

    def _path(self, key: str) -> Path:
        return self.base / check_key(key)

    def put(self, key: str, data: bytes | Path, content_type: str = "application/octet-stream",
            sha256: str | None = None, metadata: dict[str, str] | None = None) -> None:
        path = self._path(key)
        digest = hashlib.sha256()
        with atomic_file(path, sync_dir=True) as out, open_source(data) as src:
            for chunk in iter(lambda: src.read(_CHUNK), b""):
                digest.update(chunk)
                out.write(chunk)
            if sha256 is not None and digest.hexdigest() != sha256:
                raise ValueError(f"put {key}: data has sha256 {digest.hexdigest()}, caller said {sha256}")
        log.debug("wrote %s (%s)", path, content_type)

    def head(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        try:
            size = path.stat().st_size
            digest = sha256_of(path)
        except FileNotFoundError:
            return None
        return ObjectInfo(key, size, digest, {"sha256": digest})

    def get(self, key: str, progress: Callable[[], None] | None = None) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                return read_chunks(iter(lambda: f.read(CHUNK), b""), progress)
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"no object {key} in {self.base}") from exc

    def _files(self, prefix: str) -> Iterator[tuple[str, bool]]:
        """(key, whether it is a write in progress: a hidden ``.tmp`` file) of every file under ``prefix``."""
        # The walk starts at the prefix's folder: from the base it read the whole bucket (a
        # year of uploads) for each listing of one manifest folder.
        start = self.base / prefix.rsplit("/", 1)[0] if "/" in prefix else self.base
        if not start.is_dir() or not start.resolve().is_relative_to(self.base.resolve()):
            return
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(self.base).as_posix()
            for name in filenames:
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    yield key, name.startswith(".") and name.endswith(".tmp")

    def list(self, prefix: str = "") -> Iterator[str]:
        # a hidden .tmp file is a write in progress (or left by a crash): not an object
        return iter(sorted(key for key, writing in self._files(prefix) if not writing))

    def list_with_times(self, prefix: str = "") -> TimedListing:
        """``list`` with each file's mtime and size, and the writes in progress (hidden ``.tmp``
        files) with theirs. The times were stamped by this box's clock (the kernel's), so
        ``now`` is this box's clock too."""
        now = time.time()
        objects, writing = {}, {}
        for key, partial in sorted(self._files(prefix)):
            try:
                st = (self.base / key).stat()
            except FileNotFoundError:
                continue  # removed (or renamed into place) since the listing
            if partial:
                writing[key] = st.st_mtime
            else:
                objects[key] = (st.st_mtime, st.st_size)
        return TimedListing(objects, now, writing)

    def folders(self, prefix: str) -> list[str]:
        """The names of the folders right under ``prefix`` (which ends with ``/``), sorted."""
        start = self.base / prefix.strip("/") if prefix.strip("/") else self.base
        if not start.resolve().is_relative_to(self.base.resolve()):
            return []
        try:
            return sorted(e.name for e in os.scandir(start) if e.is_dir() and not e.name.startswith("."))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def check(self) -> None:
        try:
            self.base.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PermanentError(f"target folder {self.base} cannot be created: {exc}") from exc
        if not os.access(self.base, os.W_OK):
            raise PermanentError(f"target folder {self.base} is not writable by this user")
        self.remove_stale_temps()

    def remove_stale_temps(self, older_than_s: float = STALE_TEMP_S) -> int:
        """Remove the hidden ``.tmp`` files of writes a kill cut short (``atomic_file``) that are
        older than ``older_than_s``; returns how many. They are no objects (``list`` skips them)
        and the write was done again, but they stayed for good, and a copy of the folder to real
        storage carried them (1 in 39 agent kills of a soak). Younger ones may be another
        appliance's write in progress in a shared folder: left. Called by ``check`` (once per
        agent start)."""
        now, removed = time.time(), 0
        for key, partial in list(self._files("")):
            path = self.base / key
            try:
                if partial and now - path.stat().st_mtime > older_than_s:
                    path.unlink()
                    removed += 1
            except OSError:  # gone meanwhile, or not ours to remove: left
                continue
        if removed:
            log.info("removed %d temporary files that interrupted writes left in %s", removed, self.base)
        return removed

    def uri(self, key: str) -> str:
        return self._path(key).resolve().as_uri()


def __getattr__(name: str) -> object:
    """``S3Store`` lives in ``sync.s3store`` (boto3 is imported only when it is asked for)."""
    if name == "S3Store":
        from .s3store import S3Store

        return S3Store
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
