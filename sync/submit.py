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

A submissions row says a batch was handed over, not that the backend still has it: a Label
Studio project can be deleted or recreated, a task deleted, ``project_title`` changed, and the
images that were waiting there would then stay ``uploaded`` for ever. So a backend that can
tell which images it lost (``missing(image_ids)``) is reconciled at the first pass, every
``reconcile_interval`` seconds and whenever its ``project_id`` changes: the ``uploaded`` images
of submitted batches that it reports missing are submitted again, under their own batch id.
That stays exactly-once because ``submit`` skips the images that have a task. Ground Truth
tells by job (``missing_items(items)``): the images a Completed or Failed labeling job did not
label (absent from its output manifest, or an expired task's failure line) go through
``backend.resubmit`` to one job of their own, once; what that job does not label either is said
and waits (``GroundTruthBackend.stuck``). A Stopped job's images are said and wait, unless
``resubmit_stopped`` is set (then they go to the retry job as a Failed job's do).

A backend that fails (``RetryableError``: the server down, a proxy's 502, a 429, a refused
token) is not asked again at every pass of the agent (which comes at once while the uploader
has work, and would hold each upload behind a hanging server's timeout): the task waits
``retry_base`` seconds, doubling to ``retry_cap``, returning False meanwhile without a request;
the first success ends the wait.
"""
from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from typing import Any, Callable, Sequence

from service.errors import ImageNotFound
from service.outputs import iter_rows
from service.store import UPLOADED, Store

from .errors import DiskFault, PermanentError, RetryableError
from .journal import Batch, Item, Journal
from .objectstore import ObjectStore
from .review import ReviewBackend, ReviewItem

log = logging.getLogger(__name__)

RECONCILE_INTERVAL = 600.0  # seconds: one task listing of the project each time
RETRY_BASE, RETRY_CAP = 5.0, 300.0  # seconds: the wait after a failed try doubles up to the cap


class ReviewSubmitTask:
    """The agent task that submits finished upload batches to ``backend`` (see module doc)."""

    name = "review-submit"

    def __init__(self, journal: Journal, store: Store, target: ObjectStore, backend: ReviewBackend,
                 reconcile_interval: float = RECONCILE_INTERVAL, clock: Callable[[], float] = time.monotonic,
                 retry_base: float = RETRY_BASE, retry_cap: float = RETRY_CAP) -> None:
        self.journal, self.store, self.target, self.backend = journal, store, target, backend
        self.reconcile_interval, self.clock = float(reconcile_interval), clock
        self.retry_base, self.retry_cap = float(retry_base), float(retry_cap)
        self._failures = 0  # failed tries in a row
        self._retry_at = 0.0  # no request before this (clock seconds)
        self._next_reconcile = 0.0  # due at the first pass: a restart may follow a deleted project
        self._reconciled_in: Any = None  # the backend's project_id at the last reconcile

    def items(self, batch: Batch) -> list[ReviewItem]:
        """The batch's images that still wait for review, as ``ReviewItem`` objects."""
        return self._review_items(self.journal.items(batch.batch_id, "marked"))

    def _review_items(self, items: Sequence[Item]) -> list[ReviewItem]:
        out = []
        for item in items:
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
        """Submit the oldest unsubmitted batch, else reconcile when due; False when there was
        nothing to do, or while it waits after a failure (module doc)."""
        if self.clock() < self._retry_at:
            return False
        try:
            did = self._run_once()
        except DiskFault:  # this machine's disk, not the backend: the agent has its own wait for it
            raise
        except RetryableError:
            self._failures += 1
            delay = min(self.retry_cap, self.retry_base * 2.0 ** min(self._failures - 1, 62))
            self._retry_at = self.clock() + delay
            log.info("%s: %s failed %d times in a row; tried again in %.0f s", self.name, self.backend.name,
                     self._failures, delay)
            raise
        if self._failures:
            log.warning("%s: %s answers again after %d failed tries", self.name, self.backend.name, self._failures)
        self._failures, self._retry_at = 0, 0.0
        return did

    def _run_once(self) -> bool:
        pending = self.journal.unsubmitted_batches(self.backend.name)
        if not pending:
            return self.reconcile() > 0 if self._reconcile_due() else False
        batch = pending[0]
        items = self.items(batch)
        if items:
            self._submit(batch.batch_id, items)
        self.journal.mark_submitted(batch.batch_id, self.backend.name, len(items))
        log.info("batch %s submitted to %s (%d images)", batch.batch_id, self.backend.name, len(items))
        return True

    def _submit(self, batch_id: str, items: Sequence[ReviewItem], again: bool = False) -> None:
        # a backend whose submit of the same batch is a no-op (Ground Truth: the job of that
        # name exists) sends the images it lost through ``resubmit``
        resubmit = getattr(self.backend, "resubmit", None) if again else None
        try:
            (resubmit if callable(resubmit) else self.backend.submit)(batch_id, items)
        except json.JSONDecodeError as exc:  # an answer that is not JSON (a proxy's page): not the batch's fault
            raise RetryableError(f"review backend {self.backend.name}, batch {batch_id}: an answer was not JSON: "
                                 f"{exc}") from exc
        except ValueError as exc:  # e.g. an image outside Label Studio's document root
            raise PermanentError(f"review backend {self.backend.name} refused batch {batch_id}: {exc}") from exc

    def _reconcile_due(self) -> bool:
        if not callable(getattr(self.backend, "missing", None)) and not callable(
                getattr(self.backend, "missing_items", None)):
            return False  # the backend cannot tell
        where = getattr(self.backend, "project_id", None)
        return self.clock() >= self._next_reconcile or (where is not None and where != self._reconciled_in)

    def reconcile(self) -> int:
        """Submit again the ``uploaded`` images of submitted batches that the backend reports
        missing (see the module doc); how many were submitted."""
        waiting = [r.image_id for r in iter_rows(self.store, (UPLOADED,), 1000)]
        sent = self.journal.submitted_items(self.backend.name, waiting)
        by_items = getattr(self.backend, "missing_items", None)  # Ground Truth: which job's images
        if not sent:
            lost: set[str] = set()
        elif callable(by_items):
            lost = by_items(sent)
        else:
            lost = self.backend.missing([i.image_id for i in sent])  # type: ignore[attr-defined]
        by_batch: dict[str, list[Item]] = defaultdict(list)
        for item in sent:
            if item.image_id in lost:
                by_batch[item.batch_id].append(item)
        count = 0
        for batch_id, group in by_batch.items():
            items = self._review_items(group)
            if items:
                self._submit(batch_id, items, again=True)
                count += len(items)
        if count:
            log.warning("%d images of submitted batches were lost by %s (no task for them, a task showing no image, "
                        "or their job ended without labelling them); submitted again", count, self.backend.name)
        self._next_reconcile = self.clock() + self.reconcile_interval
        self._reconciled_in = getattr(self.backend, "project_id", None)
        return count
