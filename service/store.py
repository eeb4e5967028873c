"""The durable store: SQLite (WAL) for the image life cycle, content-addressed files for the bytes.

Layout under ``root``::

    store.sqlite3                 the database (WAL mode, plus -wal / -shm files)
    images/<id[:2]>/<id>          the image bytes; id = sha256 hex digest of the bytes
    images/<id[:2]>/.<id[:24]>.*.tmp
                                  an ingest's copy before its rename; one that a kill left
                                  behind is removed at the daemon's next start (``remove_stale_temps``)
    upgrade.lock                  held while a program brings an old layout up to date (``UPGRADE_LOCK``);
                                  removed when it is done (one a kill left goes with the next open)

Retention (``prune_auto_images``, run by ``service.retention``) may remove the bytes of old
auto-accepted images: the row, its record and its history stay, ``pruned_at`` says when, and a
self-transition ``auto_accepted -> auto_accepted`` with a note is logged (the sync agent's merge
follows it and takes the image out of the training set). Reviewed images and every image still
in work are never pruned.

Life cycle (``images.state``)::

    received -> annotated -> auto_accepted | review_pending -> uploaded -> reviewed
    (any state) -> failed, with a reason

Every transition is one committed ``BEGIN IMMEDIATE`` transaction and is also appended to the
``transitions`` table. Work is claimed with a lease (owner + expiry, both in the database, so
several threads and processes may share one store) and acknowledged by ``complete`` or
``fail``. An expired lease is claimable again, so a crashed worker never loses an image. A
completion is accepted while the lease still names the worker (even past its expiry, since
nobody else can have claimed it in between); once another worker has claimed the image, the
first worker's completion raises ``LeaseLost`` and changes nothing, so the same bytes are never
annotated twice. A worker whose batch takes long keeps its leases with ``renew``.

Leases are in wall-clock time (shared between processes). A lease that ends more than
``lease_seconds + CLOCK_STEP_SLACK`` from now was written before the clock stepped back, and is
claimable again: a step back of hours delays the images of a killed worker by at most that, not
hours (processes that claim from one store must use the same ``lease_seconds``, or one with a
shorter lease takes over the others' leases). A step forward expires every lease at once: images in flight may be claimed (and
inferred) a second time, but only one completion is accepted (``LeaseLost``), as for any lease
that ran out.

``attempts`` counts the claims of an image. An image claimed before (its worker died, or was too
slow and lost the lease) is handed out alone, never in a batch: an image that crashes its worker
then takes only itself down, and the images that shared its first batch finish on their next
claim. An image claimed ``max_attempts`` times without finishing (a crash loop) is not handed out
for another try: it is failed (``claim(fail_exhausted=True)``), or handed to the caller to fail
through its own path (``exhausted``).

Times are seconds since the epoch from the injected ``clock``.
"""
from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, Mapping, Sequence

from .durable import fsync_dir, write_bytes_atomic
from .errors import AnnotatorError, ConfigError, ImageNotFound, LeaseLost, StoreError, StoreFull
from .lockfile import STOPPED, Held, Unopenable, hold, note, process, release
from .sqlite import ThreadConnections, apply_schema, open_failure
from .sqlite import transaction as sqlite_transaction
from .systemd import Extender, Notifier

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
RECEIVED, ANNOTATED, AUTO_ACCEPTED, REVIEW_PENDING = "received", "annotated", "auto_accepted", "review_pending"
UPLOADED, REVIEWED, FAILED = "uploaded", "reviewed", "failed"
STATES = (RECEIVED, ANNOTATED, AUTO_ACCEPTED, REVIEW_PENDING, UPLOADED, REVIEWED, FAILED)
DECISIONS = {"auto_accepted": AUTO_ACCEPTED, "review": REVIEW_PENDING}
_ID = re.compile(r"^[0-9a-f]{64}$")
# The temporary copy ``write_bytes_atomic`` makes of an image before its rename (``durable``:
# ``.<first 24 characters of the name>.<mkstemp's random part>.tmp``): a kill between the write
# and the rename leaves one behind, as large as the image. Nothing else is named like it.
_TEMP = re.compile(r"^\.[0-9a-f]{24}\.[a-z0-9_]+\.tmp$")
# A temporary copy is removed at open only once it is this old (by its mtime): another process
# sharing the store (the sync agent, a CLI command) opens it while the daemon may be writing one
# right now, and that copy must survive to be renamed.
TEMP_MAX_AGE_SECONDS = 15 * 60
# A lease expires ``lease_seconds`` after its claim or renewal; one that expires more than this
# much further ahead was written before the wall clock stepped back (NTP, a box that booted
# with its clock ahead, an operator's ``date``): claimable again (``claim``), so that the images
# of a worker killed before the step wait at most this long, not the length of the step.
CLOCK_STEP_SLACK = 300.0
# Columns that set_state may change, and how their Python values are stored.
_FIELDS: dict[str, Callable[[Any], Any]] = {
    "record": lambda v: None if v is None else json.dumps(v), "decision": lambda v: v,
    "score": lambda v: None if v is None else float(v), "reasons": lambda v: json.dumps(list(v)),
    "audit": lambda v: int(bool(v)), "bundle_id": lambda v: v, "error": lambda v: v,
    "width": lambda v: v, "height": lambda v: v, "meta": lambda v: json.dumps(dict(v)),
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    image_id TEXT PRIMARY KEY, state TEXT NOT NULL, source TEXT NOT NULL,
    meta TEXT NOT NULL DEFAULT '{}', camera TEXT, width INTEGER, height INTEGER,
    record TEXT, decision TEXT, score REAL, reasons TEXT NOT NULL DEFAULT '[]',
    audit INTEGER NOT NULL DEFAULT 0, bundle_id TEXT, error TEXT,
    lease_owner TEXT, lease_expires REAL, attempts INTEGER NOT NULL DEFAULT 0,
    received_at REAL NOT NULL, updated_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS images_by_state ON images (state, received_at, image_id);
CREATE INDEX IF NOT EXISTS images_by_time ON images (received_at, image_id);
CREATE TABLE IF NOT EXISTS transitions (
    seq INTEGER PRIMARY KEY, image_id TEXT NOT NULL, from_state TEXT, to_state TEXT NOT NULL,
    at REAL NOT NULL, owner TEXT, note TEXT);
CREATE INDEX IF NOT EXISTS transitions_by_image ON transitions (image_id, seq);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
# Added after schema version 1 without a new version: a store written by this code stays readable
# by the code before it (rows are read by column name, the extra column is ignored), so rolling
# the program back does not lock the operator out of their store. Each runs when it is missing.
_COLUMNS = {"pruned_at": "ALTER TABLE images ADD COLUMN pruned_at REAL"}
_LATE_SCHEMA = """
CREATE INDEX IF NOT EXISTS images_unpruned_by_update ON images (state, updated_at, image_id) WHERE pruned_at IS NULL;
CREATE INDEX IF NOT EXISTS images_by_pruned ON images (pruned_at) WHERE pruned_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS images_by_bundle ON images (bundle_id, received_at, image_id);
CREATE INDEX IF NOT EXISTS images_by_camera ON images (camera, decision, received_at, image_id);
"""
# Held (``service.lockfile``) by the program that brings an old store up to date, for the whole
# upgrade, with its pid and the step it is on written in it. Another program that opens the store
# meanwhile waits as long as the lock is held, which the kernel ends when its holder dies (kill -9
# included), however long one step takes (an index of millions of images on an SD card, over
# NFS); a write lock with no upgrade behind it (an sqlite3 shell, a hung program) ends the wait
# at the busy timeout, as before the upgrade was stepwise. The upgrader removes it when done
# (``lockfile.release``): left behind, with a dead pid and its last step, it read as an upgrade
# still running. A waiter says when the upgrader is stopped (Ctrl-Z) and, every
# ``UPGRADE_REMIND_S`` on one step, what it is doing (a hung one named).
UPGRADE_LOCK = "upgrade.lock"
# How often a program waiting for another's upgrade looks whether it still holds ``UPGRADE_LOCK``.
UPGRADE_POLL_S = 0.5
UPGRADE_REMIND_S = 300.0

_LATE_INDEX_DDL = [t.strip() for t in _LATE_SCHEMA.split(";") if t.strip()]
_LATE_INDEXES = [re.search(r"EXISTS (\w+) ON", t).group(1) for t in _LATE_INDEX_DDL]  # type: ignore[union-attr]
# Images per state, kept by triggers in every transaction that inserts, moves or deletes a row
# (``counts``): counting them at each scrape and ``annotator status`` read the whole state index
# (a million-row store: 130 ms a call). Triggers live in the database, so every writer keeps the
# table right, this program's older versions too. A store without it gets it (counted once) at open.
_STATE_COUNTS = "CREATE TABLE state_counts (state TEXT PRIMARY KEY, n INTEGER NOT NULL)"
_STATE_TRIGGERS = (
    "CREATE TRIGGER IF NOT EXISTS state_counts_insert AFTER INSERT ON images BEGIN "
    "INSERT INTO state_counts (state, n) VALUES (new.state, 1) ON CONFLICT(state) DO UPDATE SET n = n + 1; END",
    "CREATE TRIGGER IF NOT EXISTS state_counts_delete AFTER DELETE ON images BEGIN "
    "UPDATE state_counts SET n = n - 1 WHERE state = old.state; END",
    "CREATE TRIGGER IF NOT EXISTS state_counts_update AFTER UPDATE OF state ON images "
    "WHEN old.state IS NOT new.state BEGIN "
    "UPDATE state_counts SET n = n - 1 WHERE state = old.state; "
    "INSERT INTO state_counts (state, n) VALUES (new.state, 1) ON CONFLICT(state) DO UPDATE SET n = n + 1; END",
)
_TRIGGER_NAMES = [re.search(r"EXISTS (\w+) AFTER", t).group(1) for t in _STATE_TRIGGERS]  # type: ignore[union-attr]
# The rows whose bytes ``prune_auto_images(before)`` removes (and ``pruned_bytes`` counts).
_PRUNABLE = f"state = '{AUTO_ACCEPTED}' AND pruned_at IS NULL AND updated_at < ?"
PRUNED_NOTE = "image bytes removed by retention"
RESTORED_NOTE = "image bytes restored (the same bytes came in again)"


def sequence_of(meta: Mapping[str, Any], camera: str | None) -> tuple[tuple[str, str], float | None] | None:
    """(camera, session) and the capture order of an image from its store metadata, or None
    without a session: the recording it belongs to, as its capture tool declared it. Session:
    ``meta["session"]`` (gRPC), else the drop path's folders between the camera folder and the
    file (``<camera>/<session>/frame.jpg``). Order: ``capture_time``, else the file's ``mtime``."""
    session = meta.get("session")
    path = meta.get("path")
    if not session and isinstance(path, str):
        parts = PurePosixPath(path).parts
        if len(parts) >= 3:
            session = "/".join(parts[1:-1])
    if not session:
        return None
    order = meta.get("capture_time", meta.get("mtime"))
    return (str(camera or meta.get("camera") or ""), str(session)), (float(order) if order is not None else None)


@dataclass(frozen=True)
class ImageRow:
    """One image as stored. Times are epoch seconds; width/height are pixels (None before annotation)."""

    image_id: str
    state: str
    source: str
    meta: dict
    width: int | None
    height: int | None
    record: dict | None
    decision: str | None
    score: float | None
    reasons: tuple[str, ...]
    audit: bool
    bundle_id: str | None
    error: str | None
    received_at: float
    updated_at: float
    camera: str | None
    lease_owner: str | None = None
    lease_expires: float | None = None
    attempts: int = 0
    pruned_at: float | None = None  # when retention removed the bytes (the record stays)

    @classmethod
    def from_sql(cls, r: sqlite3.Row) -> "ImageRow":
        return cls(
            image_id=r["image_id"], state=r["state"], source=r["source"], meta=json.loads(r["meta"]),
            width=r["width"], height=r["height"], record=None if r["record"] is None else json.loads(r["record"]),
            decision=r["decision"], score=r["score"], reasons=tuple(json.loads(r["reasons"])),
            audit=bool(r["audit"]), bundle_id=r["bundle_id"], error=r["error"], received_at=r["received_at"],
            updated_at=r["updated_at"], camera=r["camera"], lease_owner=r["lease_owner"],
            lease_expires=r["lease_expires"], attempts=r["attempts"], pruned_at=r["pruned_at"],
        )


@dataclass(frozen=True)
class Completion:
    """One image's result for ``Store.complete_many``.

    ``decision``: "auto_accepted" or "review"; ``counters``: extra counter names to add one to
    in the completing transaction (the judge's review-budget windows); "annotated" always is.
    """

    image_id: str
    record: dict
    bundle_id: str
    decision: str
    score: float
    reasons: tuple[str, ...] = ()
    audit: bool = False
    counters: tuple[str, ...] = ()


def _iso(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def image_file(root: Path, image_id: str) -> Path:
    """Where a store under ``root`` keeps the bytes of ``image_id`` (module doc's layout)."""
    return Path(root) / "images" / image_id[:2] / image_id


def is_image_id(text: str) -> bool:
    """Whether ``text`` is an image id as the store makes them (``image_id_of``: 64 lower-case hex digits)."""
    return _ID.fullmatch(text) is not None


def list_cursor(row: "ImageRow") -> str:
    """The ``Store.list`` cursor that goes on after ``row`` (a page cut short by its caller)."""
    return f"{row.received_at!r}|{row.image_id}"


def open_existing(root: Path, command: str, lease_seconds: float = 60.0) -> "Store":
    """The store under ``root`` for a command that reads what the daemon stored (``export``,
    ``show``, ``prune``): a root with no store (a mistyped ``store.root``, a forgotten
    ``--config``; ``Store`` would make an empty one and the command report nothing) and a store
    this user may not write are each one line naming ``command`` and what to fix."""
    root = Path(root)
    if not (root / "store.sqlite3").is_file():
        raise ConfigError(f"{command}: no store at {root} (store.root); has the daemon run with this config?")
    try:
        return Store(root, lease_seconds=lease_seconds)
    except sqlite3.OperationalError as exc:
        raise AnnotatorError(f"{command}: {open_failure('store', root, exc)}") from exc


def image_id_of(data: bytes) -> str:
    """The content address of image bytes: sha256 hex digest."""
    return hashlib.sha256(data).hexdigest()


class _UpgradeWait:
    """What a program waiting for another's upgrade says (the log; ``said[0]``, systemd's status),
    once per change: the upgrader's pid, command line and step; that it is stopped (it waited for
    ever without a word, and under systemd asked for more start time for ever: ``paused``, while
    stopped, lets systemd's own timeout apply) and resumed; and every ``UPGRADE_REMIND_S`` on one
    step, its state and the CPU it used meanwhile, so that a hung one (no CPU, waiting on its
    storage) is named. The command line, state and CPU only for a pid the kernel gave
    (``Held.known``)."""

    def __init__(self, db_path: Path, said: builtins.list[str]) -> None:
        self.db_path, self.said = db_path, said
        self.told: tuple[str, str, bool] | None = None
        self.paused = False
        self.remind, self.cpu = 0.0, 0.0

    def seen(self, held: Held, now: float) -> None:
        proc = process(held.pid) if held.known else None
        step = held.note or "step not known"  # just started, or a lock file the holder may not write
        stopped = proc is not None and proc.state in STOPPED
        who = f"pid {held.pid}" + (f" ({proc.command})" if proc is not None and proc.command else "")
        key = (held.pid, step, stopped)
        if key != self.told:
            if stopped:
                log.warning("store %s: %s, which brings it up to this release's layout (now %s), is %s: "
                            "waiting for it; resume it (fg in its terminal, or kill -CONT %s) or end it (kill %s: "
                            "the steps it did are kept and the rest are handed on)",
                            self.db_path, who, step, STOPPED[proc.state], held.pid, held.pid)  # type: ignore[union-attr]
                self.said[0] = (f"waiting for pid {held.pid}, which brings the store up to this release's layout "
                                f"({step}) and is {STOPPED[proc.state]}: resume or end it")  # type: ignore[union-attr]
            else:
                if self.told is None or self.told[0] != held.pid:
                    log.warning("store %s: %s is bringing it up to this release's layout (once after an upgrade; "
                                "now %s); waiting for it as long as it runs", self.db_path, who, step)
                elif self.told[2]:
                    log.warning("store %s: pid %s resumed (now %s); waiting for it", self.db_path, held.pid, step)
                else:
                    log.info("store %s: pid %s is bringing it up to this release's layout (once after an upgrade; "
                             "now %s); waiting for it as long as it runs", self.db_path, held.pid, step)
                self.said[0] = f"waiting for pid {held.pid}, which brings the store up to this release's layout ({step})"
            self.told, self.paused = key, stopped
            self.remind, self.cpu = now + UPGRADE_REMIND_S, proc.cpu_s if proc is not None else 0.0
        elif not stopped and now >= self.remind:
            span = f"{UPGRADE_REMIND_S / 60:.0f} min" if UPGRADE_REMIND_S >= 120 else f"{UPGRADE_REMIND_S:.0f} s"
            if proc is None:
                doing = "a large store takes minutes"
            elif proc.cpu_s - self.cpu >= 1.0:
                doing = f"it used {proc.cpu_s - self.cpu:.0f} s of CPU in the last {span}: working"
            elif proc.state == "D":
                doing = (f"it used no CPU in the last {span}, waiting on its storage (state D): "
                         "a hung disk or network mount?")
            else:
                doing = (f"it used no CPU in the last {span} (state {proc.state}): if that goes on, "
                         f"end it (kill {held.pid}: the steps it did are kept and the rest are handed on)")
            log.warning("store %s: still waiting for %s, on %s; %s", self.db_path, who, step, doing)
            self.remind, self.cpu = now + UPGRADE_REMIND_S, proc.cpu_s if proc is not None else 0.0


class Store:
    """Images, their life cycle, leases and persistent counters. Thread- and process-safe.

    Each thread gets its own SQLite connection; cross-process safety comes from SQLite's
    locking (``BEGIN IMMEDIATE`` + ``busy_timeout``) and from leases kept in the database.
    ``lease_seconds``: how long a claim is exclusive. ``min_free_bytes``: ingest refuses with
    ``StoreFull`` below this much free space on the store's file system.
    """

    def __init__(self, root: Path, lease_seconds: float = 60.0, min_free_bytes: int = 0,
                 clock: Callable[[], float] = time.time, *, max_attempts: int = 5,
                 busy_timeout_ms: int = 30_000) -> None:
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds: expected > 0, got {lease_seconds}")
        self.root = Path(root)
        self.lease_seconds = float(lease_seconds)
        self.min_free_bytes = int(min_free_bytes)
        self.clock = clock
        self.max_attempts = max_attempts
        self._closed = False
        (self.root / "images").mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / "store.sqlite3"
        self._conns = ThreadConnections(self.db_path, busy_timeout_ms)
        self._upgrade()

    def _missing_layout(self) -> list[str]:
        """What of this release's layout (``_COLUMNS``, ``_LATE_SCHEMA``, ``state_counts`` and
        its triggers) the database lacks; read without a lock (WAL: never blocked by a writer)."""
        db = self._conn()
        names = {r["name"] for r in db.execute("SELECT name FROM sqlite_master")}
        if "images" not in names:
            return ["tables"]
        have = {r["name"] for r in db.execute("PRAGMA table_info(images)")}
        return [c for c in _COLUMNS if c not in have] + \
            [n for n in (*_LATE_INDEXES, "state_counts", *_TRIGGER_NAMES) if n not in names]

    def _upgrade(self) -> None:
        """Create the tables, or bring a store an earlier release wrote up to this release's
        layout, one committed step at a time (each idempotent, re-checked under the write lock).

        On a large store this takes a while once after an upgrade (800,000 images: a minute on a
        2-core box with an SSD, the indexes most of it), so it is said in the log, and each step is
        its own transaction: a kill (systemd's start timeout included) keeps the steps that were
        done. Every program that opens the store runs it, and the daemon and the sync agent start
        together: the first holds ``UPGRADE_LOCK`` while it works, and the others wait for it as
        long as it runs (they said "database is locked ... a running daemon never holds it this
        long" and exited after the busy timeout, and later after five minutes without a step
        done, which one index on a slow card or a loaded box outlasts), saying for whom, and then
        take up the steps left (none, or those of a killed one). Under systemd both ask for more
        start time while it lasts (``systemd.Extender``)."""
        missing = self._missing_layout()
        if missing in ([], ["tables"]):  # this release's (only its version is checked), a new one (no time)
            self._upgrade_steps(missing, None, None)
            self._upgrade_leftover()
            return
        said = ["bringing the store up to this release's layout"]
        waiting = _UpgradeWait(self.db_path, said)
        with Extender(Notifier.from_environ(os.environ), lambda: said[0], lambda: not waiting.paused) as extender:
            fd = self._upgrade_lock(waiting, extender)
            waiting.paused = False
            extender.start()  # waited for another's (started then), or begins its own
            try:
                self._upgrade_steps(self._missing_layout(), fd, said)  # the one waited for may have done them
            finally:
                if fd is not None:
                    release(fd, self.root / UPGRADE_LOCK)

    def _upgrade_leftover(self) -> None:
        """Remove the ``UPGRADE_LOCK`` a killed upgrader left (nobody holds it), when there is one."""
        path = self.root / UPGRADE_LOCK
        if os.path.lexists(path):
            try:
                release(hold(path), path)
            except (Held, OSError):  # held: an upgrader finishing its last step removes it itself
                pass

    def _upgrade_lock(self, waiting: _UpgradeWait, extender: Extender) -> int | None:
        """Hold ``UPGRADE_LOCK``, waiting while another program holds it (``waiting`` says which,
        its step, and whether it is stopped); its descriptor, whose ``release`` removes the file
        and lets it go, or None where this user may not make it (a store root of another user's:
        the steps then run under the busy timeout alone, as before the lock). Another user's lock
        file that this user may not read is waited on while that user's program holds it
        (``lockfile.hold``), and refused, naming it, its owner and the fix, when nobody does (the
        steps ran without the lock, beside a second program of this user's doing the same)."""
        while True:
            try:
                return hold(self.root / UPGRADE_LOCK)
            except Held as held:
                waiting.seen(held, time.monotonic())
                extender.start()
                time.sleep(UPGRADE_POLL_S)
            except Unopenable as exc:
                raise StoreError(f"store {self.root}: cannot bring it up to this release's layout: "
                                 f"{exc.advice('store upgrade')}") from None
            except OSError as exc:
                log.debug("store %s: cannot hold %s (%s); upgrading without it", self.db_path, UPGRADE_LOCK, exc)
                return None

    def _upgrade_steps(self, missing: builtins.list[str], fd: int | None, said: builtins.list[str] | None) -> None:
        """Run the steps that bring in ``missing`` (only the version check when nothing is), each
        in its own transaction, saying in ``fd`` (``UPGRADE_LOCK``) and ``said[0]`` which one runs.
        A write lock held past the busy timeout raises: with the upgrade lock held it is no
        upgrade of this program's but another program's (an sqlite3 shell), said as a lock."""

        def base(db: sqlite3.Connection) -> None:
            apply_schema(db, _SCHEMA)
            row = db.execute("SELECT max(version) FROM schema_version").fetchone()
            if row[0] is None:
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif row[0] > SCHEMA_VERSION:
                raise StoreError(f"{self.db_path}: schema version {row[0]} is newer than this "
                                 f"program's {SCHEMA_VERSION}; upgrade the program")

        def columns(db: sqlite3.Connection) -> None:
            have = {r["name"] for r in db.execute("PRAGMA table_info(images)")}
            for column, ddl in _COLUMNS.items():
                if column not in have:
                    db.execute(ddl)

        def state_counts(db: sqlite3.Connection) -> None:  # the count and its triggers together
            if db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='state_counts'").fetchone() is None:
                db.execute(_STATE_COUNTS)
                db.execute("INSERT INTO state_counts (state, n) SELECT state, count(*) FROM images GROUP BY state")
            for trigger in _STATE_TRIGGERS:
                db.execute(trigger)

        steps: builtins.list[tuple[str, Callable[[sqlite3.Connection], Any]]] = [("tables", base)]
        if missing:
            steps += [("columns", columns),
                      *((f"index {name}", lambda db, ddl=ddl: db.execute(ddl))
                        for name, ddl in zip(_LATE_INDEXES, _LATE_INDEX_DDL)),
                      ("per-state counts", state_counts)]
        for n, (name, step) in enumerate(steps):
            if n == 1 and missing != ["tables"]:  # the version is not newer than this program's
                rows = self._conn().execute("SELECT max(rowid) FROM images").fetchone()[0] or 0
                log.warning("store %s: bringing a store of an earlier release up to this release's layout "
                            "(about %d images; %s); once, a large store takes minutes, and other programs "
                            "that open it wait", self.db_path, rows, ", ".join(missing))
            if said is not None:
                said[0] = f"bringing the store up to this release's layout: step {n + 1} of {len(steps)}, {name}"
            if fd is not None:
                note(fd, f"step {n + 1} of {len(steps)}: {name}")
            with self.transaction() as db:
                step(db)
        if said is not None:
            said[0] = "store brought up to this release's layout"

    def remove_stale_temps(self) -> None:
        """Remove the temporary image copies a killed ingest left under ``images/`` (see ``_TEMP``).

        Only names of that pattern, in the ``images/<xx>/`` folders, older than
        ``TEMP_MAX_AGE_SECONDS`` by the file system's (wall) clock, not the injected one: a copy
        being written now by a live process sharing the store is younger and stays. The daemon,
        which ingests, calls it once at its start (not every open: the sync agent and each CLI
        command open the store too, and the walk reads every ``images/<xx>/`` folder);
        the real images are never touched (their names are 64 hex digits, without a dot)."""
        cutoff = time.time() - TEMP_MAX_AGE_SECONDS
        removed = 0
        with os.scandir(self.root / "images") as folders:
            for folder in folders:
                if not folder.is_dir(follow_symlinks=False) or len(folder.name) != 2:
                    continue
                with os.scandir(folder.path) as entries:
                    for e in entries:
                        if not _TEMP.match(e.name):
                            continue
                        try:
                            if e.is_file(follow_symlinks=False) and e.stat(follow_symlinks=False).st_mtime < cutoff:
                                os.unlink(e.path)
                                removed += 1
                        except FileNotFoundError:
                            pass  # renamed or removed meanwhile by its writer
        if removed:
            log.info("removed %d temporary image copies left by interrupted ingests under %s",
                     removed, self.root / "images")

    # -- connections and transactions ------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreError(f"{self.db_path}: the store is closed")
        return self._conns.get()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on any exception). Not re-entrant."""
        with sqlite_transaction(self._conn()) as db:
            yield db

    def close(self) -> None:
        """Close every thread's connection. The store is unusable afterwards."""
        self._closed = True
        self._conns.close()

    @staticmethod
    def _log(db: sqlite3.Connection, image_id: str, old: str | None, new: str, at: float,
             owner: str | None = None, note: str | None = None) -> None:
        db.execute("INSERT INTO transitions (image_id, from_state, to_state, at, owner, note) VALUES (?,?,?,?,?,?)",
                   (image_id, old, new, at, owner, note))

    # -- files ---------------------------------------------------------------------------
    def image_path(self, image_id: str) -> Path:
        """Where the bytes of ``image_id`` live (whether or not they exist)."""
        if not _ID.match(image_id):
            raise ImageNotFound(f"image id must be 64 lower-case hex digits (sha256), got {image_id!r}")
        return image_file(self.root, image_id)

    def image_bytes(self, image_id: str) -> bytes:
        try:
            return self.image_path(image_id).read_bytes()
        except FileNotFoundError as exc:
            row = self.get(image_id)
            if row is not None and row.pruned_at is not None:
                raise ImageNotFound(f"image {image_id}: its bytes were removed by retention "
                                    f"([retention] auto_image_days) at {_iso(row.pruned_at)}; the record stays") from exc
            raise ImageNotFound(f"no image {image_id} in {self.root}") from exc

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def paused_reason(self) -> str | None:
        """Why ingest is refused right now, or None when it is accepted."""
        free = self.free_bytes()
        if free < self.min_free_bytes:
            return (f"free disk space {free / 1e6:.0f} MB below the floor of "
                    f"{self.min_free_bytes / 1e6:.0f} MB on {self.root} (free space; [retention] in the config "
                    f"lets the daemon remove old copies)")
        return None

    # -- life cycle ----------------------------------------------------------------------
    def ingest(self, data: bytes, source: str, meta: dict | None = None) -> tuple[str, bool]:
        """Keep the bytes and a ``received`` row. Returns (image_id, created).

        Duplicate bytes return (id, False) and change nothing. ``meta["camera"]``, when present,
        is stored as the camera name. Raises ``StoreFull`` below the disk floor.
        """
        if not data:
            raise StoreError("ingest: empty image bytes")
        image_id = image_id_of(data)
        existing = self.get(image_id)
        if existing is not None:
            if existing.pruned_at is not None:
                self._restore(image_id, data)
            return image_id, False
        reason = self.paused_reason()
        if reason is not None:
            raise StoreFull(f"ingest refused: {reason}")
        path = self.image_path(image_id)
        if not path.exists():
            write_bytes_atomic(path, data, sync_dir=True)
        meta = dict(meta or {})
        camera = meta.get("camera")
        now = self.clock()
        with self.transaction() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO images (image_id, state, source, meta, camera, received_at, updated_at) "
                "VALUES (?,?,?,?,?,?,?)",
                (image_id, RECEIVED, source, json.dumps(meta), None if camera is None else str(camera), now, now))
            created = cur.rowcount == 1
            if created:
                self._log(db, image_id, None, RECEIVED, now, note=source)
        if created:
            log.debug("received %s from %s", image_id[:12], source)
        return image_id, created

    def _restore(self, image_id: str, data: bytes) -> None:
        """Bytes retention removed came in again: keep them, as an image's bytes are kept (not
        annotated again: the record is there). The file is written and the mark cleared under
        the write lock, which a prune's unlink takes too (``_unlink``): neither can undo the
        other half-way. A self-transition noted ``RESTORED_NOTE`` brings its auto label back
        into the sync agent's dataset."""
        reason = self.paused_reason()
        if reason is not None:
            raise StoreFull(f"ingest refused: {reason}")
        with self.transaction() as db:
            r = db.execute("SELECT state, pruned_at FROM images WHERE image_id=?", (image_id,)).fetchone()
            if r is None or r["pruned_at"] is None:
                return  # restored meanwhile
            write_bytes_atomic(self.image_path(image_id), data, sync_dir=True)
            now = self.clock()
            db.execute("UPDATE images SET pruned_at=NULL, updated_at=? WHERE image_id=?", (now, image_id))
            self._log(db, image_id, r["state"], r["state"], now, None, RESTORED_NOTE)
        log.info("image %s: bytes that retention removed came in again; kept", image_id[:12])

    def claim(self, owner: str, limit: int = 8, *, fail_exhausted: bool = True) -> builtins.list[ImageRow]:
        """Lease up to ``limit`` received images (unleased or lease expired) to ``owner``, oldest first.

        Only images never claimed before share a batch: the oldest image, when it was claimed
        before, is leased alone, and a batch of fresh images stops before the first one that was
        (it leads the next claim). A batch re-claimed after its worker died holds the image that
        killed it, whichever it was; one at a time, that image fails alone after ``max_attempts``
        claims instead of taking the whole batch with it.

        An image already claimed ``max_attempts`` times: with ``fail_exhausted`` it is failed here
        (reason: the claims; the "failed" counter goes up in the same transaction) and skipped;
        without, it is leased to ``owner`` alone like any retry, and ``exhausted(row)`` gives the
        reason the caller must fail it with (the daemon writes the quarantine copy and reason
        file, answers its waiters and counts it, as for any other failed image).
        """
        now = self.clock()
        stepped = now + self.lease_seconds + CLOCK_STEP_SLACK  # a lease ending after this: the clock went back
        with self.transaction() as db:
            rows = db.execute(
                "SELECT * FROM images WHERE state = ? AND (lease_owner IS NULL OR lease_expires <= ? "
                "OR lease_expires > ?) ORDER BY received_at, image_id LIMIT ?",
                (RECEIVED, now, stepped, limit)).fetchall()
            out: builtins.list[str] = []
            for r in rows:
                if r["attempts"] >= self.max_attempts and fail_exhausted:
                    reason = self._exhausted_reason(r["attempts"])
                    db.execute("UPDATE images SET state=?, error=?, lease_owner=NULL, lease_expires=NULL, "
                               "updated_at=? WHERE image_id=?", (FAILED, reason, now, r["image_id"]))
                    self._log(db, r["image_id"], RECEIVED, FAILED, now, owner, reason)
                    self._bump(db, "failed", 1)
                    log.warning("image %s failed: %s", r["image_id"][:12], reason)
                    continue
                retry = r["attempts"] > 0
                if retry and out:
                    break  # a retry goes alone; it leads the next claim
                if r["lease_owner"] is not None and r["lease_expires"] is not None and r["lease_expires"] > stepped:
                    log.warning("lease of %s held by %s ends %.0f s from now, more than the %g s a lease lasts: "
                                "the wall clock stepped back; %s takes it over", r["image_id"][:12],
                                r["lease_owner"], r["lease_expires"] - now, self.lease_seconds, owner)
                elif r["lease_owner"] is not None:
                    log.info("lease of %s held by %s expired; %s takes it over",
                             r["image_id"][:12], r["lease_owner"], owner)
                db.execute("UPDATE images SET lease_owner=?, lease_expires=?, attempts=attempts+1 WHERE image_id=?",
                           (owner, now + self.lease_seconds, r["image_id"]))
                out.append(r["image_id"])
                if retry:
                    break
            fresh = [db.execute("SELECT * FROM images WHERE image_id=?", (i,)).fetchone() for i in out]
        return [ImageRow.from_sql(r) for r in fresh]

    def _exhausted_reason(self, attempts: int) -> str:
        return (f"claimed {attempts} times without finishing: each worker that took it died or lost its lease "
                f"before completing it (a crash loop on this image?)")

    def exhausted(self, row: ImageRow) -> str | None:
        """Why a row that ``claim(fail_exhausted=False)`` handed out must be failed instead of
        annotated (it had been claimed ``max_attempts`` times already), or None for a row to try."""
        if row.attempts <= self.max_attempts:
            return None
        return self._exhausted_reason(self.max_attempts)

    def renew(self, owner: str, image_ids: Sequence[str]) -> int:
        """Extend ``owner``'s leases on these images by ``lease_seconds`` from now; returns how many."""
        return len(self.renew_held(owner, image_ids))

    def renew_held(self, owner: str, image_ids: Sequence[str]) -> builtins.list[str]:
        """``renew``, returning the ids (in the given order) whose lease ``owner`` still held: the
        others were taken over after their lease expired, or finished. A worker writes outputs
        only for those, not over what the new owner wrote."""
        now = self.clock()
        held: builtins.list[str] = []
        with self.transaction() as db:
            for i in image_ids:
                if db.execute("UPDATE images SET lease_expires=? WHERE image_id=? AND lease_owner=? AND state=?",
                              (now + self.lease_seconds, i, owner, RECEIVED)).rowcount:
                    held.append(i)
        return held

    def _held(self, db: sqlite3.Connection, image_id: str, owner: str) -> sqlite3.Row:
        r = db.execute("SELECT * FROM images WHERE image_id=?", (image_id,)).fetchone()
        if r is None:
            raise ImageNotFound(f"no image {image_id} in the store")
        if r["state"] != RECEIVED or r["lease_owner"] != owner:
            raise LeaseLost(f"{owner} no longer holds the lease on {image_id[:12]} "
                            f"(state {r['state']}, lease owner {r['lease_owner']})", image_id)
        return r

    def complete(self, image_id: str, owner: str, record: dict, bundle_id: str, decision: str,
                 score: float, reasons: Sequence[str], audit: bool, counters: Sequence[str] = ()) -> None:
        """received -> annotated -> auto_accepted | review_pending, in one transaction; releases the lease.

        ``decision`` is "auto_accepted" or "review". The counter "annotated" and each name in
        ``counters`` (e.g. the review budget's) go up by one in the same transaction. Raises
        ``LeaseLost`` (changing nothing) when ``owner`` does not hold the lease any more.
        """
        lost = self.complete_many(owner, [Completion(image_id, record, bundle_id, decision, score,
                                                     tuple(reasons), audit, tuple(counters))])
        if lost:
            raise lost[0]

    def complete_many(self, owner: str, completions: Sequence["Completion"]) -> builtins.list[LeaseLost]:
        """``complete`` for a whole batch in ONE transaction (one commit, one fsync).

        Images whose lease ``owner`` lost are skipped (nothing changes for them) and returned
        as ``LeaseLost`` errors, each with the ``image_id`` it is about; the others are completed.
        ``ImageNotFound`` or a bad decision rolls the whole batch back.
        """
        for c in completions:
            if c.decision not in DECISIONS:
                raise ValueError(f"decision: expected one of {sorted(DECISIONS)}, got {c.decision!r}")
        lost: builtins.list[LeaseLost] = []
        bumps: dict[str, int] = {}
        now = self.clock()
        with self.transaction() as db:
            for c in completions:
                try:
                    self._held(db, c.image_id, owner)
                except LeaseLost as exc:
                    lost.append(exc)
                    continue
                target = DECISIONS[c.decision]
                db.execute(
                    "UPDATE images SET state=?, record=?, bundle_id=?, decision=?, score=?, reasons=?, audit=?, "
                    "width=?, height=?, error=NULL, lease_owner=NULL, lease_expires=NULL, updated_at=? "
                    "WHERE image_id=?",
                    (target, json.dumps(c.record), c.bundle_id, c.decision, float(c.score), json.dumps(list(c.reasons)),
                     int(bool(c.audit)), c.record.get("width"), c.record.get("height"), now, c.image_id))
                self._log(db, c.image_id, RECEIVED, ANNOTATED, now, owner, c.bundle_id)
                self._log(db, c.image_id, ANNOTATED, target, now, owner, ",".join(c.reasons) or None)
                for name in ("annotated", *c.counters):
                    bumps[name] = bumps.get(name, 0) + 1
            for name, delta in bumps.items():
                self._bump(db, name, delta)
        return lost

    def fail(self, image_id: str, owner: str | None, reason: str) -> None:
        """-> failed with ``reason``. With an owner, that owner must hold the lease (else ``LeaseLost``).

        The "failed" counter goes up in the same transaction (as in ``claim``): counted apart, a
        kill between the two commits left the image failed and the counter one short for good.
        """
        now = self.clock()
        with self.transaction() as db:
            if owner is not None:
                old = self._held(db, image_id, owner)["state"]
            else:
                r = db.execute("SELECT state FROM images WHERE image_id=?", (image_id,)).fetchone()
                if r is None:
                    raise ImageNotFound(f"no image {image_id} in the store")
                old = r["state"]
            db.execute("UPDATE images SET state=?, error=?, lease_owner=NULL, lease_expires=NULL, updated_at=? "
                       "WHERE image_id=?", (FAILED, reason, now, image_id))
            self._log(db, image_id, old, FAILED, now, owner, reason)
            if old != FAILED:  # failing a failed image again counts nothing
                self._bump(db, "failed", 1)
        log.warning("image %s failed: %s", image_id[:12], reason)

    def expire_leases(self, but: str) -> int:
        """End every lease held by another owner than ``but`` now (their claims stay counted:
        ``max_attempts`` still catches an image that kills its daemon); returns how many. For a
        daemon that knows it is the only one on the store (``serve.lock``): the leases a killed
        daemon left were taken over only when they expired, up to ``lease_seconds`` after the
        restart (a minute by default, the images waiting)."""
        now = self.clock()
        with self.transaction() as db:
            return db.execute("UPDATE images SET lease_expires=? WHERE state=? AND lease_owner IS NOT NULL "
                              "AND lease_owner != ? AND (lease_expires IS NULL OR lease_expires > ?)",
                              (now, RECEIVED, but, now)).rowcount

    def release(self, owner: str) -> int:
        """Give back every lease ``owner`` holds (at shutdown); returns how many."""
        with self.transaction() as db:
            return db.execute("UPDATE images SET lease_owner=NULL, lease_expires=NULL, attempts=max(attempts-1, 0) "
                              "WHERE lease_owner=? AND state=?", (owner, RECEIVED)).rowcount

    def set_state(self, image_id: str, from_states: Sequence[str], to_state: str, **fields: Any) -> bool:
        """Move an image from one of ``from_states`` to ``to_state``, setting ``fields``.

        Returns False (changing nothing) when the image is in another state. Fields: record,
        decision, score, reasons, audit, bundle_id, error, width, height, meta. A move into
        ``failed`` adds one to the "failed" counter in the same transaction, as ``fail`` does.
        """
        for s in (*from_states, to_state):
            if s not in STATES:
                raise ValueError(f"unknown state {s!r}; expected one of {STATES}")
        unknown = set(fields) - set(_FIELDS)
        if unknown:
            raise ValueError(f"set_state: unknown fields {sorted(unknown)}; allowed {sorted(_FIELDS)}")
        now = self.clock()
        cols = "".join(f", {k}=?" for k in fields)
        values = [_FIELDS[k](v) for k, v in fields.items()]
        with self.transaction() as db:
            r = db.execute("SELECT state FROM images WHERE image_id=?", (image_id,)).fetchone()
            if r is None or r["state"] not in from_states:
                return False
            db.execute(f"UPDATE images SET state=?, updated_at=?, lease_owner=NULL, lease_expires=NULL{cols} "
                       "WHERE image_id=?", (to_state, now, *values, image_id))
            self._log(db, image_id, r["state"], to_state, now, None, fields.get("error"))
            if to_state == FAILED and r["state"] != FAILED:  # counted as ``fail`` counts (one transaction)
                self._bump(db, "failed", 1)
        return True

    # -- retention -----------------------------------------------------------------------
    def prune_auto_images(self, before: float, limit: int = 500) -> tuple[builtins.list[str], int]:
        """Remove the bytes of up to ``limit`` images auto-accepted before ``before`` (by
        ``updated_at``, which for an unpruned auto-accepted row is when it was accepted: an image
        of a backlog accepted today is kept its days too), oldest first; returns their ids and
        the bytes freed. Call again until fewer than ``limit`` come back.

        Rows are marked (``pruned_at``, a self-transition noted ``PRUNED_NOTE``) and committed
        before any file goes, so a reader never finds a row claiming bytes that are gone; a kill
        between the commit and the unlinks leaves files that ``sweep_pruned`` removes on the next
        pass. Only ``auto_accepted``: reviewed images are the human work training needs, and
        every other state is still in work (a review pending, an upload, an annotation)."""
        now = self.clock()
        with self.transaction() as db:
            ids = [r[0] for r in db.execute(f"SELECT image_id FROM images WHERE {_PRUNABLE} "
                                            "ORDER BY updated_at, image_id LIMIT ?", (float(before), int(limit)))]
            for image_id in ids:
                db.execute("UPDATE images SET pruned_at=?, updated_at=? WHERE image_id=?", (now, now, image_id))
                self._log(db, image_id, AUTO_ACCEPTED, AUTO_ACCEPTED, now, None, PRUNED_NOTE)
        return ids, self._unlink(ids)[1]

    def sweep_pruned(self, since: float) -> int:
        """Remove the files left of images pruned at or after ``since`` (a kill between
        ``prune_auto_images``'s commit and its unlinks, or unlinks a power loss undid); returns
        how many were still there."""
        ids = [r[0] for r in self._conn().execute(
            "SELECT image_id FROM images WHERE pruned_at IS NOT NULL AND pruned_at >= ?", (float(since),))]
        return self._unlink(ids)[0]

    def _unlink(self, ids: Sequence[str]) -> tuple[int, int]:
        """Unlink the files of those of these images that are still marked pruned, under the
        write lock (a restore, ``_restore``, writes its file and clears the mark under it: a
        file restored after the mark is never removed), then fsync their folders (a removal a
        power loss undid would otherwise stay on disk for good). Returns (files, bytes)."""
        removed = size = 0
        folders: set[Path] = set()
        for start in range(0, len(ids), 500):
            chunk = list(ids[start:start + 500])
            with self.transaction() as db:
                marks = ",".join("?" * len(chunk))
                for (image_id,) in db.execute(f"SELECT image_id FROM images WHERE pruned_at IS NOT NULL AND "
                                              f"image_id IN ({marks})", chunk).fetchall():
                    path = self.image_path(image_id)
                    try:
                        n = path.stat().st_size
                        path.unlink()
                    except FileNotFoundError:
                        continue
                    removed += 1
                    size += n
                    folders.add(path.parent)
        for folder in folders:
            fsync_dir(folder)
        return removed, size

    def pruned_bytes(self, before: float) -> tuple[int, int]:
        """(images, bytes) that ``prune_auto_images(before)`` would remove now: a dry run."""
        count = size = 0
        for r in self._conn().execute(f"SELECT image_id FROM images WHERE {_PRUNABLE}", (float(before),)):
            try:
                size += self.image_path(r[0]).stat().st_size
                count += 1
            except FileNotFoundError:
                pass
        return count, size

    # -- queries -------------------------------------------------------------------------
    def get(self, image_id: str) -> ImageRow | None:
        r = self._conn().execute("SELECT * FROM images WHERE image_id=?", (image_id,)).fetchone()
        return None if r is None else ImageRow.from_sql(r)

    def find(self, prefix: str, limit: int = 2) -> builtins.list[ImageRow]:
        """Images whose id starts with ``prefix`` (lower-case hex), by id: an id as people quote
        it, shortened (the status table and the sidecars show 12 digits)."""
        rows = self._conn().execute("SELECT * FROM images WHERE image_id >= ? AND image_id < ? ORDER BY image_id "
                                    "LIMIT ?", (prefix, prefix + "g", int(limit))).fetchall()
        return [ImageRow.from_sql(r) for r in rows]

    def newest(self, limit: int, state: str | None = None, decision: str | None = None,
               camera: str | None = None) -> builtins.list[ImageRow]:
        """The ``limit`` newest images by arrival, newest first; without ``state`` only annotated
        ones (with a record)."""
        if camera is not None and decision is None:
            # One camera: its newest of each decision (``images_by_camera``), merged. Filtered
            # while walking every image newest first, a camera with few images read the store.
            # Without a state only images with a record, and those have a decision (``complete``
            # sets both): the images without one (received, failed before annotation) are not read.
            rows = [r for d in self._decisions(camera) if d is not None or state is not None
                    for r in self._newest(limit, state, d, camera, d is None)]
            rows.sort(key=lambda r: (r.received_at, r.image_id), reverse=True)
            return rows[:limit]
        return self._newest(limit, state, decision, camera)

    def _newest(self, limit: int, state: str | None, decision: str | None, camera: str | None,
                undecided: bool = False) -> builtins.list[ImageRow]:
        """``newest`` in one query; ``undecided``: only the images without a decision."""
        where: builtins.list[str] = ["record IS NOT NULL"] if state is None else []
        where += ["decision IS NULL"] if undecided else []
        args: builtins.list[Any] = []
        for col, val in (("state", state), ("decision", decision), ("camera", camera)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        rows = self._conn().execute(f"SELECT * FROM images WHERE {' AND '.join(where) or '1'} "
                                    "ORDER BY received_at DESC, image_id DESC LIMIT ?", (*args, int(limit))).fetchall()
        return [ImageRow.from_sql(r) for r in rows]

    def _cameras(self) -> Iterator[str]:
        """Every camera name in the store, in order: one index seek each (``images_by_camera``)."""
        db = self._conn()
        r = db.execute("SELECT camera FROM images WHERE camera IS NOT NULL ORDER BY camera LIMIT 1").fetchone()
        while r is not None:
            yield r[0]
            r = db.execute("SELECT camera FROM images WHERE camera > ? ORDER BY camera LIMIT 1", (r[0],)).fetchone()

    def _decisions(self, camera: str) -> builtins.list[str | None]:
        """The decisions (None: none yet) the images of ``camera`` have: one index seek each."""
        db = self._conn()
        out: builtins.list[str | None] = []
        if db.execute("SELECT 1 FROM images WHERE camera = ? AND decision IS NULL LIMIT 1", (camera,)).fetchone():
            out.append(None)
        r = db.execute("SELECT decision FROM images WHERE camera = ? AND decision IS NOT NULL ORDER BY decision "
                       "LIMIT 1", (camera,)).fetchone()
        while r is not None:
            out.append(r[0])
            r = db.execute("SELECT decision FROM images WHERE camera = ? AND decision > ? ORDER BY decision LIMIT 1",
                           (camera, r[0])).fetchone()
        return out

    def history(self, image_id: str) -> builtins.list[tuple[str | None, str, float, str | None]]:
        """The image's transitions, oldest first: (from_state, to_state, at, note)."""
        rows = self._conn().execute("SELECT from_state, to_state, at, note FROM transitions WHERE image_id=? "
                                    "ORDER BY seq", (image_id,)).fetchall()
        return [tuple(r) for r in rows]

    def list(self, state: str | None = None, decision: str | None = None, since: float | None = None,
             until: float | None = None, limit: int = 100, after: str | None = None) -> tuple[builtins.list[ImageRow], str | None]:
        """Images ordered by (received_at, image_id); ``since <= received_at < until``.

        Keyset paging: pass the returned cursor as ``after`` for the next page; None = last page.
        """
        where: builtins.list[str] = []
        args: builtins.list[Any] = []
        for col, val in (("state", state), ("decision", decision)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        if since is not None:
            where.append("received_at >= ?")
            args.append(since)
        if until is not None:
            where.append("received_at < ?")
            args.append(until)
        if after:
            try:
                at, _, last_id = after.partition("|")
                args.extend([float(at), last_id])
            except ValueError as exc:
                raise StoreError(f"list: malformed cursor {after!r}") from exc
            # A row value, which SQLite seeks to in the index: the same test spelt with OR read
            # every row of the state (of the store, unfiltered) before the cursor, page after page.
            where.append("(received_at, image_id) > (?, ?)")
        sql = "SELECT * FROM images" + (" WHERE " + " AND ".join(where) if where else "")
        rows = self._conn().execute(sql + " ORDER BY received_at, image_id LIMIT ?", (*args, limit + 1)).fetchall()
        page = [ImageRow.from_sql(r) for r in rows[:limit]]
        cursor = list_cursor(page[-1]) if len(rows) > limit and page else None
        return page, cursor

    def entered(self, state: str, after: int = 0, limit: int = 100) -> tuple[builtins.list[ImageRow], int]:
        """Images that moved into ``state`` by a transition after ``after`` (a transition ``seq``)
        and are still in it, in commit order; returns them and the last ``seq`` read (``after``
        when none): pass it as ``after`` next time.

        Unlike paging by arrival (``list``), this misses nothing that enters later: SQLite admits
        one writer at a time and ``seq`` grows with every insert (transitions are never deleted),
        so a transition committed after this read has a larger ``seq`` than any read here, even
        for an image that arrived long before (a slow worker, an expired lease)."""
        rows = self._conn().execute(
            "SELECT t.seq AS t_seq, i.* FROM transitions t JOIN images i ON i.image_id = t.image_id "
            "WHERE t.seq > ? AND t.to_state = ? ORDER BY t.seq LIMIT ?", (int(after), state, limit)).fetchall()
        last = int(rows[-1]["t_seq"]) if rows else int(after)
        return [ImageRow.from_sql(r) for r in rows if r["state"] == state], last

    def last_transition(self) -> int:
        """The ``seq`` of the newest transition (0 for an empty store)."""
        return int(self._conn().execute("SELECT coalesce(max(seq), 0) FROM transitions").fetchone()[0])

    def latest_per_camera(self, decision: str, per_camera: int) -> builtins.list[ImageRow]:
        """The ``per_camera`` newest images of each camera with ``decision``, oldest first
        (images without a camera form one group)."""
        # Camera by camera through ``images_by_camera`` (the rows read are the rows returned): a
        # window over every image with the decision read and sorted them all at each start.
        db = self._conn()
        rows = db.execute("SELECT * FROM images WHERE camera IS NULL AND decision = ? "
                          "ORDER BY received_at DESC, image_id DESC LIMIT ?", (decision, per_camera)).fetchall()
        for camera in builtins.list(self._cameras()):
            rows += db.execute("SELECT * FROM images WHERE camera = ? AND decision = ? "
                               "ORDER BY received_at DESC, image_id DESC LIMIT ?", (camera, decision, per_camera))
        rows.sort(key=lambda r: (r["received_at"], r["image_id"]))
        return [ImageRow.from_sql(r) for r in rows]

    def recent_scores(self, bundle_id: str, limit: int) -> builtins.list[tuple[float, float | None, tuple[str, ...]]]:
        """(score, doubt, reasons) of the ``limit`` newest images (by arrival) the bundle
        ``bundle_id`` judged, oldest first; doubt is the record's ``judgement.doubt`` (None where
        the judge did not rank). By arrival, not by the last update: an upload or a merged review
        later touches a row."""
        rows = self._conn().execute(
            "SELECT score, reasons, json_extract(record, '$.judgement.doubt') AS doubt FROM images "
            "WHERE bundle_id = ? AND score IS NOT NULL ORDER BY received_at DESC, image_id DESC LIMIT ?",
            (bundle_id, limit)).fetchall()
        return [(float(r["score"]), None if r["doubt"] is None else float(r["doubt"]), tuple(json.loads(r["reasons"])))
                for r in reversed(rows)]

    def counts(self) -> dict[str, int]:
        """Number of images per state; every state is present."""
        out = dict.fromkeys(STATES, 0)
        for state, n in self._conn().execute("SELECT state, n FROM state_counts"):  # kept by triggers
            if n or state in out:
                out[state] = n
        return out

    # -- counters ------------------------------------------------------------------------
    @staticmethod
    def _bump(db: sqlite3.Connection, name: str, delta: int) -> None:
        db.execute("INSERT INTO counters (name, value) VALUES (?, ?) "
                   "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value", (name, int(delta)))

    def counter(self, name: str, delta: int = 0) -> int:
        """Add ``delta`` to a persistent counter (created at 0) and return its new value.

        ``delta == 0`` only reads (no write transaction, no fsync); a missing counter reads 0.
        """
        if delta == 0:
            r = self._conn().execute("SELECT value FROM counters WHERE name=?", (name,)).fetchone()
            return 0 if r is None else int(r[0])
        with self.transaction() as db:
            self._bump(db, name, delta)
            return int(db.execute("SELECT value FROM counters WHERE name=?", (name,)).fetchone()[0])

    def set_counter(self, name: str, value: int) -> None:
        """Set a persistent counter to ``value`` (a mark, e.g. when a task last started)."""
        with self.transaction() as db:
            db.execute("INSERT INTO counters (name, value) VALUES (?, ?) "
                       "ON CONFLICT(name) DO UPDATE SET value = excluded.value", (name, int(value)))

    def take(self, name: str, limit: int) -> bool:
        """Atomically add 1 to counter ``name`` if it is below ``limit``; True when taken."""
        with self.transaction() as db:
            r = db.execute("SELECT value FROM counters WHERE name=?", (name,)).fetchone()
            if r is not None and r[0] >= limit:
                return False
            db.execute("INSERT INTO counters (name, value) VALUES (?, 1) "
                       "ON CONFLICT(name) DO UPDATE SET value = value + 1", (name,))
            return True
