"""The sync package's exception tree.

Third-party errors (botocore, HTTP clients) are wrapped at the boundary, ``raise ... from exc``,
and sorted into two kinds that the callers treat differently:

- ``RetryableError``: the same request may succeed later (connection refused or reset,
  timeouts, HTTP 5xx, throttling). Callers retry with backoff and never give up on the work.
- ``PermanentError``: retrying cannot help until a person changes something (credentials
  rejected, bucket missing, access denied, a malformed request). Callers stop with a one-line
  message that says what to fix, and nothing is marked as done.

Messages never contain credentials.
"""
from __future__ import annotations

from service.errors import AnnotatorError, describe_io_error, free_space  # noqa: F401  (re-exported for the sync modules)


class SyncError(AnnotatorError):
    """Base of every error the sync agent raises on purpose."""


class RetryableError(SyncError):
    """A transient failure: the same call may succeed if repeated later."""


class PermanentError(SyncError):
    """A failure that repeats until configuration or permissions are fixed."""


class ObjectNotFound(PermanentError):
    """``get`` of a key that does not exist in the object store."""


class BundleContentError(PermanentError):
    """The object is there and readable, but it is not a usable model bundle (not a tar, no or
    a malformed ``bundle.json``, a named file missing, checksums or layouts wrong).

    Kept apart from the other ``PermanentError``s (credentials rejected, bucket missing, access
    denied), which say nothing about the bundle: a content problem refuses that one bundle or
    training artifact and the agent goes on, while those stop the agent and refuse nothing, so
    that a good bundle is still taken once a person fixed the access."""


class ConflictError(PermanentError):
    """An object that must be written once already exists with different content."""


class SyncConfigError(SyncError):
    """The ``[sync]`` configuration is missing a value or holds an invalid one; the message names the key."""


class Stopped(SyncError):
    """The agent was asked to stop while a task waited to retry; the work stays for the next run."""


class DiskFault(RetryableError):
    """This machine's disk refused a read or a write (full, over a quota or a file size limit,
    read-only, failing): not the work's fault. Nothing was marked done; the agent waits a
    little (``sync.agent``) and the work resumes by itself once the disk answers again. The
    message names the file or folder and the free space."""


def disk_fault(what: str, exc: BaseException, path: object = None) -> DiskFault:
    """A ``DiskFault`` for ``exc`` (an I/O fault while doing ``what``): what failed, the file the
    error names, and the free space on ``path`` (or on that file)."""
    where = path if path is not None else getattr(exc, "filename", None)
    return DiskFault(f"{what}: {describe_io_error(exc)} ({free_space(where)})")


def io_fault_of(exc: BaseException | None) -> BaseException | None:
    """The I/O fault (``service.errors.is_io_fault``) that ``exc`` is or was raised from, or was
    raised while handling when ``exc`` is itself an I/O or SQLite error or one of this package's
    own (a failed ``ROLLBACK`` after SQLite's own rollback, a ``RetryableError`` raised in an
    ``except OSError``), or None. A bug (a ``KeyError``, a ``TypeError``...) raised while
    handling an I/O error is a bug, not a disk fault: it keeps its traceback."""
    import sqlite3

    from service.errors import is_io_fault

    seen = 0
    while exc is not None and seen < 8:
        if is_io_fault(exc):
            return exc
        context = exc.__context__ if isinstance(exc, (OSError, sqlite3.Error, AnnotatorError)) else None
        exc = exc.__cause__ or context
        seen += 1
    return None


def read_only_fs(path: object) -> bool:
    """Whether the file system holding ``path`` is mounted read-only (e.g. remounted after errors)."""
    import os

    try:
        return bool(os.statvfs(str(path)).f_flag & os.ST_RDONLY)
    except OSError:
        return False
