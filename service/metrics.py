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
- ``paused``: 1 while ingest is paused (disk below the floor) or the daemon waits out a disk fault, else 0;
- ``inference_seconds{role}``: histogram of one ``session.run`` per model role;
- ``uploads_total{result}`` (ok | failed), ``upload_retries_total``, ``reviews_merged_total``,
  ``reviews_refused`` (unreadable answers since the start and the last merge pass's refusals);
- ``bundle_info{bundle_id}``: the bundle in use (an Info metric; value 1);
- ``intake_rejected_total{reason}``: images refused at intake (invalid, too_large, store_full,
  shutting_down, other);
- ``streams_total`` and ``streams_active``: ``AnnotateStream`` calls opened, and open now.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from .store import Store

log = logging.getLogger(__name__)

PREFIX = "annotator"
# One model on these CPUs takes 15-65 ms; a GPU a few ms; a cold or overloaded box seconds.
INFERENCE_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
# Which state's count is the depth of which queue.
QUEUE_OF_STATE = {"received": "annotate", "review_pending": "upload", "uploaded": "review"}


class _StateCollector(Collector):
    """Images per state, queue depths and ``paused``: the last pushed values, or read from the
    watched store at scrape time (so they are never staler than the scrape)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.queues: dict[str, int] = {}
        self.paused: bool | None = None
        self.store: "Store | None" = None
        self.faulted: Callable[[], bool] | None = None  # the daemon's disk fault (``watch_store``)

    def _refresh(self) -> None:
        store = self.store
        if store is None:
            return
        try:
            counts = store.counts()
            paused = store.paused_reason() is not None or (self.faulted is not None and self.faulted())
        except Exception as exc:  # a closed or locked store must not break the scrape
            log.warning("metrics: cannot read the store: %s", exc)
            return
        with self.lock:
            self.counts, self.paused = dict(counts), paused

    def collect(self) -> Iterator["Metric"]:
        self._refresh()
        with self.lock:
            counts, paused = dict(self.counts), self.paused
            queues = {**{q: counts.get(s, 0) for s, q in QUEUE_OF_STATE.items() if s in counts}, **self.queues}
        images = GaugeMetricFamily(f"{PREFIX}_images", "Images per life-cycle state", labels=["state"])
        for state, n in counts.items():
            images.add_metric([state], n)
        depth = GaugeMetricFamily(f"{PREFIX}_queue_depth", "Images waiting per queue", labels=["queue"])
        for queue, n in queues.items():
            depth.add_metric([queue], n)
        yield images
        yield depth
        if paused is not None:
            yield GaugeMetricFamily(f"{PREFIX}_paused", "1 while ingest is paused (e.g. disk below the floor)",
                                    value=1 if paused else 0)


class MetricsRecorder:
    """The metrics of one process; every method is thread-safe and cheap (no I/O)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self._state = _StateCollector()
        r.register(self._state)
        self._inference = Histogram(f"{PREFIX}_inference_seconds", "Seconds per model run (one batch)",
                                    ["role"], buckets=INFERENCE_BUCKETS, registry=r)
        self._uploads = Counter(f"{PREFIX}_uploads", "Uploads to the review backend", ["result"], registry=r)
        self._retries = Counter(f"{PREFIX}_upload_retries", "Upload attempts retried after a retryable error",
                                registry=r)
        self._merged = Counter(f"{PREFIX}_reviews_merged", "Reviewed labels merged into the dataset", registry=r)
        self._refused = Gauge(f"{PREFIX}_reviews_refused", "Reviewed labels refused: answers the review backend could not read since the agent started, and the last merge pass's refusals (the sync log says why)",
                              registry=r)
        self._bundle = Info(f"{PREFIX}_bundle", "The model bundle in use", registry=r)
        self._rejected = Counter(f"{PREFIX}_intake_rejected", "Images refused at intake", ["reason"], registry=r)
        self._streams = Counter(f"{PREFIX}_streams", "AnnotateStream calls opened", registry=r)
        self._streams_active = Gauge(f"{PREFIX}_streams_active", "AnnotateStream calls open now", registry=r)
        self._retention_files = Counter(f"{PREFIX}_retention_removed_files", "Files removed by retention",
                                        ["rule"], registry=r)
        self._retention_bytes = Counter(f"{PREFIX}_retention_removed_bytes", "Bytes freed by retention",
                                        ["rule"], registry=r)
        for rule in ("processed", "auto_images", "quarantine"):
            self._retention_files.labels(rule=rule)
            self._retention_bytes.labels(rule=rule)
        for result in ("ok", "failed"):  # present at 0 from the start, so rate() works at once
            self._uploads.labels(result=result)

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
        """Refresh images per state, queue depths and ``paused`` from ``store`` at every scrape;
        ``faulted()`` True (the daemon's disk fault: nothing is claimed) counts as paused too."""
        self._state.store, self._state.faulted = store, faulted

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

    def reviews_refused(self, n: int) -> None:
        """How many reviewed labels are refused: the answers the backend could not read since the
        agent started, and those the last merge pass refused (a point off the image, two reviews
        of one image that differ); each stays out of the dataset."""
        self._refused.set(max(0, int(n)))


def start_metrics_server(recorder: MetricsRecorder, host: str = "127.0.0.1", port: int = 9464) -> int:
    """Serve ``recorder``'s metrics at ``http://host:port/metrics`` from a daemon thread.

    Loopback by default: metrics reveal counts and the bundle id, so exposing them to the
    network is a deliberate choice (``host="0.0.0.0"``). ``port`` 0 picks a free port; the bound
    port is returned. The server lives as long as the process (it is a daemon thread).
    """
    server, _thread = start_http_server(port, addr=host, registry=recorder.registry)
    bound = int(server.server_port)
    log.info("Prometheus metrics on http://%s:%d/metrics", host, bound)
    return bound
