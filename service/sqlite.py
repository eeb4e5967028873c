"""SQLite the way every database of the appliance uses it (store, sync journal, dataset).

- ``connect``: autocommit mode (transactions are explicit), rows as ``sqlite3.Row``, a busy
  timeout so that a second process waits for the write lock instead of failing, WAL (readers
  never block the writer) and ``synchronous=FULL`` (a committed transaction survives a power
  loss).
- ``transaction``: ``BEGIN IMMEDIATE`` ... ``COMMIT``, ``ROLLBACK`` on any exception. Taking
  the write lock at ``BEGIN`` means a transaction never fails half-way on a lock upgrade.
- ``ThreadConnections``: one connection per thread (a connection is not shared between
  threads), all closed together.
- ``apply_schema``: run an idempotent ``CREATE ... IF NOT EXISTS`` script statement by statement.
"""
from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

DEFAULT_BUSY_TIMEOUT_MS = 30_000


def open_failure(what: str, path: Path | str, exc: sqlite3.Error) -> str:
    """One line for a database a command could not open: what to do depends on why (a file this
    user may not write, or a lock another program holds past the busy timeout)."""
    text = str(exc)
    if "locked" in text or "busy" in text:
        hint = "another program holds it; try again when it is done (a running daemon never holds it this long)"
    else:
        hint = "run as a user who may write it (e.g. sudo -u annotator)"
    return f"cannot open the {what} at {path}: {text}; {hint}"


def connect(path: Path | str, busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS) -> sqlite3.Connection:
    """Open ``path`` in autocommit mode with WAL, ``synchronous=FULL`` and a busy timeout (ms)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_ms / 1000)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")  # a committed transaction survives power loss
    return conn


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on any exception). Not re-entrant.

    The exception that ended the transaction is the one raised: after a disk I/O error or a
    full disk SQLite has often rolled back by itself, and a ``ROLLBACK`` then failed with
    "cannot rollback - no transaction is active", which hid the disk's error from every caller
    that tells a disk fault from a bug."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        if db.in_transaction:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error as exc:  # the disk again: the first error says what happened
                log.debug("rollback failed after an error: %s", exc)
        raise
    db.execute("COMMIT")


def apply_schema(db: sqlite3.Connection, schema: str) -> None:
    """Execute each ``;``-separated statement of ``schema`` (idempotent ``IF NOT EXISTS`` DDL)."""
    for statement in schema.split(";"):
        if statement.strip():
            db.execute(statement)


class ThreadConnections:
    """One ``connect``-ed connection per calling thread to the database at ``path``.

    The connections of threads that have ended are closed when a new one is opened: a server
    that answers each request on a new thread (the Prometheus endpoint) left one open
    connection, two file descriptors and its page cache behind per scrape.
    """

    def __init__(self, path: Path | str, busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS) -> None:
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()
        self._conns: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._lock = threading.Lock()

    def get(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path, self.busy_timeout_ms)
            self._local.conn = conn
            with self._lock:
                alive = []
                for thread, other in self._conns:
                    if thread.is_alive():
                        alive.append((thread, other))
                    else:  # its thread is gone: nobody can use it any more
                        other.close()
                self._conns = alive + [(threading.current_thread(), conn)]
        return conn

    def open_count(self) -> int:
        """How many connections are open (one per live thread that used the database)."""
        with self._lock:
            return len(self._conns)

    def close(self) -> None:
        """Close every thread's connection (a thread that asks again afterwards gets a closed one)."""
        with self._lock:
            for _, conn in self._conns:
                conn.close()
            self._conns.clear()
