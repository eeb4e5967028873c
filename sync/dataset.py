"""The training dataset: human-reviewed plus auto-accepted labels, each with provenance, in SQLite.

Layout under ``root`` (``<data root>/dataset`` by default)::

    dataset.sqlite3     tables ``labels`` (one row per image), ``versions``, ``meta``

A label is stored in canonical form (see ``canonical_label``): original-image pixels, boxes
``[x1, y1, x2, y2]``, key points ``[x, y, flag]`` in the dataset's key-point order (default
the 19 cabin points), flags 2 visible / 1 occluded / 0 outside with outside points at 0, 0.
A reviewed label replaces the auto label of its image; an auto label never replaces a reviewed
one. The dataset version is ``sha256`` of the canonical JSON list ``[[image_id, label_hash],
...]`` sorted by image id; ``record_version`` appends it to ``versions`` when it changed.

Hold-out: a reviewed image is held out for the model-pull gate when
``sha256("holdout:" + image_id)`` read as a number in [0, 1) is below the hold-out fraction
fixed when the database was created; ``export`` leaves hold-out images out by default, so
a bundle trained on the export is validated on images it never saw.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from service.keypoints import CABIN19, KeypointSchema
from service.sqlite import apply_schema, connect
from service.sqlite import transaction as sqlite_transaction

from .errors import disk_fault, io_fault_of
from .mistakenness import summarise

log = logging.getLogger(__name__)

REVIEWED, AUTO = "reviewed", "auto"
DEFAULT_HOLDOUT_FRACTION = 0.2
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS labels (
    image_id TEXT PRIMARY KEY, origin TEXT NOT NULL, label TEXT NOT NULL, label_hash TEXT NOT NULL,
    provenance TEXT NOT NULL, auto_label TEXT, mistakes TEXT, mistakenness REAL,
    decision TEXT, audit INTEGER NOT NULL DEFAULT 0, holdout INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS labels_by_origin ON labels (origin, image_id);
CREATE TABLE IF NOT EXISTS versions (
    seq INTEGER PRIMARY KEY, version TEXT NOT NULL, created_at REAL NOT NULL,
    images INTEGER NOT NULL, reviewed INTEGER NOT NULL, auto INTEGER NOT NULL, note TEXT);
"""


def canonical_json(data: Any) -> str:
    """Sorted keys, no spaces: the form that is hashed."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def canonical_label(width: int, height: int, heads: Sequence[Sequence[float]],
                    persons: Sequence[tuple[Sequence[float], Sequence[Sequence[float]]]]) -> dict[str, Any]:
    """The stored form: ``{"width", "height", "heads": [[x1, y1, x2, y2]], "persons": [{"box",
    "keypoints": [[x, y, flag]]}]}``, coordinates rounded to 0.01 px, outside points at 0, 0."""
    def box(b: Sequence[float]) -> list[float]:
        if len(b) != 4:
            raise ValueError(f"box: expected 4 numbers (x1, y1, x2, y2), got {list(b)!r}")
        return [round(float(v), 2) for v in b]

    out_persons = []
    for pbox, kpts in persons:
        points = []
        for x, y, flag in kpts:
            f = int(flag)
            if f not in (0, 1, 2):
                raise ValueError(f"key point flag: expected 0, 1 or 2, got {flag!r}")
            points.append([round(float(x), 2), round(float(y), 2), f] if f else [0.0, 0.0, 0])
        out_persons.append({"box": box(pbox), "keypoints": points})
    return {"width": int(width), "height": int(height), "heads": [box(h) for h in heads], "persons": out_persons}


def label_hash(label: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(label).encode()).hexdigest()


def manifest_version(manifest: Iterable[tuple[str, str]]) -> str:
    """The dataset version of ``(image_id, label_hash)`` pairs: sha256 of the canonical JSON list
    ``[[image_id, label_hash], ...]`` sorted by image id (``Dataset.version``)."""
    return hashlib.sha256(canonical_json(sorted([i, h] for i, h in manifest)).encode()).hexdigest()


def _adjusted(entry: "DatasetEntry") -> bool:
    """Whether the reviewer changed the auto label: provenance ``adjusted`` (set by the backend,
    or by the merge from the score), the mistakenness score only where it is missing."""
    adjusted = entry.provenance.get("adjusted")
    if adjusted is None:
        return bool((entry.mistakes or {}).get("score", 0) > 0)
    return bool(adjusted)


def holdout_draw(image_id: str) -> float:
    """The image's deterministic draw in [0, 1) for the hold-out split."""
    return int(hashlib.sha256(f"holdout:{image_id}".encode()).hexdigest()[:15], 16) / 16 ** 15


@dataclass(frozen=True)
class DatasetEntry:
    """One image of the dataset. ``origin`` is "reviewed" or "auto"; ``mistakes`` is the
    ``Mistakenness.to_json()`` dict for reviewed images (None for auto ones)."""

    image_id: str
    origin: str
    label: dict[str, Any]
    label_hash: str
    provenance: dict[str, Any]
    auto_label: dict[str, Any] | None
    mistakes: dict[str, Any] | None
    decision: str | None
    audit: bool
    holdout: bool
    updated_at: float

    @classmethod
    def from_sql(cls, r: sqlite3.Row) -> "DatasetEntry":
        return cls(r["image_id"], r["origin"], json.loads(r["label"]), r["label_hash"], json.loads(r["provenance"]),
                   None if r["auto_label"] is None else json.loads(r["auto_label"]),
                   None if r["mistakes"] is None else json.loads(r["mistakes"]),
                   r["decision"], bool(r["audit"]), bool(r["holdout"]), r["updated_at"])


@dataclass(frozen=True)
class DatasetVersion:
    seq: int
    version: str
    created_at: float
    images: int
    reviewed: int
    auto: int
    note: str | None


class Dataset:
    """The dataset database under ``root``. ``schema`` (default: the 19 cabin points) and
    ``holdout_fraction`` are fixed when the database is created; reopening uses the stored
    values (asking for a different ``schema`` raises ``ValueError``)."""

    def __init__(self, root: Path, schema: KeypointSchema | None = None,
                 holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION, clock: Callable[[], float] = time.time) -> None:
        if not 0.0 <= holdout_fraction <= 1.0:
            raise ValueError(f"holdout_fraction: expected 0..1, got {holdout_fraction}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / "dataset.sqlite3"
        self.clock = clock
        self._lock = threading.RLock()
        self._db = connect(self.path)
        try:
            with self.transaction() as db:
                apply_schema(db, _SCHEMA)
                meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
                if "schema" not in meta:
                    db.execute("INSERT INTO meta VALUES ('schema', ?)", (json.dumps((schema or CABIN19).to_json()),))
                    db.execute("INSERT INTO meta VALUES ('holdout_fraction', ?)", (repr(float(holdout_fraction)),))
                    meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        except BaseException:  # a disk that refuses the first write: the agent opens it again later
            self._db.close()
            raise
        self.schema = KeypointSchema.from_json(json.loads(meta["schema"]))
        if schema is not None and self.schema.names != schema.names:
            raise ValueError(f"{self.path}: dataset key points are {list(self.schema.names)}, "
                             f"not the requested {list(schema.names)}")
        self.holdout_fraction = float(meta["holdout_fraction"])

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on any exception). A disk that
        refuses the write (full, read-only, I/O errors) is a ``DiskFault`` naming the file and
        the free space; the transaction left nothing behind and is retried later."""
        try:
            with self._lock, sqlite_transaction(self._db) as db:
                yield db
        except sqlite3.OperationalError as exc:
            fault = io_fault_of(exc)
            if fault is None:
                raise
            raise disk_fault(f"the dataset {self.path}", fault, self.root) from exc

    def close(self) -> None:
        self._db.close()

    def meta(self, key: str, value: str | None = None) -> str | None:
        """Read (``value`` None) or write a meta value (e.g. the store paging cursor)."""
        with self.transaction() as db:
            if value is not None:
                db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                           (key, value))
                return value
            r = db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
            return None if r is None else str(r[0])

    def is_holdout(self, image_id: str) -> bool:
        return holdout_draw(image_id) < self.holdout_fraction

    # -- writing -------------------------------------------------------------------------
    def put_auto(self, image_id: str, label: Mapping[str, Any], provenance: Mapping[str, Any],
                 decision: str | None = "auto_accepted") -> bool:
        """Add an auto-accepted label; False (nothing changed) when the image already has a
        reviewed label or this very label."""
        h = label_hash(label)
        with self.transaction() as db:
            r = db.execute("SELECT origin, label_hash FROM labels WHERE image_id=?", (image_id,)).fetchone()
            if r is not None and (r["origin"] == REVIEWED or r["label_hash"] == h):
                return False
            db.execute("INSERT OR REPLACE INTO labels (image_id, origin, label, label_hash, provenance, decision, "
                       "audit, holdout, updated_at) VALUES (?,?,?,?,?,?,0,0,?)",
                       (image_id, AUTO, canonical_json(label), h, canonical_json(dict(provenance)), decision,
                        self.clock()))
        return True

    def remove_auto(self, image_id: str) -> bool:
        """Take an auto label out (its image's bytes are gone: ``[retention] auto_image_days``);
        False when there is none. A reviewed label is never removed here."""
        with self.transaction() as db:
            return db.execute("DELETE FROM labels WHERE image_id=? AND origin=?", (image_id, AUTO)).rowcount == 1

    def put_reviewed(self, image_id: str, label: Mapping[str, Any], provenance: Mapping[str, Any],
                     auto_label: Mapping[str, Any] | None, mistakes: Mapping[str, Any] | None,
                     decision: str | None, audit: bool) -> bool:
        """Store a reviewed label in place of the auto one. A label older (``provenance
        ["reviewed_at"]``) than the stored reviewed label, or identical to it with the same
        provenance, changes nothing and returns False."""
        h = label_hash(label)
        prov = canonical_json(dict(provenance))
        with self.transaction() as db:
            r = db.execute("SELECT origin, label_hash, provenance FROM labels WHERE image_id=?", (image_id,)).fetchone()
            if r is not None and r["origin"] == REVIEWED:
                old = json.loads(r["provenance"])
                if r["label_hash"] == h and r["provenance"] == prov:
                    return False
                if str(old.get("reviewed_at") or "") > str(provenance.get("reviewed_at") or ""):
                    log.info("image %s: keeping the newer review from %s", image_id[:12], old.get("reviewed_at"))
                    return False
            db.execute(
                "INSERT OR REPLACE INTO labels (image_id, origin, label, label_hash, provenance, auto_label, mistakes, "
                "mistakenness, decision, audit, holdout, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (image_id, REVIEWED, canonical_json(label), h, prov,
                 None if auto_label is None else canonical_json(auto_label),
                 None if mistakes is None else canonical_json(dict(mistakes)),
                 None if mistakes is None else float(mistakes["score"]), decision, int(bool(audit)),
                 int(self.is_holdout(image_id)), self.clock()))
        return True

    # -- reading -------------------------------------------------------------------------
    def get(self, image_id: str) -> DatasetEntry | None:
        with self._lock:
            r = self._db.execute("SELECT * FROM labels WHERE image_id=?", (image_id,)).fetchone()
        return None if r is None else DatasetEntry.from_sql(r)

    def entries(self, origin: str | None = None, holdout: bool | None = None) -> list[DatasetEntry]:
        """Entries sorted by image id, optionally only one origin and/or hold-out state."""
        where: list[str] = []
        args: list[Any] = []
        if origin is not None:
            where.append("origin = ?")
            args.append(origin)
        if holdout is not None:
            where.append("holdout = ?")
            args.append(int(holdout))
        sql = "SELECT * FROM labels" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY image_id"
        with self._lock:
            return [DatasetEntry.from_sql(r) for r in self._db.execute(sql, args).fetchall()]

    def holdout(self) -> list[DatasetEntry]:
        """Reviewed hold-out images: the gate's validation set."""
        return self.entries(origin=REVIEWED, holdout=True)

    def version(self) -> str:
        """sha256 of the manifest ``[[image_id, label_hash], ...]`` (sorted by image id)."""
        with self._lock:
            rows = self._db.execute("SELECT image_id, label_hash FROM labels ORDER BY image_id").fetchall()
        return manifest_version((r[0], r[1]) for r in rows)

    def record_version(self, note: str = "") -> DatasetVersion | None:
        """Append the current version to ``versions`` when it differs from the last one; an
        empty dataset that has recorded none records nothing (a merge calls this every time).
        The version is worked out inside the write transaction: worked out before it, another
        process's merge in between (an ``annotator dataset export`` beside the agent) recorded a
        version that named other labels than the counts and the content."""
        with self.transaction() as db:
            version = self.version()
            last = db.execute("SELECT version FROM versions ORDER BY seq DESC LIMIT 1").fetchone()
            if last is not None and last[0] == version:
                return None
            counts = dict(db.execute("SELECT origin, count(*) FROM labels GROUP BY origin").fetchall())
            reviewed, auto = int(counts.get(REVIEWED, 0)), int(counts.get(AUTO, 0))
            if last is None and reviewed + auto == 0:
                return None
            now = self.clock()
            cur = db.execute("INSERT INTO versions (version, created_at, images, reviewed, auto, note) "
                             "VALUES (?,?,?,?,?,?)", (version, now, reviewed + auto, reviewed, auto, note))
            seq = int(cur.lastrowid or 0)
        log.info("dataset version %s: %d reviewed + %d auto images (%s)", version[:12], reviewed, auto, note)
        return DatasetVersion(seq, version, now, reviewed + auto, reviewed, auto, note)

    def versions(self) -> list[DatasetVersion]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM versions ORDER BY seq").fetchall()
        return [DatasetVersion(r["seq"], r["version"], r["created_at"], r["images"], r["reviewed"], r["auto"],
                               r["note"]) for r in rows]

    def mistakenness_summary(self) -> dict[str, Any]:
        """Per-image mistakenness of reviewed images: overall, audit picks, judge picks, and
        the fraction of each group the reviewer adjusted. If the judge picks the right images,
        its picks score higher than the random audit picks."""
        reviewed = [e for e in self.entries(origin=REVIEWED) if e.mistakes is not None]

        def group(items: list[DatasetEntry]) -> dict[str, Any]:
            out = summarise([e.mistakes["score"] for e in items if e.mistakes])
            # The reviewer's own answer when the backend told it (Ground Truth boxes come back in
            # whole pixels, so an unchanged review never scores exactly 0); else the score.
            out["adjusted"] = sum(1 for e in items if _adjusted(e))
            return out

        return {"all": group(reviewed), "audit_picks": group([e for e in reviewed if e.audit]),
                "judge_picks": group([e for e in reviewed if not e.audit])}

    def status(self) -> dict[str, Any]:
        """Version, counts and the mistakenness summary, JSON-ready."""
        entries = self.entries()
        versions = self.versions()
        return {
            "path": str(self.path), "version": self.version(),
            "recorded_versions": len(versions), "last_recorded": versions[-1].version if versions else None,
            "images": len(entries), "reviewed": sum(1 for e in entries if e.origin == REVIEWED),
            "auto": sum(1 for e in entries if e.origin == AUTO),
            "holdout": sum(1 for e in entries if e.holdout), "holdout_fraction": self.holdout_fraction,
            "keypoints": list(self.schema.names), "mistakenness": self.mistakenness_summary(),
        }
