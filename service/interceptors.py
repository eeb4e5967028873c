"""gRPC server interceptors: access logging with latency, and an optional bearer token check.

``AccessLogInterceptor`` logs one line per call (method, status code, milliseconds, peer, and
for a call that failed the message the client got) and keeps per-method latency samples of the
calls that succeeded, which ``GetStatus`` and the bench read (a refused image, answered in 0.1
ms, is no annotation: 2 refusals and 1 annotation of 140 ms made ``annotate_p50_us`` 489). With
a metrics recorder every call is also counted per method and status code. ``TokenInterceptor``
refuses calls without ``authorization: Bearer <token>`` metadata (health checks are exempt, so
an orchestrator can probe without the secret).
"""
from __future__ import annotations

import collections
import hmac
import logging
import threading
import time
from typing import Any, Callable, Iterator

import grpc

log = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"
_SAMPLES = 1024
LOGGED_DETAILS = 200  # characters of a failed call's message in its access-log line


def _code_of(context: grpc.ServicerContext, exc: BaseException | None) -> str:
    """The status code name a finished call ended with (OK when none was set)."""
    code = context.code() if hasattr(context, "code") else None
    if code is None:
        return "UNKNOWN" if exc is not None else "OK"
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


def _details_of(context: grpc.ServicerContext) -> str:
    """The message a failed call was answered with (cut short), or ""."""
    try:
        details = context.details() if hasattr(context, "details") else None
    except Exception:  # noqa: BLE001 (an older grpc: the log line goes without it)
        return ""
    if isinstance(details, bytes):
        details = details.decode("utf-8", "replace")
    text = " ".join(str(details or "").split())
    return text if len(text) <= LOGGED_DETAILS else text[:LOGGED_DETAILS] + "..."


class LatencyStats:
    """The last ``_SAMPLES`` latencies per method, in milliseconds (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._samples: dict[str, collections.deque[float]] = {}

    def add(self, method: str, ms: float) -> None:
        with self._lock:
            self._samples.setdefault(method, collections.deque(maxlen=_SAMPLES)).append(ms)

    def percentiles(self, method: str, qs: tuple[float, ...] = (50.0, 99.0)) -> tuple[float, ...]:
        """Nearest-rank percentiles of the kept samples; zeros when there are none."""
        with self._lock:
            data = sorted(self._samples.get(method, ()))
        if not data:
            return tuple(0.0 for _ in qs)
        return tuple(data[min(len(data) - 1, max(0, int(round(q / 100.0 * len(data) + 0.5)) - 1))] for q in qs)


class AccessLogInterceptor(grpc.ServerInterceptor):
    """Logs every call with its status and latency and records the latency of a call that
    succeeded in ``stats``; ``metrics`` (a ``service.metrics.MetricsRecorder``, or None) counts
    every call per method and status code."""

    def __init__(self, stats: LatencyStats | None = None, metrics: Any = None,
                 known_methods: "frozenset[str] | None" = None) -> None:
        """``known_methods``: the server's own method names; a call to another name (answered
        UNAUTHENTICATED by ``TokenInterceptor`` whatever its name) is counted as ``other``."""
        self.stats = stats or LatencyStats()
        self.metrics = metrics
        self.known_methods = known_methods

    def intercept_service(self, continuation: Callable[[Any], Any], handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                self._wrap_stream(method, handler.stream_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(method, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler  # client streaming: not used by this service

    def _finish(self, method: str, context: grpc.ServicerContext, start: float, exc: BaseException | None) -> None:
        ms = (time.perf_counter() - start) * 1000.0
        code = _code_of(context, exc)
        if code == "OK":
            self.stats.add(method, ms)
        if self.metrics is not None:
            known = self.known_methods is None or method in self.known_methods
            try:
                self.metrics.grpc_call(method if known else "other", code, ms / 1000.0)
            except Exception:  # noqa: BLE001 (a metric must never fail a call)
                log.debug("metrics: cannot count a gRPC call", exc_info=True)
        level = logging.DEBUG if method.startswith(HEALTH_PREFIX) else logging.INFO
        details = _details_of(context) if code != "OK" else ""
        log.log(level, "%s %s %.1f ms peer=%s%s", method, code, ms, context.peer(), f": {details}" if details else "")

    def _wrap_unary(self, method: str, behaviour: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Any:
            start = time.perf_counter()
            failure: BaseException | None = None
            try:
                return behaviour(request, context)
            except BaseException as exc:  # re-raised: only observed for the log line
                failure = exc
                raise
            finally:
                self._finish(method, context, start, failure)
        return call

    def _wrap_stream(self, method: str, behaviour: Callable[[Any, grpc.ServicerContext], Iterator[Any]]) -> Callable[..., Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            start = time.perf_counter()
            failure: BaseException | None = None
            try:
                yield from behaviour(request, context)
            except BaseException as exc:  # re-raised: only observed for the log line
                failure = exc
                raise
            finally:
                self._finish(method, context, start, failure)
        return call


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses calls that lack ``authorization: Bearer <token>`` with UNAUTHENTICATED."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("TokenInterceptor: token must not be empty")
        self._expected = f"Bearer {token}".encode()

        def deny(request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token (metadata 'authorization')")

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.stream_stream_rpc_method_handler(deny)

    def intercept_service(self, continuation: Callable[[Any], Any], handler_call_details: Any) -> Any:
        method: str = handler_call_details.method
        if method.startswith(HEALTH_PREFIX):
            return continuation(handler_call_details)
        got = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(str(got).encode(), self._expected):
            return continuation(handler_call_details)
        return self._deny_stream if method.endswith("Stream") else self._deny_unary
