"""The daemon: Store + Engine + Judge + outputs, fed by gRPC and the drop folder.

Work flows through the store, never around it::

    submit(bytes) -> validate (decode) -> store.ingest -> "received"
    worker:   store.claim (lease, a batch) -> decode (cached from submit) -> engine.predict (batched)
    finisher: judge -> sidecars (atomic, one directory fsync per batch)
              -> store.complete_many (ONE transaction per batch) -> resolve waiting futures

The worker hands each predicted batch to the finisher thread (a queue of one batch), so the
file and database syncs of batch N overlap the inference of batch N+1 instead of leaving the
cores idle; per image the daemon does no fsync-bound work on the inference path.

A worker holds a lease on what it claimed; a crash leaves the rows "received" and the lease
expires, so another worker (or the restarted daemon) finishes them. ``store.complete`` only
succeeds for the lease holder, so an image is completed once. The sidecar is written *before*
``complete``: a crash between the two re-annotates the image and rewrites the same sidecar,
whereas the other order could leave a completed image without one.

A batch renews its leases as it makes progress (``_BatchLease``: before and after inference,
before judging, before the sidecars, before the completion), not from a timer, so a batch that
hangs still loses them: ``store.lease_seconds`` need only outlast one step, not the whole batch.
A row whose lease was lost all the same is left to the worker that took it over: no sidecar is
written for it (it would overwrite the new owner's), and that worker answers its waiters with
its annotation (instead of the untouched "received" row; ``_answer_lost`` when that worker is in
another process). A row claimed before is claimed alone (``Store.claim``), so an image that kills
its worker takes no other image down, and after ``store.max_attempts`` claims it fails through
``_fail`` like any other failed image (quarantine copy and reason, waiters, counter).

The engine is swapped atomically by ``reload``: the new bundle is loaded, verified and run once
on a blank image first; a batch in flight finishes with the engine it started with.
"""
from __future__ import annotations

import collections
import ctypes
import gc
import logging
import os
import queue
import socket
import sqlite3
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from .bundle import Bundle, Thresholds, load_bundle
from .dropfolder import DropFolder, missing_drop_folder, quarantine_dir, text_name, write_quarantine
from .engine import GPU_PROVIDERS, Engine
from .errors import (AnnotatorError, BundleError, ConfigError, ImageError, ImageNotFound, ImageTooLarge, LeaseLost,
                     ShuttingDown, StoreFull, StoreUnavailable, describe_io_error, free_space, is_io_fault,
                     store_write_error)
from .imageio import DecodedImage, decode_image
from .judge import Judge, Judgement, NearDuplicate, ReviewShare, load_score_fn, rank_key
from .outputs import write_sidecars
from .record import Prediction
from .retention import RetentionTask
from .retention import enabled as retention_enabled
from .signing import load_public_key, verify_bundle_dir
from .store import FAILED, RECEIVED, Completion, ImageRow, Store, image_id_of, sequence_of

if TYPE_CHECKING:
    from .config import Config
    from .interceptors import LatencyStats
    from .metrics import MetricsRecorder

log = logging.getLogger(__name__)

VERSION = "0.1.0"
DECODED_CACHE_BYTES = 64 << 20  # decoded pixels kept between submit and the worker (memory bound)
IDLE_POLL_SECONDS = 0.5
TRIM_AFTER_RELOAD_SECONDS = 30.0  # ``trim_heap`` again after a swap, once the old sessions' batches are done
FINISH_QUEUE = 1  # predicted batches waiting for the finisher (back-pressure on the workers)
RECALL_MAX_FRAMES = 1024  # review frames decoded in all at start for the near-duplicate memory
# After the disk failed a batch's writes (full, read-only, I/O errors): how long no image is
# claimed, doubling while the fault lasts (``Daemon._io_failed``).
IO_RETRY_SECONDS, IO_RETRY_MAX_SECONDS = 5.0, 60.0


@dataclass(frozen=True)
class DaemonStatus:
    """A snapshot for ``GetStatus``: bundle, thresholds, queue depths per state, counters."""

    bundle_id: str
    bundle_path: str
    thresholds: Thresholds
    judgement: Mapping[str, Any]
    queue_depths: Mapping[str, int]
    counters: Mapping[str, int]
    uptime_seconds: float
    paused_reason: str | None
    version: str = VERSION
    providers: tuple[str, ...] = ()  # what the sessions really run on
    run_batch: int = 0  # images per session.run
    notices: tuple[str, ...] = ()  # what an operator should act on that stops nothing (a lost watch)


def record_for(image_id: str, source: str, prediction: Prediction, judgement: Judgement, bundle: Bundle) -> dict:
    """The annotation record kept in the store and written as the sidecar (see ``service.convert``)."""
    return {"image_id": image_id, "source": source, **prediction.to_json(),
            "keypoint_names": list(bundle.keypoints.names), "bundle_id": bundle.id,
            "judgement": judgement.to_json(), "annotated_at": time.time()}


def _refused(row: ImageRow) -> bool:
    """Whether a caller waiting for ``row`` gets its error, not the row: an image that failed
    before it was annotated. One annotated and failed later (the sync agent could never upload
    it for review) has its record, which is the answer: the input was fine."""
    return row.state == FAILED and row.record is None


def rejection_reason(exc: BaseException) -> str:
    """The ``reason`` label of an image refused at intake (subclasses before their bases)."""
    for kind, reason in ((ImageTooLarge, "too_large"), (ImageError, "invalid"), (StoreFull, "store_full"),
                         (StoreUnavailable, "store_unavailable"), (ShuttingDown, "shutting_down")):
        if isinstance(exc, kind):
            return reason
    return "other"


def write_fault(exc: BaseException) -> str | None:
    """What stopped a batch's writes when it is not the images' fault, else None (a bug: the
    batch's leases run out and count as claims, so a crash loop ends in quarantine).
    ``"disk fault"``: full, read-only, failing (``is_io_fault``); ``"no write permission"``: the
    sidecar folder or the store denies the service user (a setting to fix); ``"cannot write"``:
    any other OSError of a write (a file where the sidecar folder belongs...). In each case the
    images wait uncounted (``Daemon._io_failed``) instead of every one being quarantined."""
    if is_io_fault(exc):
        return "disk fault"
    if isinstance(exc, PermissionError):
        return "no write permission"
    if isinstance(exc, OSError):
        return "cannot write"
    return None


def trim_heap() -> None:
    """Collect garbage and give the C heap's free pages back to the system (glibc's
    ``malloc_trim``; nothing elsewhere). The old bundle's onnxruntime sessions are freed at a
    swap, but glibc kept their pages: the daemon's RSS grew about 5 MB a swap (16 reloads of the
    demo bundle: 252 -> 337 MB; trimmed, 174 -> 188 MB)."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        pass


def _within_file_size_limit(max_bytes: int) -> tuple[int, str]:
    """``drop.max_bytes`` and that setting's name, or less where this process may not write a file that large (``ulimit
    -f``, systemd's ``LimitFSIZE``): the store's copy of a larger image failed with EFBIG, which
    is a disk fault (the store cannot write), so one such image paused all intake for good, the
    images behind it included. Now it is refused as too large (quarantined with its reason), and
    the limit is said once at start, and the refusal names it."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if soft == resource.RLIM_INFINITY or soft >= max_bytes:
        return max_bytes, "drop.max_bytes"
    log.warning("this process may not write files over %d bytes (ulimit -f, or systemd's LimitFSIZE): images "
                "larger than that are refused as too large (drop.max_bytes is %d)", soft, max_bytes)
    return int(soft), "this process may not write larger files: ulimit -f, or systemd's LimitFSIZE"


def make_drop_folder(folder: Path, store_root: Path, source: str) -> str | None:
    """Make the drop folder at start where it is missing and a first start wants it made
    (``dropfolder.missing_drop_folder``, which ``annotator doctor`` asks too); return the status
    notice that says so, None when it was there. ``ConfigError`` naming ``drop.folder`` and where
    it was set (``source``) where it must not be made: the daemon made any missing path (and the
    folders above it) without a word, so a typo'd path became a new folder nothing writes into,
    while doctor called the same folder a failure."""
    if os.path.isdir(folder):
        return None
    advice = f"install -d -m 2770 -o annotator -g annotator {text_name(folder)}"
    if os.path.lexists(folder):
        raise ConfigError(f"drop.folder: {text_name(folder)} is not a folder ({source}); point drop.folder at a folder")
    refusal = missing_drop_folder(folder, store_root)
    if refusal is not None:
        raise ConfigError(f"drop.folder: {refusal} ({source}); fix drop.folder, or if the folder is meant to be new, "
                          f"create it: {advice}")
    try:
        folder.mkdir()
    except OSError as exc:
        raise ConfigError(f"drop.folder: cannot create {text_name(folder)}: {exc.strerror or exc} ({source}); create "
                          f"it: {advice}") from exc
    notice = (f"the drop folder {text_name(folder)} did not exist and was made at this start ({source}) and no file "
              f"has come into it yet: if the capture tools write elsewhere, drop.folder is wrong")
    log.warning("%s", notice)
    return notice


def _decode(data: bytes, max_bytes: int, max_pixels: int, max_side_hint: int | None) -> DecodedImage:
    """``decode_image`` with both limits (``ImageTooLarge`` for either, ``ImageError`` otherwise)."""
    return decode_image(data, max_pixels=max_pixels, max_side_hint=max_side_hint, max_bytes=max_bytes)


RENEW_AFTER = 1 / 3  # share of store.lease_seconds gone before a batch in flight renews its leases


class _BatchLease:
    """The leases of one batch in flight, renewed at each step of its progress.

    ``keep()`` renews them (one store transaction) once a third of the lease has gone by since
    the claim or the last renewal, and does nothing before: a batch that finishes quickly, as
    most do, costs no extra commit. Either way it returns the ids still held: a lease not yet
    expired cannot have been taken over. Used by one thread at a time (the worker, then the
    finisher).
    """

    def __init__(self, store: Store, owner: str, rows: list[ImageRow]) -> None:
        self.store, self.owner = store, owner
        self.image_ids = [r.image_id for r in rows]
        self.held = list(self.image_ids)  # as of the claim or the last renewal
        now = store.clock()
        self.expires = min((r.lease_expires for r in rows if r.lease_expires is not None),
                           default=now + store.lease_seconds)

    def keep(self) -> list[str]:
        """Renew the leases when due; the ids of the batch whose lease this worker still holds."""
        now = self.store.clock()
        # Not yet due, unless the clock stepped back (the lease then ends more than a lease from
        # now: renewed now, else it stays in the old time until the clock catches up, and
        # Store.claim lets another worker take it over after lease_seconds + CLOCK_STEP_SLACK).
        if self.expires - self.store.lease_seconds <= now < self.expires - self.store.lease_seconds * (1 - RENEW_AFTER):
            return self.held
        held = self.store.renew_held(self.owner, self.held)
        self.expires = now + self.store.lease_seconds
        if len(held) < len(self.held):
            log.info("%s renewed %d of %d leases of its batch; the others were taken over or finished",
                     self.owner, len(held), len(self.image_ids))
        self.held = held
        return held


@dataclass(frozen=True)
class _Predicted:
    """A batch between the worker and the finisher: rows, their pixels and predictions, in order."""

    owner: str
    bundle: Bundle
    judge: Judge
    rows: list[ImageRow]
    decoded: list[DecodedImage]
    predictions: list[Prediction]
    lease: _BatchLease


class Daemon:
    """The appliance's core; ``service.server`` puts gRPC in front of it. See the module docstring."""

    def __init__(self, config: "Config", workers: int | None = None, metrics: "MetricsRecorder | None" = None,
                 sole: bool = False) -> None:
        """``metrics``: a recorder for inference latency, intake refusals, the bundle id and the
        store's state counts (``service.metrics``); None records nothing. ``sole``: this is the
        only daemon on the store (``annotator serve`` holds ``serve.lock``), so every lease
        another owner holds at ``start`` is a dead daemon's, taken over at once."""
        self.sole = sole
        config.require("engine.bundle", "store.root")
        self.config = config
        # before the bundle loads: a drop folder that must not be made stops the start at once
        self._drop_made = make_drop_folder(Path(config.drop.folder), Path(config.store.root),
                                           config.source_of("drop.folder")) if config.drop.folder else None
        self.metrics = metrics
        key_path = config.engine.bundle_public_key
        self._public_key = load_public_key(Path(key_path)) if key_path is not None else None
        self.store = Store(Path(config.store.root), lease_seconds=float(config.store.lease_seconds),
                           min_free_bytes=int(config.store.min_free_mb) * 1_000_000)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._bundle_path = str(config.engine.bundle)
        j = config.judge  # one near-duplicate memory for the daemon's life: a bundle swap keeps it
        self._dedup = NearDuplicate(int(j.near_duplicate_distance), int(j.near_duplicate_memory)) \
            if j.near_duplicate else None
        # The engine and its judge as one attribute: a swap replaces the pair in one store, so a
        # reader (a batch, ``status``) never sees the new bundle with the old judge's thresholds.
        self._loaded: tuple[Engine, Judge] = self._load(self._bundle_path)
        d = config.drop
        self.max_bytes, max_bytes_setting = _within_file_size_limit(int(d.max_bytes))
        self.max_pixels = int(d.max_pixels)
        self.batch_size = int(config.engine.batch_size)
        sidecar_dir = getattr(config.outputs, "sidecar_dir", None)
        self.sidecar_dir = Path(sidecar_dir) if sidecar_dir else None
        self.quarantine_dir = quarantine_dir(d.folder, config.store.root)
        self.drop = DropFolder(Path(d.folder), self._from_drop, d.processed_mode, float(d.stable_seconds),
                               self.max_bytes, self.max_pixels, float(d.poll_interval),
                               self.max_side_hint, paused=self.store.paused_reason,
                               known=self._stored, remove_empty_seconds=3600.0 * float(d.remove_empty_hours),
                               max_bytes_setting=max_bytes_setting) if d.folder else None
        keep = getattr(config, "retention", None)
        self.retention = RetentionTask(self.store, keep, Path(d.folder) if d.folder else None, metrics=metrics) \
            if keep is not None and retention_enabled(keep) else None
        if self._dedup is not None:
            self._recall_reviews(self._dedup)
        if metrics is not None:
            metrics.bundle(self._engine.bundle.id, self._engine.active_providers)
            metrics.watch_store(self.store, faulted=lambda: self._io_fault is not None)
            metrics.watch_daemon(self)  # the drop folder's files taken, its watch, the bundle's age
            if self.drop is not None:
                self.drop.on_quarantine = lambda: metrics.rejected("quarantined")
        self.latency: "LatencyStats | None" = None
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._reload_lock = threading.Lock()
        self._futures: dict[str, list[Future[ImageRow]]] = {}
        self._lost: set[str] = set()  # images whose lease a batch lost while they were still received
        self._decoded: collections.OrderedDict[str, DecodedImage] = collections.OrderedDict()
        self._decoded_bytes = 0
        self._finish_q: queue.Queue[_Predicted | None] = queue.Queue(maxsize=FINISH_QUEUE)
        self._finisher = threading.Thread(target=self._finish_loop, name="finisher", daemon=True)
        # When each busy thread (worker owner or "finisher") began its current batch step
        # (monotonic); ``healthy`` reads it to tell a wedged thread from a working one.
        self._busy: dict[str, float] = {}
        self._in_flight = 0  # predicted batches handed to the finisher and not finished yet
        self.stall_seconds = float(getattr(config.engine, "stall_seconds", 1800.0))
        self._stalled: set[str] = set()
        # A disk fault under a batch's writes (``_io_failed``): why, and until when no image is claimed.
        self._io_fault: str | None = None
        self._io_until = -float("inf")
        self._io_delay = 0.0
        self._give_back: list[tuple[str, list[str]]] = []  # (owner, ids) whose leases could not be given back yet
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._intake_closed = False
        n = int(config.engine.workers) if workers is None else workers
        self._workers = [threading.Thread(target=self._work, args=(f"{self.owner}/w{i}",), name=f"worker-{i}",
                                          daemon=True) for i in range(max(1, n))]

    # -- engine and judge ----------------------------------------------------------------
    def _load(self, path: str) -> tuple[Engine, Judge]:
        """Load, verify (signature when a public key is configured) and smoke-test a bundle.

        Raises ``BundleError`` and changes nothing.

        ``path`` is resolved once, first: read through the models folder's ``current`` link file
        by file, a switch or rollback moving the link mid-load gave one bundle's bundle.json (its
        id on every record) with the other's ONNX files.
        """
        e = self.config.engine
        if Path(path).exists():  # a missing one keeps its name in the error
            path = str(Path(path).resolve())
        signed = verify_bundle_dir(Path(path), self._public_key) if self._public_key is not None else None
        bundle = load_bundle(path)
        if signed is not None and (Path(path) / "bundle.json").read_bytes() != signed:
            raise BundleError(f"{path}: bundle.json changed while it was being loaded; its signature no longer applies")
        threads = int(e.threads) or max(1, (os.cpu_count() or 1) // max(1, int(e.workers)))
        # metrics after the blank-image probe below: its cold runs are no image's inference time
        engine = Engine(bundle, providers=list(e.providers) if e.providers else None,
                        intra_op_threads=threads, batch_size=int(e.run_batch) or 1, metrics=None,
                        letterbox=str(getattr(e, "letterbox", "square")))
        if not int(e.run_batch) and engine.active_providers[0] in GPU_PROVIDERS:
            engine.batch_size = max(1, int(e.batch_size))  # a GPU wants whole batches (README, "GPU")
        # The shapes the workers will run: a whole batch of blank images (a model exported for
        # batch 1 only failed every batch of a GPU box after it passed a one-image check, and
        # every image was then quarantined), and in "rect" mode a rectangular one too.
        probe = [np.zeros((64, 64, 3), np.uint8)] * max(1, engine.batch_size)
        if engine.letterbox == "rect":
            probe.append(np.zeros((48, 64, 3), np.uint8))
        try:
            engine.predict_arrays(probe)
        except Exception as exc:  # onnxruntime errors are of several unrelated types
            raise BundleError(f"bundle {bundle.id} at {path} fails on blank images (a batch of {len(probe)}, "
                              f"{engine.letterbox} letterbox): {exc}") from exc
        engine.metrics = self.metrics
        return engine, self._make_judge(bundle)

    def _make_judge(self, bundle: Bundle) -> Judge:
        j = self.config.judge
        defaults = dict(bundle.judgement)

        def pick(name: str, fallback: Any) -> Any:
            value = getattr(j, name, None)
            return fallback if value is None else value

        threshold = float(pick("threshold", defaults.get("score_threshold", 0.5)))
        return Judge(load_score_fn(str(j.score_fn), bundle), threshold=threshold,
                     audit_fraction=float(pick("audit_fraction", defaults.get("audit_fraction", 0.02))),
                     seed=int(j.seed), store=self.store, hourly_budget=j.hourly_budget,
                     daily_budget=j.daily_budget, dedup=self._dedup,
                     session_budget=j.reviews_per_session, share=self._recall_share(bundle, threshold))

    def _recall_share(self, bundle: Bundle, threshold: float) -> ReviewShare | None:
        """A ``ReviewShare`` for the bundle's judge (``judge.review_share``), holding the rank keys of
        the images the same bundle judged last (a restart keeps ranking against what came
        before; another bundle's scores are not comparable, so a new bundle starts empty). A
        recalled image was a candidate when it scored under ``threshold`` and was not held back
        as a near duplicate or by its recording's cap (its stored reasons)."""
        j = self.config.judge
        if j.review_share is None:
            return None
        share = ReviewShare(float(j.review_share), int(j.review_window))
        recalled = self.store.recent_scores(bundle.id, share.window)
        for score, doubt, reasons in recalled:
            candidate = score < threshold and not {"near_duplicate", "session_reviewed"} & set(reasons)
            share.remember(rank_key(score, doubt or 0.0), candidate)
        log.info("review share %.3g of the last %d images: %d recalled from the store for bundle %s",
                 share.share, share.window, len(recalled), bundle.id)
        return share

    @property
    def _engine(self) -> Engine:
        return self._loaded[0]

    @property
    def _judge(self) -> Judge:
        return self._loaded[1]

    @property
    def bundle(self) -> Bundle:
        return self._engine.bundle

    @property
    def max_side_hint(self) -> int:
        """The largest network input side: JPEGs twice as large are decoded at reduced size."""
        return max(max(m.size) for m in self._engine.models.values())

    def _recall_reviews(self, dedup: NearDuplicate) -> None:
        """Fill the near-duplicate memory with the newest review frames of the store's cameras.

        Without it a restart forgot which frames went to review, and the next near duplicate of
        one was sent again. The frames are decoded as the workers decode them (the same reduced
        JPEG decode), so their dHashes are those the judge remembered; a frame whose bytes are
        gone is skipped.

        At most ``RECALL_MAX_FRAMES`` frames in all are decoded, those of the cameras that sent a
        frame to review most recently first: a store of a year of dated drop folders holds
        thousands of such "cameras", and the start decoded 64 frames of each."""
        recalled, skipped = 0, []
        newest_first: dict[str, list[ImageRow]] = {}  # camera -> its frames; cameras by their newest frame
        for row in reversed(self.store.latest_per_camera("review", dedup.memory)):
            if row.camera:
                newest_first.setdefault(row.camera, []).append(row)
        chosen: list[ImageRow] = []
        for frames in newest_first.values():
            chosen.extend(frames[:RECALL_MAX_FRAMES - len(chosen)])
            if len(chosen) >= RECALL_MAX_FRAMES:
                break
        chosen.sort(key=lambda r: (r.received_at, r.image_id))  # oldest first, as they were judged
        for row in chosen:
            try:
                data = self.store.image_bytes(row.image_id)
                pixels = _decode(data, self.max_bytes, self.max_pixels, self.max_side_hint).pixels
            except (ImageError, ImageNotFound) as exc:
                skipped.append(f"{row.image_id[:12]}: {exc}")
                continue
            dedup.remember(row.camera, pixels, row.image_id)
            recalled += 1
        if recalled:
            log.info("near-duplicate memory: %d review frames recalled from the store", recalled)
        if skipped:
            log.warning("near-duplicate memory: %d review frames not recalled (first: %s)", len(skipped), skipped[0])

    def reload(self, bundle_path: str | None = None) -> Bundle:
        """Swap in the bundle at ``bundle_path`` (default: the configured ``engine.bundle``, re-read:
        e.g. the ``current`` link after ``annotator models adopt``, not the path last loaded).

        Raises ``BundleError`` when the new bundle fails to load or verify; the old one stays.
        Raises ``ShuttingDown`` once the daemon stops taking images (``stop_intake``, ``close``):
        a reload then loaded a bundle for nothing while the shutdown waited, and one that ended
        after ``close`` met the closed store (INTERNAL "the store is closed", after swapping).
        """
        with self._reload_lock:
            old, engine, path = self._swap(bundle_path)
        return self._reloaded(old, engine, path)

    def _swap(self, bundle_path: str | None) -> tuple[str, Engine, str]:
        """Load and swap in a bundle, under ``_reload_lock``; (old id, new engine, path)."""
        self._refuse_when_stopping()
        path = str(bundle_path or self.config.engine.bundle)
        try:
            engine, judge = self._load(path)
        except Exception as exc:  # e.g. the store closed under the review share's recall
            if self._intake_closed:
                raise ShuttingDown(f"the annotator shut down while bundle {path} was loading") from exc
            raise
        self._refuse_when_stopping()  # the shutdown began while it loaded: nothing is swapped
        old, old_side = self._engine.bundle.id, self.max_side_hint
        self._loaded, self._bundle_path = (engine, judge), path
        self._follow_input_size(old_side)
        self.store.counter("reloads", 1)
        if self.metrics is not None:  # under the lock: two reloads never leave the older one's id
            self.metrics.bundle(engine.bundle.id, engine.active_providers)
        return old, engine, path

    def _reloaded(self, old: str, engine: Engine, path: str) -> Bundle:
        log.info("reloaded models: bundle %s -> %s (%s)", old, engine.bundle.id, path)
        trim_heap()
        # Again once the batches in flight, which hold the old sessions, are done.
        timer = threading.Timer(TRIM_AFTER_RELOAD_SECONDS, trim_heap)
        timer.daemon = True
        timer.start()
        return engine.bundle

    def follow_configured_bundle(self) -> bool:
        """Reload when ``engine.bundle`` (the ``current`` link) names another folder than the one
        loaded from it; True when it did. ``serve`` calls it once it listens: a switch or
        rollback that moved the link while the daemon started, after it had read it, found no
        one listening ("connection refused": the bundle "becomes active at the next start") and
        was lost, the daemon serving the bundle rolled back from. A bundle that does not load
        is logged and the loaded one kept."""
        configured = Path(str(self.config.engine.bundle))
        # The check and the load under one hold of the reload lock: a ReloadModels naming a
        # bundle that was answered between them (the server listens already) was undone by
        # this load of ``current``; now it waits, and comes after.
        with self._reload_lock:
            if self._bundle_path != str(configured) or not configured.exists():
                return False
            if configured.resolve() == Path(self._engine.bundle.path).resolve():
                return False
            log.warning("%s moved to %s while the daemon started (it loaded %s); loading it", configured,
                        configured.resolve(), self._engine.bundle.path)
            try:
                old, engine, path = self._swap(None)
            except BundleError as exc:
                log.error("%s names a bundle that does not load (%s); bundle %s stays in use", configured, exc,
                          self._engine.bundle.id)
                return False
        self._reloaded(old, engine, path)
        return True

    def _refuse_when_stopping(self) -> None:
        if self._intake_closed:
            raise ShuttingDown("the annotator is shutting down; no bundle is loaded now (it loads the configured "
                               "engine.bundle at its next start)")

    def _follow_input_size(self, old_side: int) -> None:
        """After a swap, decode for the new bundle's input size: the drop folder was given the hint
        once, at start, and kept decoding JPEGs for the old models (a larger new input got
        pixels decoded at too small a size); decodes cached for the old size are dropped, and the
        workers decode those images again from the store."""
        side = self.max_side_hint
        if self.drop is not None:
            self.drop.max_side_hint = side
        if side != old_side:
            with self._lock:
                self._decoded.clear()
                self._decoded_bytes = 0

    # -- intake --------------------------------------------------------------------------
    def submit(self, data: bytes, source: str, meta: dict | None = None) -> "Future[ImageRow]":
        """Validate and ingest ``data``; the future resolves to the stored row once annotated.

        Raises ``ImageError``/``ImageTooLarge`` (nothing stored), ``StoreFull``, ``ShuttingDown``.
        The same bytes again resolve to the stored row without annotating twice.
        """
        try:
            if self._intake_closed:
                raise ShuttingDown("the annotator is shutting down; retry against another instance or later")
            row = self.store.get(image_id_of(data)) if data else None
            if row is not None and row.state != RECEIVED and row.pruned_at is None:
                return self._settled(row)  # (bytes retention removed go on to the store, which keeps them again)
            decoded = _decode(data, self.max_bytes, self.max_pixels, self.max_side_hint)
            fut = self.submit_decoded(data, source, meta or {}, decoded)
            assert fut is not None
            return fut
        except AnnotatorError as exc:  # counted, then raised to the caller unchanged
            if self.metrics is not None:
                self.metrics.rejected(rejection_reason(exc))
            raise

    def submit_decoded(self, data: bytes, source: str, meta: dict, decoded: DecodedImage,
                       want_future: bool = True) -> "Future[ImageRow] | None":
        """``submit`` for bytes already decoded (the drop folder validates before calling).

        ``want_future=False`` (the drop folder, where nobody waits) registers no future and
        returns None: each one stayed in ``_futures`` until its image was annotated, so a backlog
        of 20k files held 20k futures (+92 MB)."""
        try:
            image_id, created = self.store.ingest(data, source, meta)
        except (OSError, sqlite3.OperationalError) as exc:
            if not is_io_fault(exc):
                raise
            raise store_write_error(exc, self.store.root) from exc
        fut: Future[ImageRow] | None = Future() if want_future else None
        with self._lock:
            if fut is not None:
                self._futures.setdefault(image_id, []).append(fut)
            if created and image_id not in self._decoded:
                self._decoded[image_id] = decoded
                self._decoded_bytes += decoded.pixels.nbytes
                while self._decoded_bytes > DECODED_CACHE_BYTES and len(self._decoded) > 1:
                    self._decoded_bytes -= self._decoded.popitem(last=False)[1].pixels.nbytes
        self._wake.set()
        if fut is None:
            return None
        row = self.store.get(image_id)
        if row is not None and row.state != RECEIVED:  # finished before we registered
            self._resolve(image_id, row)
        return fut

    def _from_drop(self, data: bytes, source: str, meta: dict, decoded: DecodedImage) -> None:
        """The drop folder's sink: ingest, no future (nobody waits for a dropped file)."""
        self.submit_decoded(data, source, meta, decoded, want_future=False)

    def _stored(self, image_id: str) -> bool:
        """The drop folder's ``known`` probe: the store holds these bytes already (any state;
        not bytes retention removed: those are ingested, and the store keeps them again)."""
        row = self.store.get(image_id)
        return row is not None and row.pruned_at is None

    @staticmethod
    def _settled(row: ImageRow) -> "Future[ImageRow]":
        """The answer for bytes the store holds: the row, or the reason it failed (``_refused``)."""
        fut: Future[ImageRow] = Future()
        if _refused(row):
            fut.set_exception(ImageError(row.error or "image failed earlier"))
        else:
            fut.set_result(row)
        return fut

    def annotate_now(self, data: bytes, source: str, meta: dict | None = None, timeout: float = 60.0) -> ImageRow:
        """Submit and wait for the annotation; ``TimeoutError`` after ``timeout`` seconds."""
        fut = self.submit(data, source, meta)
        try:
            return fut.result(timeout=timeout)
        except TimeoutError as exc:  # concurrent.futures.TimeoutError is TimeoutError (3.11)
            raise TimeoutError(f"image {image_id_of(data)[:12]} is queued but not annotated after {timeout:.1f} s") from exc

    def _resolve(self, image_id: str, row: ImageRow | None = None, error: BaseException | None = None) -> None:
        with self._lock:
            waiting = self._futures.pop(image_id, [])
        if not waiting:
            return
        if row is None and error is None:
            row = self.store.get(image_id)
        for fut in waiting:
            if fut.done():
                continue
            if error is not None:
                fut.set_exception(error)
            elif row is not None and _refused(row):
                fut.set_exception(ImageError(row.error or "image failed"))
            else:
                fut.set_result(row)  # type: ignore[arg-type]

    # -- workers ------------------------------------------------------------------------
    def start(self) -> None:
        """Start the finisher, the workers and the drop folder watcher (after clearing what a
        killed ingest left in the store: ``Store.remove_stale_temps``)."""
        self.store.remove_stale_temps()
        if self.sole:
            taken = self.store.expire_leases(but=self.owner)
            if taken:
                log.info("%d images leased by a daemon that is gone (killed?) are taken over now", taken)
        # numpy's BLAS on one thread for the daemon's life (``confcal.single_threaded_blas``:
        # the calibration's small products spun OpenBLAS's pool beside onnxruntime, 1.3-1.4x the
        # images/s on 2 cores). Held here, not only around each product, so that the thread
        # count never changes while another worker is inside a product.
        from .confcal import single_threaded_blas

        self._blas_scope = single_threaded_blas()
        self._blas_scope.__enter__()
        self._finisher.start()
        for t in self._workers:
            t.start()
        if self.drop is not None:
            self.drop.start()
        if self.retention is not None:
            self.retention.start()
        log.info("daemon %s started with bundle %s", self.owner, self.bundle.id)
        trim_heap()  # what loading and checking the bundle freed (demo bundle: 184 -> 169 MB RSS)

    def _claim(self, owner: str) -> list[ImageRow]:
        """A batch for ``owner``; an image claimed too often comes back alone, for ``_predict`` to fail."""
        return self.store.claim(owner, limit=self.batch_size, fail_exhausted=False)

    def _work(self, owner: str) -> None:
        while not self._stop.is_set():
            rows: list[ImageRow] = []
            try:
                self._answer_lost()
                if self._io_paused():
                    self._stop.wait(min(IDLE_POLL_SECONDS * 4, max(0.0, self._io_until - time.monotonic())))
                    continue
                rows = self._claim(owner)
                if not rows and self._io_fault is not None and not self._give_back and not self._busy \
                        and not self._in_flight:  # a batch queued for the finisher is in flight too
                    self._io_recovered()  # nothing waits nor is in flight any more: no fault to report
                if rows:
                    self._busy[owner] = time.monotonic()
                    try:
                        predicted = self._predict(owner, rows)
                        if predicted is not None:
                            with self._lock:
                                self._in_flight += 1
                            self._finish_q.put(predicted)  # waits while the finisher has a batch queued
                    finally:
                        self._busy.pop(owner, None)
                    continue
            except Exception as exc:  # a worker must survive; the lease brings the rows back later
                if write_fault(exc):  # the disk's fault: the images wait, not counted as a failed claim
                    self._io_failed(f"worker {owner}", exc, owner, [r.image_id for r in rows])
                    continue
                log.exception("worker %s: batch failed; its images return to the queue when the lease expires", owner)
                time.sleep(IDLE_POLL_SECONDS)
            self._wake.wait(IDLE_POLL_SECONDS)
            self._wake.clear()

    def _cached(self, image_id: str) -> DecodedImage | None:
        with self._lock:
            decoded = self._decoded.pop(image_id, None)
            if decoded is not None:
                self._decoded_bytes -= decoded.pixels.nbytes
        return decoded

    def _predict(self, owner: str, rows: list[ImageRow]) -> "_Predicted | None":
        """Decode what the cache lacks (restarts, evictions) and run the engine on the batch.

        A row claimed ``store.max_attempts`` times already (each worker that took it died or lost
        the lease) is failed instead, with its quarantine copy and reason, like an undecodable one.
        """
        engine, judge = self._loaded  # one consistent pair for the whole batch
        batch: list[tuple[ImageRow, DecodedImage]] = []
        for row in rows:
            exhausted = self.store.exhausted(row)
            if exhausted is not None:
                try:
                    self._fail(owner, row, exhausted, self.store.image_bytes(row.image_id))
                except (ImageNotFound, OSError):  # gone, or its file cannot be read (below)
                    self._fail(owner, row, exhausted, None)
                continue
            decoded = self._cached(row.image_id)
            if decoded is None:
                data: bytes | None = None
                try:
                    data = self.store.image_bytes(row.image_id)
                    decoded = _decode(data, self.max_bytes, self.max_pixels, self.max_side_hint)
                except ImageNotFound as exc:
                    self._fail(owner, row, f"image bytes are missing from the store: {exc}", None)
                    continue
                except ImageError as exc:
                    self._fail(owner, row, str(exc), data)
                    continue
                except OSError as exc:
                    # This image's file cannot be read (a bad sector: EIO). Not a disk fault of
                    # the batch: its claim counts (the lease runs out), it is retried alone and
                    # failed with its reason after max_attempts, and the others go on now. Taken
                    # for the disk's fault, the batch's leases were given back uncounted, the same
                    # batch was formed again, and nothing was ever annotated.
                    log.warning("image %s cannot be read (%s); retried alone when its lease ends, failed after "
                                "%d tries", row.image_id[:12], exc, self.store.max_attempts)
                    continue
            batch.append((row, decoded))
        if not batch:
            return None
        lease = _BatchLease(self.store, owner, [r for r, _ in batch])
        lease.keep()  # decoding a batch without cached pixels takes a while
        predictions = engine.predict([d for _, d in batch])
        lease.keep()  # so that the wait for the finisher starts on a fresh lease
        return _Predicted(owner, engine.bundle, judge, [r for r, _ in batch], [d for _, d in batch], predictions,
                          lease)

    def _finish_loop(self) -> None:
        """The finisher thread: finish predicted batches in order until ``None`` arrives."""
        while True:
            item = self._finish_q.get()
            if item is None:
                return
            self._busy["finisher"] = time.monotonic()
            try:
                self._finish(item)
            except Exception as exc:  # the lease brings the rows back later; the finisher must survive
                if write_fault(exc):  # the disk or the sidecar folder: not the images' fault
                    self._io_failed(f"writing the annotations of {len(item.rows)} images", exc, item.owner,
                                    [r.image_id for r in item.rows])
                    continue
                log.exception("finishing a batch of %d failed; its images return to the queue when the lease "
                              "expires", len(item.rows))
            finally:
                self._busy.pop("finisher", None)
                with self._lock:
                    self._in_flight -= 1

    def _finish(self, p: "_Predicted") -> None:
        """Judge, write the sidecars, complete the whole batch in one transaction, resolve waiters.

        A row whose lease was lost (another worker took it over after it expired) gets neither a
        sidecar nor a completion here: the new owner may have written its own sidecar already,
        and this annotation must not replace it. Its waiters are not answered here either: the
        worker that holds it now answers them with its result (``_answer_lost`` when that worker
        is in another process).
        """
        verdicts: list[Judgement] = []
        done: set[str] = set()  # completed by this batch's transaction
        lost: list[LeaseLost] = []
        try:
            p.lease.keep()
            records = []
            for row, decoded, prediction in zip(p.rows, p.decoded, p.predictions):
                # the recording only matters to a per-session cap; no path parsing per image without one
                recording = sequence_of(row.meta, row.camera) if p.judge.session_budget is not None else None
                verdict = p.judge.judge(row.image_id, prediction, p.bundle, row.camera, decoded.pixels,
                                        session=recording[0] if recording is not None else None)
                verdicts.append(verdict)
                records.append(record_for(row.image_id, row.source, prediction, verdict, p.bundle))
            held = set(p.lease.keep())  # the rows still ours: the lease is fresh for the next step
            mine = [(row, record, v) for row, record, v in zip(p.rows, records, verdicts) if row.image_id in held]
            for row in p.rows:
                if row.image_id not in held:
                    log.warning("%s lost the lease on %s before writing its sidecar; the worker that holds it "
                                "now finishes it", p.owner, row.image_id[:12])
            if self.sidecar_dir is not None:  # before completion: a crash re-annotates, never loses one
                write_sidecars(self.sidecar_dir, [record for _, record, _ in mine])
            p.lease.keep()
            lost = self.store.complete_many(p.owner, [
                Completion(row.image_id, record, p.bundle.id, v.decision, v.score, v.reasons, v.audit, v.counters)
                for row, record, v in mine])
            lost_ids = {exc.image_id for exc in lost}
            done = {row.image_id for row, _, _ in mine if row.image_id not in lost_ids}
            self._io_recovered()
            if self.metrics is not None and done:  # arrival to annotation, per intake path
                now = self.store.clock()
                for row in p.rows:
                    if row.image_id in done:
                        self.metrics.annotated(row.source, now - row.received_at)
        finally:
            for row, verdict in zip(p.rows, verdicts):
                p.judge.settle(verdict, committed=row.image_id in done)
        for exc in lost:  # taken over while the sidecars were written (a step longer than the lease)
            log.warning("%s; the worker that holds it now finishes it", exc)
        for row in p.rows:
            if row.image_id in done:
                self._resolve(row.image_id)
            else:
                with self._lock:
                    self._lost.add(row.image_id)
        if len(done) < len(p.rows):
            self._answer_lost()

    # -- disk faults ----------------------------------------------------------------------
    def _io_paused(self) -> bool:
        """Whether workers wait before claiming (a recent disk fault); gives back the leases a
        fault left held meanwhile (``_io_failed``)."""
        if self._give_back:
            self._return_leases()
        return time.monotonic() < self._io_until

    def _io_failed(self, what: str, exc: BaseException, owner: str, image_ids: list[str]) -> None:
        """The disk failed a write of a batch (full, read-only, I/O errors, an unwritable sidecar
        folder): not the images' fault. Their leases are given back without counting the claim,
        so that a full disk never exhausts ``store.max_attempts`` and quarantines them as a crash
        loop; no image is claimed for ``IO_RETRY_SECONDS`` (doubling up to
        ``IO_RETRY_MAX_SECONDS`` while the fault lasts, so a full disk costs no CPU), and the
        work resumes by itself once a batch gets through. Said once per kind of fault, with the
        path and the free space, and in ``status`` (``paused_reason``)."""
        kind = write_fault(exc) or "disk fault"
        text = f"{kind}: {describe_io_error(exc)}"
        if kind == "no write permission":
            space = "the service user needs write permission there"
        elif kind == "cannot write":
            space = "a folder the service user may write belongs there"
        else:
            space = ", ".join(dict.fromkeys(free_space(p) for p in (self.store.root, self.sidecar_dir)
                                            if p is not None))
        with self._lock:
            self._io_delay = min(IO_RETRY_MAX_SECONDS, max(IO_RETRY_SECONDS, 2 * self._io_delay))
            self._io_until = time.monotonic() + self._io_delay
            first = self._io_fault is None or not self._io_fault.startswith(text)
            self._io_fault = f"{text} ({space}); the images wait in the store and are retried"
            if image_ids:
                self._give_back.append((owner, list(image_ids)))
        (log.error if first else log.debug)(
            "%s (%s; %s); the images stay queued (not failed, not quarantined) and are retried in %.0f s",
            text, what, space, self._io_delay)
        self._return_leases()

    def _return_leases(self) -> None:
        """Give back the leases ``_io_failed`` noted, without counting their claims (as ``Store.release``
        does at shutdown); those the disk refuses now are tried again at the next claim."""
        with self._lock:
            pending, self._give_back = self._give_back, []
        left = []
        for owner, ids in pending:
            try:
                with self.store.transaction() as db:
                    db.executemany("UPDATE images SET lease_owner=NULL, lease_expires=NULL, "
                                   "attempts=max(attempts-1, 0) WHERE image_id=? AND lease_owner=? AND state=?",
                                   [(i, owner, RECEIVED) for i in ids])
            except Exception as exc:  # the disk still refuses: the leases expire, or the next try gives them back
                log.debug("cannot give back %d leases yet: %s", len(ids), exc)
                left.append((owner, ids))
        if left:
            with self._lock:
                self._give_back = left + self._give_back

    def _io_recovered(self) -> None:
        if self._io_fault is None:
            return
        with self._lock:
            fault, self._io_fault, self._io_delay = self._io_fault, None, 0.0
        if fault is not None:
            log.warning("annotations are written again (the fault was: %s)", fault)

    def _answer_lost(self) -> None:
        """Answer the waiters of lost rows that are settled by now (the worker that took one over
        may be in another process sharing the store, where its completion answers nobody here)."""
        with self._lock:
            if not self._lost:
                return
            lost = list(self._lost)
        for image_id in lost:
            row = self.store.get(image_id)
            if row is not None and row.state == RECEIVED:
                continue  # still being annotated (or its new lease expired too: claimed again)
            with self._lock:
                self._lost.discard(image_id)
            gone = None if row is not None else ImageNotFound(f"no image {image_id} in the store")
            self._resolve(image_id, row, gone)

    def _fail(self, owner: str, row: ImageRow, reason: str, data: bytes | None) -> None:
        """A stored image that cannot be decoded (or that crashed every worker that claimed it):
        a copy in quarantine with the reason, then failed in the store (which counts it as
        "failed" in the same transaction), its waiters answered.

        In that order, so that a failed image always has its quarantine copy: a kill between the
        two leaves the image leased, it is tried again when the lease expires, and the retry
        reuses the copy (``write_quarantine`` does not add ``name-1`` for the same bytes).
        """
        if data is not None:  # named by its id: the reason file says where it came from (the dropped file's name)
            write_quarantine(self.quarantine_dir, Path(row.image_id), f"{reason.rstrip()}\n(source: {row.source})",
                             data=data)
        try:
            self.store.fail(row.image_id, owner, reason)
        except LeaseLost as exc:
            log.warning("%s", exc)
            with self._lock:  # its waiters are the new owner's to answer
                self._lost.add(row.image_id)
            return
        self._resolve(row.image_id, error=ImageError(reason))

    # -- status and shutdown -------------------------------------------------------------
    def healthy(self) -> bool:
        """True while every worker and the finisher run, none has been inside one batch step for
        more than ``engine.stall_seconds``, and the store answers a cheap read.

        The systemd watchdog pings only while this holds, and ``serve`` mirrors it into gRPC
        health (the container's HEALTHCHECK), so a dead thread, a thread wedged on a hung disk or
        driver, or a wedged database gets the daemon restarted: its leases expire and the images
        it held are annotated by the next one.
        """
        threads = [*self._workers, self._finisher]
        if self._stop.is_set() or not all(t.is_alive() for t in threads):
            return False
        now = time.monotonic()
        stalled = {name for name, since in list(self._busy.items()) if now - since > self.stall_seconds}
        if stalled - self._stalled:  # said once per wedge, not at every check
            log.warning("health check: %s inside one batch step for over %g s (engine.stall_seconds); wedged",
                        ", ".join(sorted(stalled)), self.stall_seconds)
        self._stalled = stalled
        if stalled:
            return False
        try:
            self.store.counter("annotated")  # one indexed SELECT; no write, no fsync
        except (sqlite3.Error, AnnotatorError) as exc:
            log.warning("health check: the store does not answer: %s", exc)
            return False
        return True

    def status(self) -> DaemonStatus:
        counters = {name: self.store.counter(name) for name in ("annotated", "failed", "reloads")}  # reads only
        if self.drop is not None:
            waiting, oldest = self.drop.backlog()  # not counters: status_view shows them on a line of their own
            counters.update(drop_taken=self.drop.taken, drop_quarantined=self.drop.quarantined,
                            drop_backlog=waiting, drop_backlog_oldest_s=int(oldest))
        if self.latency is not None:
            p50, p99 = self.latency.percentiles("/annotator.v1.Annotator/Annotate")
            counters.update(annotate_p50_us=int(p50 * 1000), annotate_p99_us=int(p99 * 1000))
        engine, judge = self._loaded
        bundle = engine.bundle
        return DaemonStatus(
            providers=tuple(engine.active_providers), run_batch=engine.batch_size,
            bundle_id=bundle.id, bundle_path=self._bundle_path, thresholds=bundle.thresholds,
            judgement={"score_threshold": judge.threshold, "audit_fraction": judge.audit_fraction},
            queue_depths=self.store.counts(), counters=counters,
            uptime_seconds=time.monotonic() - self.started,
            paused_reason=self.store.paused_reason() or self._io_fault,
            notices=tuple(n for n in (self.drop.watch_lost if self.drop is not None else None, self._made_notice()) if n))

    def _made_notice(self) -> str | None:
        """The notice of a drop folder made at this start, until a first file came into it."""
        d = self.drop
        if self._drop_made is None or d is None or d.taken or d.quarantined or d.stored_already or d.backlog()[0]:
            return None
        return self._drop_made

    def stop_intake(self) -> None:
        """Stop taking images: the drop folder watcher stops, ``submit`` raises ``ShuttingDown``."""
        self._intake_closed = True
        if self.drop is not None:
            self.drop.stop()

    def close(self, timeout: float = 30.0) -> None:
        """Stop intake, let workers finish their batch, release leases, fail waiters, close the store.

        The store is closed only once the drop folder's thread has ended (``stop`` gives up
        waiting after 10 s, e.g. on a slow share): a take still running would meet a closed store.
        Should it outlive ``timeout`` too, the drop folder leaves that file for the next start."""
        self.stop_intake()
        if self.retention is not None:
            self.retention.stop(timeout)
        self._stop.set()
        self._wake.set()
        for t in self._workers:
            if t.is_alive():
                t.join(timeout)
        if self._finisher.is_alive():  # finish what the workers predicted before releasing leases
            self._finish_q.put(None)
            self._finisher.join(timeout)
        scope, self._blas_scope = getattr(self, "_blas_scope", None), None
        if scope is not None:
            scope.__exit__(None, None, None)
        if self.drop is not None and not self.drop.wait(timeout):
            log.warning("the drop folder is still taking a file after %.0f s; closing the store anyway (the file "
                        "stays in the drop folder for the next start)", timeout)
        released = sum(self.store.release(f"{self.owner}/w{i}") for i in range(len(self._workers)))
        with self._lock:
            pending = list(self._futures)
        for image_id in pending:
            self._resolve(image_id, error=ShuttingDown("the annotator stopped before this image was annotated"))
        self.store.close()
        log.info("daemon stopped (%d leases released)", released)
