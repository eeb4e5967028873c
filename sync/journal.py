"""The sync journal: which image is in which upload batch, and how far each got.

Its own SQLite database (WAL) next to the daemon's store (``<store root>/sync.sqlite3``), so
the daemon's schema stays the daemon's. It is what makes uploads exactly-once across crashes:

- ``batches``: ``open`` (objects going up) -> ``manifest`` (manifest written) -> ``done``
  (every image marked ``uploaded`` in the store). At most one batch is open at a time.
- ``items``: one row per image ever batched: ``pending`` -> ``sent`` (its image and
  pre-annotation objects exist; its manifest line is frozen here) -> ``marked``; or
  ``dropped``, before anything of it was sent: it left ``review_pending`` (the uploader fails
  an image that can never be uploaded, with its reason, before dropping it), so it never
  leaves the box. A dropped image that is ``review_pending`` again is batched again: its item
  moves to the new batch (nothing of it is in the old batch's manifest).
- ``objects``: per-object status (``sent``, or ``present``: found already there with the
  right checksum), for inspection and counting.
- ``submissions``: which ``done`` batch was handed to which review backend, and when (written
  after the backend accepted it, so each batch is submitted once per backend; a crash in
  between repeats a submit, which backends treat as a no-op per image). A row says the batch
  was handed over, not that the backend still holds it: ``sync.submit`` re-submits the images a
  backend reports missing (a Label Studio project or task deleted).

The manifest of a batch is built from its ``sent`` items' frozen lines in position order, so
it is the same bytes however often it is rebuilt.
"""
from __future__ import annotations

import contextlib
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from service.sqlite import ThreadConnections, apply_schema
from service.sqlite import transaction as sqlite_transaction

from .errors import disk_fault, io_fault_of

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    batch_id TEXT PRIMARY KEY, seq INTEGER NOT NULL UNIQUE, state TEXT NOT NULL,
    created_at REAL NOT NULL, manifest_key TEXT, manifest_sha256 TEXT, finished_at REAL);
CREATE TABLE IF NOT EXISTS items (
    image_id TEXT PRIMARY KEY, batch_id TEXT NOT NULL REFERENCES batches(batch_id),
    position INTEGER NOT NULL, state TEXT NOT NULL DEFAULT 'pending',
    image_key TEXT, pre_key TEXT, line TEXT, note TEXT);
CREATE INDEX IF NOT EXISTS items_by_batch ON items (batch_id, position);
CREATE TABLE IF NOT EXISTS objects (
    key TEXT PRIMARY KEY, sha256 TEXT NOT NULL, size INTEGER NOT NULL, status TEXT NOT NULL,
    batch_id TEXT, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS submissions (
    batch_id TEXT NOT NULL REFERENCES batches(batch_id), backend TEXT NOT NULL, at REAL NOT NULL,
    items INTEGER NOT NULL, PRIMARY KEY (batch_id, backend));
"""


@dataclass(frozen=True)
class Batch:
    batch_id: str
    seq: int
    state: str
    manifest_key: str | None
    manifest_sha256: str | None


@dataclass(frozen=True)
class Item:
    image_id: str
    batch_id: str
    position: int
    state: str
    image_key: str | None
    pre_key: str | None
    line: str | None


class Journal:
    """The journal database at ``path``; one connection per thread, ``BEGIN IMMEDIATE`` writes."""

    def __init__(self, path: Path, clock: Callable[[], float]) -> None:
        self.path = Path(path)
        self.clock = clock
        self._conns = ThreadConnections(self.path)
        try:
            with self.transaction() as db:
                apply_schema(db, _SCHEMA)
        except BaseException:  # a disk that refuses the first write: the agent opens it again later
            self._conns.close()
            raise

    def _conn(self) -> sqlite3.Connection:
        return self._conns.get()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``. A disk that refuses the write (full, read-only, I/O
        errors) is a ``DiskFault`` naming the journal and the free space: the transaction left
        nothing behind (SQLite rolled it back) and the step is repeated later."""
        try:
            with sqlite_transaction(self._conn()) as db:
                yield db
        except sqlite3.OperationalError as exc:
            fault = io_fault_of(exc)
            if fault is None:
                raise
            raise disk_fault(f"the sync journal {self.path}", fault, self.path.parent) from exc

    def close(self) -> None:
        self._conns.close()

    # -- batches ------------------------------------------------------------------------
    def unfinished_batch(self) -> Batch | None:
        """The oldest batch that is not ``done`` (there is at most one in normal operation)."""
        r = self._conn().execute("SELECT * FROM batches WHERE state != 'done' ORDER BY seq LIMIT 1").fetchone()
        return None if r is None else _batch(r)

    def known(self, image_ids: Sequence[str]) -> set[str]:
        """Which of these images are already in some batch."""
        marks = ",".join("?" * len(image_ids))
        rows = self._conn().execute(f"SELECT image_id FROM items WHERE image_id IN ({marks})", tuple(image_ids))
        return {r[0] for r in rows}

    def batched(self, image_ids: Sequence[str]) -> set[str]:
        """Which of these images are in some batch for good: every item but a ``dropped`` one.
        A dropped image never left the box; while it is ``review_pending`` it may be batched
        again (``create_batch`` moves its item)."""
        marks = ",".join("?" * len(image_ids))
        rows = self._conn().execute(f"SELECT image_id FROM items WHERE state != 'dropped' AND image_id IN ({marks})",
                                    tuple(image_ids))
        return {r[0] for r in rows}

    def create_batch(self, image_ids: Sequence[str], name: Callable[[int], str]) -> Batch:
        """A new open batch holding ``image_ids`` in this order; ``name(seq)`` gives its id.

        An image whose item was ``dropped`` moves to the new batch as ``pending`` (its note is
        kept until a new one replaces it); an image in a batch any other way is a ``ValueError``
        and nothing is created: it would go up twice.
        """
        now = self.clock()
        with self.transaction() as db:
            seq = int(db.execute("SELECT coalesce(max(seq), 0) + 1 FROM batches").fetchone()[0])
            batch_id = name(seq)
            db.execute("INSERT INTO batches (batch_id, seq, state, created_at) VALUES (?,?,?,?)",
                       (batch_id, seq, "open", now))
            db.executemany("INSERT INTO items (image_id, batch_id, position) VALUES (?,?,?) "
                           "ON CONFLICT (image_id) DO UPDATE SET batch_id=excluded.batch_id, "
                           "position=excluded.position, state='pending', image_key=NULL, pre_key=NULL, line=NULL "
                           "WHERE items.state = 'dropped'",
                           [(i, batch_id, n) for n, i in enumerate(image_ids)])
            held = int(db.execute("SELECT count(*) FROM items WHERE batch_id=?", (batch_id,)).fetchone()[0])
            if held != len(set(image_ids)):  # the transaction rolls back
                raise ValueError(f"create_batch: {len(set(image_ids)) - held} of the images are in a batch already")
        return Batch(batch_id, seq, "open", None, None)

    def set_manifest(self, batch_id: str, key: str, sha256: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE batches SET manifest_key=?, manifest_sha256=? WHERE batch_id=?", (key, sha256, batch_id))

    def set_batch_state(self, batch_id: str, state: str) -> None:
        finished = self.clock() if state == "done" else None
        with self.transaction() as db:
            db.execute("UPDATE batches SET state=?, finished_at=? WHERE batch_id=?", (state, finished, batch_id))

    def batches(self) -> list[Batch]:
        return [_batch(r) for r in self._conn().execute("SELECT * FROM batches ORDER BY seq")]

    # -- items and objects --------------------------------------------------------------
    def items(self, batch_id: str, state: str | None = None) -> list[Item]:
        sql = "SELECT * FROM items WHERE batch_id=?" + (" AND state=?" if state else "") + " ORDER BY position"
        rows = self._conn().execute(sql, (batch_id, state) if state else (batch_id,))
        return [_item(r) for r in rows]

    def item_sent(self, image_id: str, image_key: str, pre_key: str, line: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE items SET state='sent', image_key=?, pre_key=?, line=? WHERE image_id=? AND state='pending'",
                       (image_key, pre_key, line, image_id))

    def item_state(self, image_id: str, state: str, note: str | None = None) -> None:
        with self.transaction() as db:
            db.execute("UPDATE items SET state=?, note=coalesce(?, note) WHERE image_id=?", (state, note, image_id))

    def object_done(self, key: str, sha256: str, size: int, status: str, batch_id: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO objects (key, sha256, size, status, batch_id, at) VALUES (?,?,?,?,?,?)",
                       (key, sha256, size, status, batch_id, self.clock()))

    # -- review submissions ---------------------------------------------------------------
    def unsubmitted_batches(self, backend: str) -> list[Batch]:
        """``done`` batches not yet handed to ``backend``, oldest first."""
        rows = self._conn().execute(
            "SELECT * FROM batches WHERE state = 'done' AND batch_id NOT IN "
            "(SELECT batch_id FROM submissions WHERE backend = ?) ORDER BY seq", (backend,))
        return [_batch(r) for r in rows]

    def mark_submitted(self, batch_id: str, backend: str, items: int) -> None:
        """Record that ``backend`` accepted ``batch_id`` (``items`` images); repeating it is a no-op."""
        with self.transaction() as db:
            db.execute("INSERT OR IGNORE INTO submissions (batch_id, backend, at, items) VALUES (?,?,?,?)",
                       (batch_id, backend, self.clock(), items))

    def submitted_items(self, backend: str, image_ids: Sequence[str]) -> list[Item]:
        """The ``marked`` items among ``image_ids`` whose batch was handed to ``backend``: the
        images a backend should hold a task for (``sync.submit`` re-submits those it lost)."""
        out: list[Item] = []
        for start in range(0, len(image_ids), 500):  # SQLite caps the number of parameters
            chunk = tuple(image_ids[start:start + 500])
            marks = ",".join("?" * len(chunk))
            rows = self._conn().execute(
                f"SELECT i.* FROM items i JOIN submissions s ON s.batch_id = i.batch_id AND s.backend = ? "
                f"WHERE i.state = 'marked' AND i.image_id IN ({marks})", (backend, *chunk))
            out += [_item(r) for r in rows]
        return out

    def submissions(self, backend: str | None = None) -> list[tuple[str, str, int]]:
        """(batch id, backend, items) of every recorded submission, oldest batch first."""
        sql = ("SELECT s.batch_id, s.backend, s.items FROM submissions s JOIN batches b USING (batch_id)"
               + (" WHERE s.backend = ?" if backend else "") + " ORDER BY b.seq")
        return [(r[0], r[1], r[2]) for r in self._conn().execute(sql, (backend,) if backend else ())]

    def object_counts(self) -> dict[str, int]:
        """Objects by status: ``sent`` (this appliance put them) and ``present`` (found there)."""
        return {r[0]: r[1] for r in self._conn().execute("SELECT status, count(*) FROM objects GROUP BY status")}


def _batch(r: sqlite3.Row) -> Batch:
    return Batch(r["batch_id"], r["seq"], r["state"], r["manifest_key"], r["manifest_sha256"])


def _item(r: sqlite3.Row) -> Item:
    return Item(r["image_id"], r["batch_id"], r["position"], r["state"], r["image_key"], r["pre_key"], r["line"])
