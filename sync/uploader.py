"""Store-and-forward upload of review-pending images, exactly once, from the daemon's store.

Layout in the target (keys relative to the target's prefix)::

    images/<sha256>.<ext>                              the image as uploaded (content address,
                                                       shared by every appliance: de-duplicated)
    preannotations/<appliance_id>/<sha256>.json        its pre-annotation record (+ provenance)
    manifests/<appliance_id>/<batch_id>.manifest       Ground Truth input manifest, JSON Lines

One ``run_once`` call works on one batch (see ``sync.journal`` for the states):

1. resume the unfinished batch, or form a new one from ``review_pending`` images that are in no
   batch yet, or were dropped from one (below) (work always comes from the database; nothing
   waits in memory);
2. per image: re-check it is still ``review_pending`` (only those leave the box), prepare the
   upload (optional downscale, record rescaled per axis), then for the image and its
   pre-annotation: ``head`` the key; when it is there with the right sha256 it is not sent
   again, else ``put``; freeze its manifest line in the journal;
3. build the manifest from the frozen lines (same bytes on every rebuild) and write it once
   (``head`` + checksum: equal -> nothing to do, different -> ``ConflictError``);
4. only then mark each image ``uploaded`` in the store, and the batch done.

A crash anywhere repeats at most the step in progress, and repeating a step changes nothing.
Transient failures are retried with backoff (``sync.backoff``); ``PermanentError`` (credentials
rejected, bucket missing) propagates with nothing marked uploaded. A stop request during any
retry wait (the first reachability check included) ends ``run_once`` normally; the batch
resumes on the next run.

An image that can never go up (its stored file is gone, its bytes no longer decode or exceed
the decoder's limits, its record does not fit them, its manifest line is too long even without
persons) is moved ``review_pending -> failed`` with the reason in the store's ``error`` column
and its transition note, before its journal item is marked ``dropped``: left
``review_pending``, it was never reviewed, never said so, and every later pass paged over it
again. ``failed`` is the life cycle's one end "with a reason": nothing (merge, dataset, review
submission, export) takes a failed image further, and ``annotator status`` counts it. Only
errors that say so about the image itself do this; an ``OSError`` reading the file, an
unreachable target or a full disk propagates with the item still ``pending``, and the batch
resumes with it on the next run. A crash between the two writes leaves a failed image with a
pending item, which the next run drops as "left review_pending". A ``dropped`` item whose image
is ``review_pending`` (dropped by an earlier version, which left it there) is batched again, so
that it is uploaded now or failed with its reason.

``progress`` (the agent's ``beat``) is called after each object is sent or found present: a
batch of 50 images on a slow uplink outlasts the systemd watchdog's limit, and a watchdog that
killed it mid-batch would restart it for ever.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from service.errors import ImageError, ImageNotFound
from service.store import FAILED, REVIEW_PENDING, UPLOADED, ImageRow, Store

from .backoff import RetryPolicy, retry_call
from .errors import (ConflictError, DiskFault, PermanentError, RetryableError, Stopped, disk_fault, free_space,
                     io_fault_of, read_only_fs)
from .groundtruth import ManifestError, manifest_line
from .journal import Batch, Item, Journal
from .objectstore import ObjectStore
from .reencode import prepare_upload

if TYPE_CHECKING:
    from service.metrics import MetricsRecorder

log = logging.getLogger(__name__)

_APPLIANCE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
JOURNAL_NAME = "sync.sqlite3"


@dataclass(frozen=True)
class UploadSettings:
    """``appliance_id``: names this box in keys and manifests; ``batch_size``: images per manifest;
    ``max_side``: downscale larger images to this longer side (None: upload originals)."""

    appliance_id: str
    batch_size: int = 50
    max_side: int | None = None
    jpeg_quality: int = 90
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        if not _APPLIANCE_ID.match(self.appliance_id):
            raise ValueError(f"appliance_id: expected 1-64 of A-Z a-z 0-9 . _ - (starting alphanumeric), "
                             f"got {self.appliance_id!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {self.batch_size}")
        if self.max_side is not None and self.max_side < 16:
            raise ValueError(f"max_side: expected >= 16 or None, got {self.max_side}")
        # Checked here, not at the first re-encode: prepare_upload's ValueError fails the image
        # for good, and a setting must not fail every image that needs a re-encode.
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality: expected 1..100, got {self.jpeg_quality}")


def _dumps(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class Uploader:
    """The upload ``Task``: ``run_once()`` advances one batch and says whether there was work."""

    name = "upload"

    def __init__(self, store: Store, target: ObjectStore, settings: UploadSettings,
                 journal: Journal | None = None, stop: threading.Event | None = None,
                 clock: Callable[[], float] = time.time, metrics: MetricsRecorder | None = None,
                 progress: Callable[[], None] | None = None) -> None:
        self.store, self.target, self.settings = store, target, settings
        self.metrics = metrics  # uploads (sent objects, or failed for now) and retries
        self.progress = progress  # called per object done (see the module doc)
        self.journal = journal or Journal(Path(store.root) / JOURNAL_NAME, clock)
        self.stop = stop or threading.Event()
        self.clock = clock
        self._checked = False

    # -- keys ---------------------------------------------------------------------------
    def image_key(self, sha256: str, suffix: str) -> str:
        return f"images/{sha256}{suffix}"

    def pre_key(self, sha256: str) -> str:
        return f"preannotations/{self.settings.appliance_id}/{sha256}.json"

    def manifest_key(self, batch_id: str) -> str:
        return f"manifests/{self.settings.appliance_id}/{batch_id}.manifest"

    # -- the task -----------------------------------------------------------------------
    def run_once(self) -> bool:
        """Advance one batch as far as it goes; False when there was nothing to upload (or a
        stop request came while the target was still unreachable)."""
        if not self._checked:
            try:
                retry_call(self.target.check, f"check {self.target!r}", self.settings.retry, self.stop)
            except Stopped:
                log.info("stopping before the target %r was reached", self.target)
                return False
            except PermanentError as exc:
                # A local folder on a full, failing or read-only disk: the disk's fault for now,
                # not a setting to fix; stopping the agent for it would end it for good.
                fault = io_fault_of(exc)
                base = getattr(self.target, "base", None)
                if fault is not None:
                    raise disk_fault(f"the target folder {base}", fault, base) from exc
                if base is not None and read_only_fs(base):
                    raise DiskFault(f"the target folder {base} is on a read-only file system "
                                    f"({free_space(base)})") from exc
                raise
            self._checked = True
        batch = self.journal.unfinished_batch() or self._new_batch()
        if batch is None:
            return False
        try:
            self._advance(batch)
        except Stopped:
            log.info("stopping in batch %s; it resumes on the next run", batch.batch_id)
        return True

    def close(self) -> None:
        self.journal.close()

    def _new_batch(self) -> Batch | None:
        chosen: list[str] = []
        after: str | None = None
        while len(chosen) < self.settings.batch_size:
            rows, after = self.store.list(state=REVIEW_PENDING, limit=max(self.settings.batch_size, 100), after=after)
            if rows:
                # A dropped item whose image is review_pending now is due again (see the module doc).
                batched = self.journal.batched([r.image_id for r in rows])
                chosen += [r.image_id for r in rows if r.image_id not in batched]
            if after is None:
                break
        chosen = chosen[: self.settings.batch_size]
        if not chosen:
            return None
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self.clock()))
        batch = self.journal.create_batch(chosen, lambda seq: f"{stamp}-{seq:06d}")
        log.info("batch %s: %d images to upload", batch.batch_id, len(chosen))
        return batch

    def _advance(self, batch: Batch) -> None:
        if batch.state == "open":
            for item in self.journal.items(batch.batch_id, "pending"):
                if self.stop.is_set():
                    raise Stopped("stop requested between objects")
                self._send_item(batch, item)
            self._write_manifest(batch)
            self.journal.set_batch_state(batch.batch_id, "manifest")
        self._mark_uploaded(batch)
        self.journal.set_batch_state(batch.batch_id, "done")
        states = [i.state for i in self.journal.items(batch.batch_id)]
        log.info("batch %s done: %d uploaded, %d not uploaded", batch.batch_id, states.count("marked"),
                 states.count("dropped"))

    def _send_item(self, batch: Batch, item: Item) -> None:
        row = self.store.get(item.image_id)
        if row is None or row.state != REVIEW_PENDING:
            # Privacy: only images that are review-pending right now leave the box.
            self.journal.item_state(item.image_id, "dropped", f"state {row.state if row else 'missing'}")
            log.info("image %s left review_pending before upload; skipped", item.image_id[:12])
            return
        try:
            data = self.store.image_bytes(item.image_id)
        except ImageNotFound as exc:
            # Content-addressed and written before its row: nothing brings a missing file back.
            # Any other OSError (permissions, an I/O error, no file handles left) propagates:
            # the item stays pending and the batch resumes with it on the next run.
            self._give_up(batch, item, f"the stored image file is missing ({exc})")
            return
        if hashlib.sha256(data).hexdigest() != item.image_id:
            # Content-addressed: the bytes the daemon annotated hash to the id. A file damaged on
            # disk (or edited in the store) went up as what it decoded to now (a truncated JPEG:
            # a grey lower half) under another sha256, and the review merged onto the image.
            self._give_up(batch, item, "the stored image file is damaged: its bytes no longer hash to the image id "
                                       f"({len(data)} bytes at {self.store.image_path(item.image_id)}; disk "
                                       "corruption, or a file changed in the store)")
            return
        try:
            upload = prepare_upload(data, row.record or {}, self.settings.max_side, self.settings.jpeg_quality)
        except (ImageError, ValueError, KeyError) as exc:
            # About these bytes and this record (corrupt or truncated, more pixels than the
            # decoder allows, a size that is not the record's, no size in the record): the same
            # every time, so retrying would only repeat it on every pass.
            self._give_up(batch, item, f"cannot prepare the stored image: {exc}")
            return
        sha = hashlib.sha256(upload.data).hexdigest()
        image_key, pre_key = self.image_key(sha, upload.suffix), self.pre_key(sha)
        try:
            line = self._line(row, image_key, upload.record)
        except ManifestError as exc:  # the same record gives the same line: too long every time
            self._give_up(batch, item, f"no manifest line fits Ground Truth's limits, even without persons: {exc}")
            return
        pre = _dumps({"image-id": row.image_id, "image-key": image_key, "appliance": self.settings.appliance_id,
                      "bundle_id": row.bundle_id, "score": row.score, "reasons": list(row.reasons),
                      "audit": row.audit, "record": upload.record})
        self._ensure(image_key, upload.data, upload.content_type, batch.batch_id)
        self._ensure(pre_key, pre, "application/json", batch.batch_id)
        self.journal.item_sent(item.image_id, image_key, pre_key, line)

    def _give_up(self, batch: Batch, item: Item, why: str) -> None:
        """``review_pending -> failed`` with the reason, then the item ``dropped``: an image that
        can never be uploaded ends with a reason the user sees (``annotator status``, the
        image's ``error`` and history) instead of waiting in ``review_pending`` for ever.

        Nothing of it was sent. The store is written first: a crash before the journal write
        leaves the item pending and the image failed, which the next run drops like any image
        that left ``review_pending``; the other order could leave a dropped item whose image
        waits (healed too, by batching it again, but only after preparing it once more).
        ``set_state`` changes the image only while it is still ``review_pending``.
        """
        reason = f"not uploaded for review (batch {batch.batch_id}): {why}"
        failed = self.store.set_state(item.image_id, [REVIEW_PENDING], FAILED, error=reason)
        self.journal.item_state(item.image_id, "dropped", reason)
        if failed:
            log.error("image %s will never be reviewed; marked failed: %s", item.image_id[:12], why)
        else:
            row = self.store.get(item.image_id)
            log.warning("image %s cannot be uploaded (%s) and is %s already; skipped", item.image_id[:12], why,
                        row.state if row else "missing")

    def _line(self, row: ImageRow, image_key: str, record: dict[str, Any]) -> str:
        """The manifest line; persons with the lowest confidence are left out while it is too
        long for Ground Truth (the full record is in the pre-annotation object). Raises
        ``ManifestError`` when it is too long even without persons."""
        record = dict(record)
        while True:
            try:
                return manifest_line(self.target.uri(image_key), row.image_id, record, row.bundle_id or "",
                                     row.score, row.reasons, row.audit, self.settings.appliance_id)
            except ManifestError:
                persons = sorted(record.get("persons", []), key=lambda p: p.get("conf", 0.0))
                if not persons:
                    raise
                record["persons"] = [p for p in record["persons"] if p is not persons[0]]
                log.warning("image %s: manifest line too long, left out a person (conf %.2f)",
                            row.image_id[:12], persons[0].get("conf", 0.0))

    def _ensure(self, key: str, data: bytes, content_type: str, batch_id: str, once: bool = False) -> None:
        """Make ``key`` hold ``data``: nothing is sent when it is already there with this sha256.

        ``once``: an object there with another checksum is a ``ConflictError`` (manifests),
        instead of being replaced (an image key without or with a wrong checksum).
        """
        sha = hashlib.sha256(data).hexdigest()

        def attempt() -> str:
            info = self.target.head(key)
            if info is not None and info.sha256 == sha:
                return "present"
            if info is not None and once:
                raise ConflictError(f"{key} exists with sha256 {info.sha256}, expected {sha}; refusing to overwrite "
                                    f"a manifest: is another box writing under the appliance id "
                                    f"{self.settings.appliance_id!r}? Give each box its own [sync] appliance_id")
            self.target.put(key, data, content_type, sha256=sha)
            return "sent"

        on_retry = self.metrics.retry if self.metrics is not None else None
        try:
            status = retry_call(attempt, f"upload {key}", self.settings.retry, self.stop, on_retry)
        except RetryableError:
            if self.metrics is not None:
                self.metrics.upload(False)
            raise
        except OSError as exc:  # a local folder target on a full or failing disk: not retried here (the agent waits)
            fault = io_fault_of(exc)
            if fault is None:
                raise
            raise disk_fault(f"writing {key} to {self.target!r}", fault, getattr(self.target, "base", None)) from exc
        if status == "sent" and self.metrics is not None:
            self.metrics.upload(True)
        self.journal.object_done(key, sha, len(data), status, batch_id)
        log.debug("%s %s (%d bytes)", status, key, len(data))
        if self.progress is not None:
            self.progress()

    def _write_manifest(self, batch: Batch) -> None:
        lines = [i.line for i in self.journal.items(batch.batch_id, "sent") if i.line]
        if not lines:
            return
        data = ("\n".join(lines) + "\n").encode("utf-8")
        key, sha = self.manifest_key(batch.batch_id), hashlib.sha256(data).hexdigest()
        if batch.manifest_sha256 not in (None, sha):
            raise ConflictError(f"batch {batch.batch_id}: manifest rebuilt with other content")
        self.journal.set_manifest(batch.batch_id, key, sha)
        self._ensure(key, data, "application/jsonlines", batch.batch_id, once=True)
        log.info("manifest %s: %d lines", key, len(lines))

    def _mark_uploaded(self, batch: Batch) -> None:
        manifest = self.target.uri(self.manifest_key(batch.batch_id))
        for item in self.journal.items(batch.batch_id, "sent"):
            row = self.store.get(item.image_id)
            meta = dict(row.meta) if row else {}
            meta["upload"] = {"appliance": self.settings.appliance_id, "batch": batch.batch_id,
                              "image": self.target.uri(item.image_key or ""), "manifest": manifest}
            if not self.store.set_state(item.image_id, [REVIEW_PENDING], UPLOADED, meta=meta):
                state = row.state if row else "missing"
                if state != UPLOADED:
                    log.warning("image %s is %s, not review_pending; not marked uploaded", item.image_id[:12], state)
            self.journal.item_state(item.image_id, "marked")
