"""Prometheus metrics of the daemon and the sync agent, served over HTTP on loopback.

One ``MetricsRecorder`` per process owns a private ``CollectorRegistry`` (so tests and several
recorders in one process never collide) and has one small method per event::

    metrics = MetricsRecorder()
    metrics.bundle(bundle.id, providers)            # annotator_bundle_info{bundle_id="...",providers="..."} 1
    metrics.watch_store(store)                      # images per state, read at every scrape
    port = start_metrics_server(metrics, "127.0.0.1", 9464)
    with metrics.time_inference("pose_main"):       # or observe_inference(role, seconds)
        session.run(...)
    metrics.upload(ok=True); metrics.retry(); metrics.review_merged(12)

Exposed series (all prefixed ``annotator_``):

- ``images{state}``: images per life-cycle state (``service.store.STATES``);
- ``queue_depth{queue}``: work waiting per queue: ``annotate`` (received), ``upload``
  (review_pending), ``review`` (uploaded), plus any the sync agent sets with ``queue_depth``;
- ``queue_oldest_age_seconds{queue}``: how long the oldest image of each of those three queues
  has been in the store (since it was received; 0 when the queue is empty): a count alone does
  not tell a stuck intake (the same 3 images for an hour) from a busy one;
- ``annotated_total``, ``failed_total``, ``reloads_total``: the store's own counters, which
  ``annotator status`` prints (persistent: they survive restarts and never go back);
- ``store_free_bytes`` and ``store_min_free_bytes``: free space on the store's file system and
  the floor below which intake pauses (alert before the pause, not at it);
- ``paused``: 1 while ingest is paused (disk below the floor) or the daemon waits out a disk fault, else 0;
- ``inference_seconds{role}``: histogram of one ``session.run`` per model role;
- ``annotate_seconds{intake}``: histogram of the time from an image's arrival in the store to its
  annotation, per intake path (``drop``, ``grpc``, ``other``): both paths, unlike the unary
  gRPC call latency that ``annotator status`` prints;
- ``uploads_total{result}`` (ok | failed), ``upload_retries_total``, ``reviews_merged_total``,
  ``reviews_refused`` (unreadable answers since the start and the last merge pass's refusals);
- ``bundle_info{bundle_id}``: the bundle in use (an Info metric; value 1);
- ``intake_rejected_total{reason}``: images refused at intake (invalid, too_large, store_full,
  store_unavailable, shutting_down, other; ``quarantined``: a drop-folder file set aside, which
  gRPC would answer ``invalid`` or ``too_large``), every reason present at 0 from the start;
- ``streams_total`` and ``streams_active``: ``AnnotateStream`` calls opened, and open now;
- ``grpc_calls_total{method,code}`` and ``grpc_call_seconds{method}``: every gRPC call the server
  answered (``method``: the RPC's short name, e.g. ``Annotate``; only the server's own methods);
- ``drop_taken_total``, ``drop_watch_lost`` (1 while the drop folder is found by its full walks
  only, e.g. past the inotify watch limit: new files wait up to a walk) and
  ``drop_walk_seconds`` (the last full walk's cost), once ``watch_daemon`` is called;
- ``drop_backlog_files`` and ``drop_backlog_oldest_age_seconds``: files seen in the drop folder
  and not taken yet (being written, settling, queued behind others, held by a pause, a move
  out retried) and how long the oldest has waited since the daemon first saw it
  (``DropFolder.backlog``: the watcher's own bookkeeping, no walk per scrape): a backlog that
  grows says the capture tools write faster than the daemon takes, an age that grows with a
  flat count says files are stuck. Files taken wait on in ``queue_depth{queue="annotate"}``.
  (The folder's refusals keep their own reason, ``intake_rejected_total{reason="quarantined"}``:
  what happened to the file, where to look; gRPC's ``invalid``/``too_large`` are what the
  caller was answered. Not renamed: a dashboard's series would end);
- ``bundle_created_timestamp_seconds``: when the bundle in use was built (its ``created``);
- ``sync_last_success_timestamp_seconds{task}`` and ``sync_task_errors_total{task}``: the sync
  agent's tasks (``task_pass``).

``MetricsRecorder(process="daemon")`` leaves out the sync agent's series (uploads, retries,
reviews merged and refused, its tasks), ``process="sync"`` the daemon's (inference, intake,
gRPC, the drop folder, the store's counters, free space, floor and pause): each endpoint shows
only what its process counts (an ``annotator_uploads_total 0`` for ever on the daemon's endpoint
read as "no upload ever worked"; the agent's said "not paused" while the daemon was). Images
per state and the queues are read from the one store by both. The default, ``"all"``, registers
everything.

Label values are bounded: a path, an image id or a client's camera never becomes a label
(``annotated`` maps an image's source to its intake path).
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from .store import Store

log = logging.getLogger(__name__)

PREFIX = "annotator"
# One model on these CPUs takes 15-65 ms; a GPU a few ms; a cold or overloaded box seconds.
INFERENCE_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
# From arrival to annotation: a fraction of a second on an idle box, minutes behind a backlog.
ANNOTATE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
# One gRPC call: a status in a millisecond, an Annotate in 0.1 s, a reload or a stream in minutes.
GRPC_BUCKETS = (0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0, 300.0)
# Which state's count is the depth of which queue.
QUEUE_OF_STATE = {"received": "annotate", "review_pending": "upload", "uploaded": "review"}
# The store's persistent counters exposed as Prometheus counters (``Store.counter``).
STORE_COUNTERS = {"annotated": "Images annotated (the store's counter: survives restarts)",
                  "failed": "Images failed for good and quarantined (the store's counter: survives restarts)",
                  "reloads": "Model bundle reloads (the store's counter: survives restarts)"}
INTAKES = ("drop", "grpc", "other")
REJECT_REASONS = ("invalid", "too_large", "store_full", "store_unavailable", "shutting_down", "quarantined", "other")
PROCESSES = ("all", "daemon", "sync")


def intake_of(source: str) -> str:
    """The ``intake`` label of an image's stored ``source``: ``drop:<name>`` -> ``drop``,
    ``grpc:<camera>`` -> ``grpc``, anything else ``other`` (never the name or the camera:
    one label value per file or camera would grow without bound)."""
    kind = str(source).partition(":")[0]
    return kind if kind in ("drop", "grpc") else "other"


def _epoch(iso: str) -> float | None:
    """``2026-12-02T02:17:29Z`` -> seconds since the epoch (UTC when no zone is given); None
    when it is not such a time."""
    try:
        at = datetime.fromisoformat(str(iso).replace("Z", "+00:00"))
    except ValueError:
        return None
    return (at if at.tzinfo is not None else at.replace(tzinfo=timezone.utc)).timestamp()


class _StateCollector(Collector):
    """Images per state, queue depths and ages, the store's counters, its free space and
    ``paused``: the last pushed values, or read from the watched store at scrape time (so they
    are never staler than the scrape)."""

    def __init__(self, daemon_side: bool = True) -> None:
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.queues: dict[str, int] = {}
        self.oldest: dict[str, float] = {}  # queue -> received_at of its oldest image (absent: empty)
        self.counters: dict[str, int] = {}
        self.free: tuple[int, int] | None = None  # (free bytes, floor)
        self.paused: bool | None = None
        self.now = 0.0  # the store's clock at the last refresh (queue ages are measured against it)
        self.store: "Store | None" = None
        self.faulted: Callable[[], bool] | None = None  # the daemon's disk fault (``watch_store``)
        # the store's counters, free space against the floor and the pause: the daemon's to show
        self.daemon_side = daemon_side

    def _refresh(self) -> None:
        store = self.store
        if store is None:
            return
        try:
            counts = store.counts()
            oldest = {}
            for state, queue in QUEUE_OF_STATE.items():
                if counts.get(state):  # one row of an index (images_by_state): cheap on a store of a year
                    rows, _ = store.list(state=state, limit=1)
                    if rows:
                        oldest[queue] = rows[0].received_at
            counters = {name: store.counter(name) for name in STORE_COUNTERS} if self.daemon_side else {}
            # The floor and the pause are the daemon's: the sync agent's Store has no floor (0),
            # and its endpoint said "not paused" while the daemon was.
            free = (int(store.free_bytes()), int(store.min_free_bytes)) if self.daemon_side else None
            paused = (store.paused_reason() is not None or (self.faulted is not None and self.faulted())) \
                if self.daemon_side else None
            now = float(store.clock())  # the clock received_at was read from
        except Exception as exc:  # a closed or locked store must not break the scrape
            log.warning("metrics: cannot read the store: %s", exc)
            return
        with self.lock:
            self.counts, self.oldest, self.counters, self.free, self.paused = dict(counts), oldest, counters, free, paused
            self.now = now

    def collect(self) -> Iterator["Metric"]:
        self._refresh()
        with self.lock:
            now = self.now if self.store is not None else time.time()
            counts, paused, oldest, counters, free = dict(self.counts), self.paused, dict(self.oldest), \
                dict(self.counters), self.free
            queues = {**{q: counts.get(s, 0) for s, q in QUEUE_OF_STATE.items() if s in counts}, **self.queues}
        images = GaugeMetricFamily(f"{PREFIX}_images", "Images per life-cycle state", labels=["state"])
        for state, n in counts.items():
            images.add_metric([state], n)
        depth = GaugeMetricFamily(f"{PREFIX}_queue_depth", "Images waiting per queue", labels=["queue"])
        for queue, n in queues.items():
            depth.add_metric([queue], n)
        yield images
        yield depth
        if counts:
            age = GaugeMetricFamily(f"{PREFIX}_queue_oldest_age_seconds",
                                    "Seconds since the oldest image waiting in the queue was received (0: empty)",
                                    labels=["queue"])
            for state, queue in QUEUE_OF_STATE.items():
                if state in counts:
                    age.add_metric([queue], max(0.0, now - oldest[queue]) if queue in oldest else 0.0)
            yield age
        for name, value in counters.items():
            yield CounterMetricFamily(f"{PREFIX}_{name}", STORE_COUNTERS[name], value=value)
        if free is not None:
            yield GaugeMetricFamily(f"{PREFIX}_store_free_bytes", "Free bytes on the store's file system",
                                    value=free[0])
            yield GaugeMetricFamily(f"{PREFIX}_store_min_free_bytes",
                                    "Free bytes below which intake pauses (store.min_free_mb)", value=free[1])
        if paused is not None:
            yield GaugeMetricFamily(f"{PREFIX}_paused", "1 while ingest is paused (e.g. disk below the floor)",
                                    value=1 if paused else 0)


class _DaemonCollector(Collector):
    """What the daemon's drop folder and bundle say, read at scrape time (``watch_daemon``)."""

    def __init__(self) -> None:
        self.daemon: Any = None

    def collect(self) -> Iterator["Metric"]:
        daemon = self.daemon
        if daemon is None:
            return
        drop = getattr(daemon, "drop", None)
        if drop is not None:
            yield CounterMetricFamily(f"{PREFIX}_drop_taken", "Files taken from the drop folder into the store "
                                      "since the start", value=int(drop.taken))
            yield GaugeMetricFamily(f"{PREFIX}_drop_watch_lost", "1 while the drop folder is not watched (found by "
                                    "its full walks only: the inotify watch limit, a removed folder...)",
                                    value=1 if drop.watch_lost else 0)
            yield GaugeMetricFamily(f"{PREFIX}_drop_walk_seconds", "CPU seconds of the drop folder's last full walk",
                                    value=float(drop.walk_seconds))
            waiting, oldest = drop.backlog()
            yield GaugeMetricFamily(f"{PREFIX}_drop_backlog_files", "Files seen in the drop folder and not taken yet "
                                    "(being written, settling, queued, held by a pause, retried)", value=waiting)
            yield GaugeMetricFamily(f"{PREFIX}_drop_backlog_oldest_age_seconds", "Seconds since the daemon first saw "
                                    "the oldest file still waiting in the drop folder (0: none waits)", value=oldest)
        try:
            created = _epoch(daemon.bundle.created)
        except Exception:  # noqa: BLE001 (a daemon closing: the scrape goes on without it)
            created = None
        if created is not None:
            yield GaugeMetricFamily(f"{PREFIX}_bundle_created_timestamp_seconds",
                                    "When the bundle in use was built (its created time), seconds since the epoch",
                                    value=created)


class MetricsRecorder:
    """The metrics of one process; every method is thread-safe and cheap (no I/O)."""

    def __init__(self, registry: CollectorRegistry | None = None, process: str = "all") -> None:
        """``process``: "daemon" or "sync" registers only that process's series, "all" both."""
        if process not in PROCESSES:
            raise ValueError(f"process: expected one of {', '.join(PROCESSES)}, got {process!r}")
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.process = process
        self.http_server: Any = None  # ``start_metrics_server``'s, until ``stop_metrics_server``
        daemon, sync = process in ("all", "daemon"), process in ("all", "sync")
        # A registry of None keeps a series out of the endpoint; its method still works.
        r, rd, rs = self.registry, self.registry if daemon else None, self.registry if sync else None
        self._state = _StateCollector(daemon_side=daemon)
        r.register(self._state)
        self._daemon = _DaemonCollector()
        r.register(self._daemon)
        self._inference = Histogram(f"{PREFIX}_inference_seconds", "Seconds per model run (one batch)",
                                    ["role"], buckets=INFERENCE_BUCKETS, registry=rd)
        self._annotate = Histogram(f"{PREFIX}_annotate_seconds", "Seconds from an image's arrival in the store "
                                   "to its annotation, per intake path", ["intake"], buckets=ANNOTATE_BUCKETS,
                                   registry=rd)
        self._uploads = Counter(f"{PREFIX}_uploads", "Uploads to the review backend", ["result"], registry=rs)
        self._retries = Counter(f"{PREFIX}_upload_retries", "Upload attempts retried after a retryable error",
                                registry=rs)
        self._merged = Counter(f"{PREFIX}_reviews_merged", "Reviewed labels merged into the dataset", registry=rs)
        self._refused = Gauge(f"{PREFIX}_reviews_refused", "Reviewed labels refused: answers the review backend could not read since the agent started, and the last merge pass's refusals (the sync log says why)",
                              registry=rs)
        self._task_ok = Gauge(f"{PREFIX}_sync_last_success_timestamp_seconds", "When each sync agent task last "
                              "finished a pass without an error, seconds since the epoch", ["task"], registry=rs)
        self._task_errors = Counter(f"{PREFIX}_sync_task_errors", "Sync agent task passes that ended in an error",
                                    ["task"], registry=rs)
        self._bundle = Info(f"{PREFIX}_bundle", "The model bundle in use", registry=rd)
        self._rejected = Counter(f"{PREFIX}_intake_rejected", "Images refused at intake", ["reason"], registry=rd)
        self._streams = Counter(f"{PREFIX}_streams", "AnnotateStream calls opened", registry=rd)
        self._streams_active = Gauge(f"{PREFIX}_streams_active", "AnnotateStream calls open now", registry=rd)
        self._grpc_calls = Counter(f"{PREFIX}_grpc_calls", "gRPC calls answered, per method and status code",
                                   ["method", "code"], registry=rd)
        self._grpc_seconds = Histogram(f"{PREFIX}_grpc_call_seconds", "Seconds per gRPC call (a stream: while open)",
                                       ["method"], buckets=GRPC_BUCKETS, registry=rd)
        self._retention_files = Counter(f"{PREFIX}_retention_removed_files", "Files removed by retention",
                                        ["rule"], registry=rd)
        self._retention_bytes = Counter(f"{PREFIX}_retention_removed_bytes", "Bytes freed by retention",
                                        ["rule"], registry=rd)
        # Present at 0 from the start, so rate() and increase() work at once (and an alert on a
        # reason that never happened yet is not "no data").
        for rule in ("processed", "auto_images", "quarantine"):
            self._retention_files.labels(rule=rule)
            self._retention_bytes.labels(rule=rule)
        for result in ("ok", "failed"):
            self._uploads.labels(result=result)
        for reason in REJECT_REASONS:
            self._rejected.labels(reason=reason)
        for intake in INTAKES:
            self._annotate.labels(intake=intake)

    # -- the daemon ----------------------------------------------------------------------
    def observe_inference(self, role: str, seconds: float) -> None:
        """One ``session.run`` of the model ``role`` (head, pose_main, pose_visible) took ``seconds``."""
        self._inference.labels(role=role).observe(max(0.0, float(seconds)))

    @contextlib.contextmanager
    def time_inference(self, role: str) -> Iterator[None]:
        """``with metrics.time_inference("head"): session.run(...)`` (observed also on error)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.observe_inference(role, time.perf_counter() - start)

    def annotated(self, source: str, seconds: float) -> None:
        """An image whose stored ``source`` is ``source`` was annotated ``seconds`` after it
        arrived in the store (``time.time() - row.received_at``); the label is its intake path
        (``intake_of``), never the source itself."""
        self._annotate.labels(intake=intake_of(source)).observe(max(0.0, float(seconds)))

    def grpc_call(self, method: str, code: str, seconds: float) -> None:
        """A gRPC call of ``method`` (the full ``/package.Service/Method`` name: labelled by its
        last part) ended with status ``code`` (e.g. "OK") after ``seconds``."""
        name = str(method).rpartition("/")[2] or str(method)
        self._grpc_calls.labels(method=name, code=str(code)).inc()
        self._grpc_seconds.labels(method=name).observe(max(0.0, float(seconds)))

    def image_state_counts(self, counts: Mapping[str, int]) -> None:
        """Set images per state (``store.counts()``) and the queue depths derived from them."""
        with self._state.lock:
            self._state.counts = {str(k): int(v) for k, v in counts.items()}

    def queue_depth(self, queue: str, depth: int) -> None:
        """Depth of a queue not derived from image states (e.g. the sync agent's merge backlog)."""
        with self._state.lock:
            self._state.queues[str(queue)] = int(depth)

    def paused(self, is_paused: bool) -> None:
        with self._state.lock:
            self._state.paused = bool(is_paused)

    def bundle(self, bundle_id: str, providers: Sequence[str] = ()) -> None:
        """The bundle now in use and the onnxruntime providers its sessions really got (call
        again after a reload; the old labels disappear)."""
        self._bundle.info({"bundle_id": str(bundle_id), "providers": ",".join(providers)})

    def rejected(self, reason: str) -> None:
        """An image was refused at intake (``reason``: invalid, too_large, store_full, shutting_down...)."""
        self._rejected.labels(reason=str(reason)).inc()

    @contextlib.contextmanager
    def stream(self) -> Iterator[None]:
        """``with metrics.stream(): ...`` around one ``AnnotateStream`` call."""
        self._streams.inc()
        self._streams_active.inc()
        try:
            yield
        finally:
            self._streams_active.dec()

    def retention_removed(self, rule: str, files: int, size: int) -> None:
        """A retention pass removed ``files`` files of ``size`` bytes under ``rule`` (processed,
        auto_images, quarantine): ``service.retention``."""
        self._retention_files.labels(rule=rule).inc(max(0, int(files)))
        self._retention_bytes.labels(rule=rule).inc(max(0, int(size)))

    def watch_store(self, store: "Store", faulted: Callable[[], bool] | None = None) -> None:
        """Refresh images per state, queue depths and ages, the store's counters, its free space
        and ``paused`` from ``store`` at every scrape; ``faulted()`` True (the daemon's disk
        fault: nothing is claimed) counts as paused too."""
        self._state.store, self._state.faulted = store, faulted

    def watch_daemon(self, daemon: Any) -> None:
        """Read the daemon's drop folder (files taken and waiting, whether it is watched, its last walk) and
        the ``created`` time of its bundle at every scrape (a reload is followed)."""
        self._daemon.daemon = daemon

    # -- the sync agent ------------------------------------------------------------------
    def upload(self, ok: bool) -> None:
        """One upload to the review backend finished (``ok``) or failed for good."""
        self._uploads.labels(result="ok" if ok else "failed").inc()

    def retry(self) -> None:
        """An upload attempt failed with a retryable error and will be tried again."""
        self._retries.inc()

    def review_merged(self, n: int = 1) -> None:
        """``n`` reviewed labels were merged into the dataset."""
        if n < 0:
            raise ValueError(f"n: expected >= 0, got {n}")
        self._merged.inc(n)

    def task_pass(self, task: str, ok: bool) -> None:
        """A pass of the sync agent's ``task`` (its name: a fixed, small set) ended: without an
        error (``ok``: its last-success time is now) or with one (its error count goes up)."""
        if ok:
            self._task_ok.labels(task=str(task)).set(time.time())
        else:
            self._task_errors.labels(task=str(task)).inc()

    def reviews_refused(self, n: int) -> None:
        """How many reviewed labels are refused: the answers the backend could not read since the
        agent started, and those the last merge pass refused (a point off the image, two reviews
        of one image that differ); each stays out of the dataset."""
        self._refused.set(max(0, int(n)))


def start_metrics_server(recorder: MetricsRecorder, host: str = "127.0.0.1", port: int = 9464) -> int:
    """Serve ``recorder``'s metrics at ``http://host:port/metrics`` from a daemon thread.

    Loopback by default: metrics reveal counts and the bundle id, so exposing them to the
    network is a deliberate choice (``host="0.0.0.0"``). ``port`` 0 picks a free port; the bound
    port is returned. The server runs on a daemon thread until ``stop_metrics_server(recorder)``
    (or the end of the process).
    """
    server, _thread = start_http_server(port, addr=host, registry=recorder.registry)
    recorder.http_server = server
    bound = int(server.server_port)
    log.info("Prometheus metrics on http://%s:%d/metrics", host, bound)
    return bound


def stop_metrics_server(recorder: MetricsRecorder) -> None:
    """Stop serving ``recorder``'s metrics and free the port (``serve`` does it when it returns:
    a second ``serve`` in the same process found the port taken, and a stopped daemon's
    endpoint went on answering with the last values it had)."""
    server, recorder.http_server = recorder.http_server, None
    if server is not None:
        server.shutdown()
        server.server_close()
