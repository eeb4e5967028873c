"""Bringing the store of an older release up to this release's layout (``Store._upgrade``).

The store of the release at 31c2004 (``fixtures/release-31c2004``, see test_upgrade_old_state)
lacks ``pruned_at``, four indexes and the ``state_counts`` table with its triggers. On a large
store adding them takes a while once (800,000 images: about a minute on the 2-core box): the
daemon, the sync agent and any CLI command that opens the store meanwhile wait for the write
lock, and with the whole upgrade in one transaction those past the busy timeout stopped with
"database is locked ... a running daemon never holds it this long"; a kill during it (systemd's
start timeout) threw the work done so far away.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest

from service import lockfile
from service.store import UPGRADE_LOCK, Store

REPO = Path(__file__).resolve().parents[2]


def _layout(db_path: Path) -> tuple[set[str], set[str]]:
    db = sqlite3.connect(db_path)
    try:
        names = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
        columns = {r[1] for r in db.execute("PRAGMA table_info(images)")}
        return names, columns
    finally:
        db.close()


def _states(db_path: Path) -> Counter:
    db = sqlite3.connect(db_path)
    try:
        return Counter(dict(db.execute("SELECT state, count(*) FROM images GROUP BY state").fetchall()))
    finally:
        db.close()


def test_an_open_waits_for_another_programs_upgrade_past_the_busy_timeout(old_store: Path) -> None:
    """Another program holds the write lock for one of its upgrade steps longer than this
    open's busy timeout, and the upgrade lock (``UPGRADE_LOCK``, as ``Store._upgrade`` does):
    the open waits on (saying why) and then opens, instead of failing."""
    waiting = threading.Event()

    class Said(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "waiting for it" in record.getMessage():
                waiting.set()

    upgrading = lockfile.hold(old_store / UPGRADE_LOCK)
    lockfile.note(upgrading, "step 5 of 7: index images_by_bundle")
    holder = sqlite3.connect(old_store / "store.sqlite3", isolation_level=None, check_same_thread=False)
    holder.execute("PRAGMA journal_mode=WAL")
    holder.execute("BEGIN IMMEDIATE")  # the other program's step, e.g. building an index
    holder.execute("CREATE INDEX IF NOT EXISTS images_by_bundle ON images (bundle_id, received_at, image_id)")

    def release() -> None:
        waiting.wait(30)  # released only once the open said it waits (so never within its timeout)
        holder.execute("COMMIT")
        os.close(upgrading)

    handler = Said()
    logging.getLogger("service.store").addHandler(handler)
    releaser = threading.Thread(target=release, daemon=True)
    releaser.start()
    try:
        store = Store(old_store, busy_timeout_ms=100)
    finally:
        logging.getLogger("service.store").removeHandler(handler)
        waiting.set()
        releaser.join(30)
        holder.close()
    try:
        assert waiting.is_set()
        assert store.counts()["auto_accepted"] == 6 and store.counts()["received"] == 3
        names, columns = _layout(old_store / "store.sqlite3")
        assert "pruned_at" in columns and {"state_counts", "images_by_camera", "images_by_bundle"} <= names
    finally:
        store.close()


def test_a_lock_on_a_store_of_this_release_still_fails_at_the_busy_timeout(old_store: Path) -> None:
    """Waiting on is only for an upgrade in progress: a store already of this layout whose lock
    another program holds fails as before (the caller names the lock, ``open_failure``)."""
    Store(old_store).close()
    holder = sqlite3.connect(old_store / "store.sqlite3", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            Store(old_store, busy_timeout_ms=100)
    finally:
        holder.execute("ROLLBACK")
        holder.close()


KILL_AT = """
import os, signal, sys
import service.sqlite
plain = service.sqlite.connect
def connect(*args, **kwargs):
    conn = plain(*args, **kwargs)
    def trace(statement):
        if sys.argv[2] in statement:  # before this statement runs
            os.kill(os.getpid(), signal.SIGKILL)
    conn.set_trace_callback(trace)
    return conn
service.sqlite.connect = connect
from service import lockfile
from service.store import UPGRADE_LOCK, Store
Store(sys.argv[1])
"""


def test_kill_during_the_upgrade_keeps_the_steps_done_and_loses_nothing(old_store: Path) -> None:
    """``kill -9`` as the second new index is being made: the new column and the first index
    stay, every row is there, and the next open finishes the upgrade with the right per-state
    counts."""
    db_path = old_store / "store.sqlite3"
    states = _states(db_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", KILL_AT, str(old_store), "CREATE INDEX IF NOT EXISTS images_by_pruned"],
                          env=env, timeout=120)
    assert done.returncode == -9
    names, columns = _layout(db_path)
    assert "pruned_at" in columns and "images_unpruned_by_update" in names  # kept
    assert "images_by_pruned" not in names and "state_counts" not in names  # not begun
    assert _states(db_path) == states
    store = Store(old_store)
    try:
        assert Counter({k: v for k, v in store.counts().items() if v}) == states
        names, _ = _layout(db_path)
        assert {"images_by_pruned", "images_by_bundle", "images_by_camera", "state_counts",
                "state_counts_insert", "state_counts_delete", "state_counts_update"} <= names
    finally:
        store.close()


def test_a_lock_no_upgrade_step_follows_ends_the_wait(old_store: Path) -> None:
    """An sqlite3 shell (or a hung program) holding the write lock of an old store is no
    upgrade: the open waited for ever, saying another program was upgrading it (then five
    minutes). With nobody holding the upgrade lock (``UPGRADE_LOCK``) it fails as a lock at the
    busy timeout, as before the stepwise upgrade (test_upgrade_liveness.py:
    the same with a real sqlite3 shell, and a real upgrader waited for)."""
    shell = sqlite3.connect(old_store / "store.sqlite3", isolation_level=None)
    shell.execute("BEGIN IMMEDIATE")
    failed: list[BaseException] = []

    def open_it() -> None:
        try:
            Store(old_store, busy_timeout_ms=200).close()
        except BaseException as exc:  # noqa: BLE001
            failed.append(exc)

    opener = threading.Thread(target=open_it, daemon=True)
    opener.start()
    opener.join(60)
    alive = opener.is_alive()
    shell.execute("ROLLBACK")
    shell.close()
    assert not alive, "the open still waits on a lock no upgrade step follows"
    assert failed and "locked" in str(failed[0]), failed
