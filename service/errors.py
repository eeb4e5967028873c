"""The service package's exception tree. Third-party errors are wrapped at the boundary."""
from __future__ import annotations

import errno
import sqlite3


class AnnotatorError(Exception):
    """Base of every error this package raises on purpose."""


class BundleError(AnnotatorError):
    """A model bundle is missing, malformed, fails its checksums or does not match its ONNX files."""


class ImageError(AnnotatorError):
    """An image cannot be used: empty, truncated, not an image, too large, unreadable."""


class ConfigError(AnnotatorError):
    """A configuration value is missing or invalid; the message names the key."""


class StoreError(AnnotatorError):
    """The durable store cannot do what was asked (unknown image, newer schema, bad state)."""


class StoreFull(StoreError):
    """Free disk space is below the configured floor; ingest is paused until space is freed."""


class StoreUnavailable(StoreError):
    """The store's disk fails under a write (an I/O error, a file system gone read-only, a file
    size limit): not the image's fault, so nothing is quarantined for it; the work is retried
    once the disk answers again (gRPC UNAVAILABLE)."""


class LeaseLost(StoreError):
    """A worker tried to finish an image whose lease it no longer holds; nothing was changed.
    ``image_id``: which image (a batch's completion reports one per lost row)."""

    def __init__(self, message: str, image_id: str | None = None) -> None:
        super().__init__(message)
        self.image_id = image_id


class ImageNotFound(StoreError):
    """No image with this id is in the store (or the id is not a sha256 hex digest)."""


class ImageTooLarge(ImageError):
    """The image has more bytes or pixels than the configured limits (gRPC RESOURCE_EXHAUSTED)."""


class ShuttingDown(AnnotatorError):
    """The daemon is stopping and takes no new images (gRPC UNAVAILABLE: retry elsewhere or later)."""


class PathNotAllowed(AnnotatorError):
    """A path sent by a client lies outside the folder it is allowed to name (``..``, symlinks, absolute)."""


def is_disk_full(exc: BaseException) -> bool:
    """True when ``exc`` says the disk is full: ``ENOSPC`` (or ``EDQUOT``, a quota) from a write,
    or SQLite's ``SQLITE_FULL``. The store's own floor check raises ``StoreFull`` before this
    happens; a disk that fills faster than the floor, or a floor of 0, ends up here."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(exc, sqlite3.OperationalError):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    return False


# errno values of a disk that cannot take the write now: full (ENOSPC, EDQUOT), a file size limit
# (EFBIG), a failing or removed device (EIO, ENXIO, ENODEV, ESTALE on NFS, ENOTCONN on a FUSE
# mount gone), a file system remounted read-only (EROFS).
_IO_FAULT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.ENXIO, errno.ENODEV,
                              errno.ESTALE, errno.ENOTCONN, errno.EROFS})
_SQLITE_IO_FAULTS = frozenset({sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_READONLY,
                               sqlite3.SQLITE_CANTOPEN})


def is_io_fault(exc: BaseException) -> bool:
    """True when ``exc`` says the disk cannot take a write right now (``is_disk_full``, or an
    I/O error, a read-only file system, a file size limit; SQLite's ``SQLITE_FULL``,
    ``SQLITE_IOERR*``, ``SQLITE_READONLY*``, ``SQLITE_CANTOPEN``): the disk's fault, not the
    image's. ``StoreFull`` and ``StoreUnavailable`` count too."""
    if isinstance(exc, (StoreFull, StoreUnavailable)):
        return True
    if isinstance(exc, OSError):
        return exc.errno in _IO_FAULT_ERRNOS
    if isinstance(exc, sqlite3.OperationalError):
        code = getattr(exc, "sqlite_errorcode", None)
        return code is not None and code & 0xFF in _SQLITE_IO_FAULTS
    return False


def describe_io_error(exc: BaseException) -> str:
    """``"strerror: filename"`` for a failed read or write (the error's text alone when it names
    no file): the one wording of a disk's refusal in logs, ``status`` and errors."""
    text = f"{getattr(exc, 'strerror', None) or exc}"
    where = getattr(exc, "filename", None)
    return f"{text}: {where}" if where else text


def store_write_error(exc: BaseException, root: object = None) -> StoreError:
    """``StoreFull`` (disk full) or ``StoreUnavailable`` (I/O error, read-only, a size limit...)
    for ``exc``, a failed write of the store under ``root`` (else of the file the error names):
    what failed and the free space there."""
    where = root if root is not None else getattr(exc, "filename", None)
    what = describe_io_error(exc) + (f"; {free_space(where)}" if where is not None else "")
    if is_disk_full(exc):
        return StoreFull(f"the disk is full ({what}); ingest is paused until space is freed")
    return StoreUnavailable(f"the store cannot write ({what}); ingest is paused until the disk works again")


def free_space(path: object) -> str:
    """``"N MB free on PATH"`` for a log line or an error (measured on the nearest existing
    folder of ``path``)."""
    import shutil
    from pathlib import Path

    if path is None:
        return "free space unknown"
    p = Path(str(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return f"{shutil.disk_usage(p).free / 1e6:.0f} MB free on {path}"
    except OSError as exc:
        return f"free space on {path} unknown ({exc.strerror or exc})"
