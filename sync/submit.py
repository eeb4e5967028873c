"""Hand each uploaded batch to the review backend, once: the ``review-submit`` agent task.

Submission is a task of its own, after the uploader, not a step inside it: the uploader's
exactly-once guarantees stay independent of the review backend (a Label Studio server that is
down must not hold back uploads), and the backend is chosen in the config without touching
the upload path. The journal is the source of truth (``sync.journal``):

1. take the oldest ``done`` batch without a ``submissions`` row for this backend;
2. build a ``ReviewItem`` for each of its images that is still ``uploaded`` in the store (an
   image reviewed or re-annotated since has nothing left to review): the record in original
   pixels, the uploaded object's URI (Ground Truth) and the stored file (Label Studio);
3. ``backend.submit(batch_id, items)``; only then record the submission in the journal.

A crash between 3's two steps repeats the submit at the next run, which every backend treats as
a no-op per image (Ground Truth finds the uploader's manifest and the job of that name; Label
Studio finds the tasks). ``RetryableError`` leaves the batch for the next pass.
"""
from __future__ import annotations

import logging

from service.errors import ImageNotFound
from service.store import UPLOADED, Store

from .errors import PermanentError
from .journal import Batch, Journal
from .objectstore import ObjectStore
from .review import ReviewBackend, ReviewItem

log = logging.getLogger(__name__)


class ReviewSubmitTask:
    """The agent task that submits finished upload batches to ``backend`` (see module doc)."""

    name = "review-submit"

    def __init__(self, journal: Journal, store: Store, target: ObjectStore, backend: ReviewBackend) -> None:
        self.journal, self.store, self.target, self.backend = journal, store, target, backend

    def items(self, batch: Batch) -> list[ReviewItem]:
        """The batch's images that still wait for review, as ``ReviewItem`` objects."""
        out = []
        for item in self.journal.items(batch.batch_id, "marked"):
            row = self.store.get(item.image_id)
            if row is None or row.state != UPLOADED or row.record is None or not item.image_key:
                log.info("image %s is %s; not submitted for review", item.image_id[:12], row.state if row else "missing")
                continue
            try:
                local = self.store.image_path(item.image_id)
            except ImageNotFound:
                local = None
            out.append(ReviewItem(
                row.image_id, int(row.record["width"]), int(row.record["height"]), row.record, row.bundle_id or "",
                image_uri=self.target.uri(item.image_key), local_path=local, score=row.score,
                reasons=row.reasons, audit=row.audit))
        return out

    def run_once(self) -> bool:
        """Submit the oldest unsubmitted batch; False when every batch was submitted."""
        pending = self.journal.unsubmitted_batches(self.backend.name)
        if not pending:
            return False
        batch = pending[0]
        items = self.items(batch)
        if items:
            try:
                self.backend.submit(batch.batch_id, items)
            except ValueError as exc:  # e.g. an image outside Label Studio's document root
                raise PermanentError(f"review backend {self.backend.name} refused batch {batch.batch_id}: {exc}") from exc
        self.journal.mark_submitted(batch.batch_id, self.backend.name, len(items))
        log.info("batch %s submitted to %s (%d images)", batch.batch_id, self.backend.name, len(items))
        return True
