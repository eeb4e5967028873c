"""The gRPC edge of the daemon: servicer, error mapping, ``create_server`` and ``serve``.

Protobuf types live only here (and in ``service.client``); the servicer turns requests into
calls on a ``service.daemon.Daemon`` and store rows back into ``annotator.v1.Annotation``.
Errors are mapped to status codes by ``status_for`` and sent with ``context.abort(code,
message)``; tracebacks stay in the server log.

``create_server(config, daemon) -> (server, port)`` builds and starts nothing but the server
(health checking, reflection, the access-log interceptor, message size limits, TLS when
configured); ``serve(config)`` runs the whole appliance in the foreground until SIGTERM/SIGINT,
with the Prometheus endpoint (``[metrics] listen``) and systemd's notify protocol
(READY/STATUS/WATCHDOG/STOPPING when ``$NOTIFY_SOCKET`` is set; ``service.systemd``).

Every call runs on a thread of one pool, and a call waiting for its annotation holds its thread:
the servicer bounds both kinds of waiting call on the whole server (``server.max_concurrent_streams``
open ``AnnotateStream`` calls, ``MAX_WAITING_ANNOTATE`` unary ``Annotate`` calls) and the pool has
``SPARE_THREADS`` more, so health checks, ``GetStatus`` and ``ReloadModels`` always find a thread.
A call beyond a bound is answered at once: a unary ``Annotate`` with UNAVAILABLE "server busy"
(and the ``BUSY_METADATA`` trailer), which ``service.client`` retries until its timeout; a stream
with RESOURCE_EXHAUSTED. ``ReloadModels`` runs one at a time: a reload asked for while another
runs is answered at once with UNAVAILABLE "a reload is in progress" and the same trailer, so the
client's retries wait for their turn without holding a thread (the daemon's reload lock made
it wait on the server, a spare thread held for the whole load of a bundle).
``max_concurrent_streams`` is not sent as HTTP/2's per-connection
SETTINGS_MAX_CONCURRENT_STREAMS: gRPC refused calls beyond it with RST_STREAM (REFUSED_STREAM,
UNAVAILABLE) instead of queueing them, health checks sharing the connection included.
"""
from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import signal
import sqlite3
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos.annotator.v1 import annotator_pb2 as pb
from protos.annotator.v1 import annotator_pb2_grpc as pb_grpc

from .client import BUSY_METADATA
from .convert import annotation_to_proto, status_to_proto, timestamp_to_epoch
from .errors import (AnnotatorError, BundleError, ConfigError, ImageError, ImageNotFound, ImageTooLarge, PathNotAllowed,
                     ShuttingDown, StoreFull, StoreUnavailable, is_io_fault, store_write_error)
from .interceptors import AccessLogInterceptor, LatencyStats, TokenInterceptor
from .store import DECISIONS, STATES, image_id_of, is_image_id, list_cursor

if TYPE_CHECKING:
    from .config import Config
    from .daemon import Daemon

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Annotator"].full_name
STREAM_IN_FLIGHT = 32  # images of one stream submitted but not yet answered (a few claim batches)
MAX_WAITING_ANNOTATE = 32  # unary Annotate calls waiting for their annotation, on the whole server
SPARE_THREADS = 8  # pool threads beyond the bounded calls: health, status, reload, get, list
MAX_PAGE_SIZE = 1000
# A ListAnnotations page ends before this many bytes of annotations (with a next_page_token),
# under gRPC's default 4 MiB receive limit: 1,000 annotations of 10 persons each are 7 MiB, and
# one of MAX_DET persons about 220 KB, so a raw client with default options was refused the page.
MAX_PAGE_BYTES = 3 * 1024 * 1024
SHOWN_CHARS = 80  # of a client's value quoted back in an error message
_PAGE_TOKEN = re.compile(r"^[0-9.eE+-]+\|[0-9a-f]{64}$")  # service.store.Store.list's cursor


def _shown(value: str) -> str:
    """A client's value as an error message quotes it: its repr, cut to ``SHOWN_CHARS``.

    The message travels in the grpc-message trailer, which clients refuse beyond a few KiB: a
    3 MB image id quoted whole turned NOT_FOUND into the client's own RESOURCE_EXHAUSTED
    ("received metadata size exceeds hard limit"), and filled the server log."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({len(value)} characters)"


def _valid_page_token(token: str) -> bool:
    """``Store.list``'s cursor: "<received_at>|<image id>" with a number the store can read."""
    if not _PAGE_TOKEN.match(token):
        return False
    try:
        float(token.partition("|")[0])
    except ValueError:
        return False
    return True


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message for an exception raised while serving a call.

    Mapped by type only (first match in the table wins, so subclasses come before their bases):
    the wording of a message never decides its code. A full disk (``ENOSPC`` while the store
    writes the image, SQLite's ``SQLITE_FULL``) is the store being full, not a server fault: it
    is RESOURCE_EXHAUSTED like ``StoreFull``, so clients back off and retry later.
    """
    if isinstance(exc, (OSError, sqlite3.OperationalError)) and is_io_fault(exc):  # full, EIO, EROFS...: the disk's fault
        exc = store_write_error(exc)
    table: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
        (ImageTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (ImageError, grpc.StatusCode.INVALID_ARGUMENT),
        (StoreFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (StoreUnavailable, grpc.StatusCode.UNAVAILABLE),
        (ImageNotFound, grpc.StatusCode.NOT_FOUND),
        (PathNotAllowed, grpc.StatusCode.PERMISSION_DENIED),
        (BundleError, grpc.StatusCode.FAILED_PRECONDITION),
        (ShuttingDown, grpc.StatusCode.UNAVAILABLE),
        (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
        (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
        (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
        (AnnotatorError, grpc.StatusCode.INTERNAL),
    )
    if isinstance(exc, PermissionError):  # a bundle or store file this service user may not read: a setting to fix
        return (grpc.StatusCode.FAILED_PRECONDITION,
                f"the annotator may not access {exc.filename or 'a file it needs'} ({exc.strerror or exc}); "
                "give its service user access")
    for kind, code in table:
        if isinstance(exc, kind):
            text = str(exc) or kind.__name__
            if isinstance(exc, TimeoutError):
                text = f"not annotated within the deadline: {text}"
            return code, text
    return grpc.StatusCode.INTERNAL, "internal error (details are in the server log)"


def _abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    code, message = status_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.error("internal error while serving a call", exc_info=exc)
    elif isinstance(exc, PermissionError):  # the operator's to fix: said here too, not only to the client
        log.warning("%s", message)
    context.abort(code, message)


def allowed_bundle_path(requested: str, configured: "str | Path") -> Path:
    """The bundle folder a client names in ``ReloadModels``, if it lies in the bundles folder.

    The bundles folder is the parent of the configured ``engine.bundle`` (e.g. the sync agent's
    models root, holding ``current``, ``previous`` and ``bundles/<id>``). A relative name is
    taken inside it; ``..``, an absolute path elsewhere or a symlink pointing out of it raise
    ``PathNotAllowed``, so a client can never make the daemon read another folder.
    """
    base = Path(configured).absolute().parent
    if "\x00" in requested:
        raise ValueError(f"bundle_path: {_shown(requested)} contains a NUL character; name a bundle folder")
    path = Path(requested)
    path = path if path.is_absolute() else base / path
    lexical = Path(os.path.normpath(path))
    if not lexical.is_relative_to(base) or not path.resolve().is_relative_to(base.resolve()):
        raise PathNotAllowed(f"bundle_path: {_shown(requested)} is outside the bundles folder {base} "
                             "(the folder of engine.bundle); name a bundle inside it")
    return lexical


def _client_meta(request: pb.AnnotateRequest, context: grpc.ServicerContext) -> tuple[str, dict[str, Any]]:
    """(source, meta) for the store from the request's client metadata."""
    m = request.metadata
    meta: dict[str, Any] = {"peer": context.peer()}
    if m.camera_id:
        meta["camera"] = m.camera_id
    if m.HasField("capture_time"):
        meta["capture_time"] = timestamp_to_epoch(m.capture_time)
    if m.session:
        meta["session"] = m.session
    if m.request_id:
        meta["request_id"] = m.request_id
    if m.labels:
        meta["labels"] = dict(m.labels)
    return f"grpc:{m.camera_id or 'unknown'}", meta


class AnnotatorServicer(pb_grpc.AnnotatorServicer):
    """``annotator.v1.Annotator`` on top of a ``Daemon``."""

    def __init__(self, daemon: "Daemon", stats: LatencyStats | None = None, default_timeout: float = 60.0,
                 max_streams: int | None = None, max_waiting: int | None = None) -> None:
        """``max_streams``: open ``AnnotateStream`` calls on the whole server; ``max_waiting``:
        unary ``Annotate`` calls waiting for their annotation (None: no limit). Each such call
        holds a pool thread until it ends, and gRPC queues calls without limit once every thread
        is taken: a few clients with many calls each would take them all, and health checks,
        status and reload calls would wait until their deadline."""
        self.daemon = daemon
        self.stats = stats
        self.default_timeout = default_timeout
        self.max_streams = max_streams
        self.max_waiting = max_waiting
        self._streams = threading.BoundedSemaphore(max_streams) if max_streams else None
        self._waiting = threading.BoundedSemaphore(max_waiting) if max_waiting else None
        # One reload at a time on the whole server, taken without waiting (``ReloadModels``), and
        # what the one running loads: (the bundle asked for, monotonic start) for the busy answer.
        self._reload = threading.Lock()
        self._reloading: tuple[str, float] | None = None

    def _timeout(self, context: grpc.ServicerContext) -> float:
        remaining = context.time_remaining()
        return self.default_timeout if remaining is None else max(0.0, min(remaining, self.default_timeout))

    def Annotate(self, request: pb.AnnotateRequest, context: grpc.ServicerContext) -> pb.Annotation:
        """Annotate one image and wait for it; beyond ``max_waiting`` such calls, "busy" at once.

        Busy is UNAVAILABLE (transient: retry with backoff, as gRPC's status guide says), not
        RESOURCE_EXHAUSTED, which this server uses for what a retry does not fix soon (an image
        over the limits, a full disk)."""
        if self._waiting is not None and not self._waiting.acquire(blocking=False):
            context.set_trailing_metadata(BUSY_METADATA)
            context.abort(grpc.StatusCode.UNAVAILABLE,
                          f"server busy: {self.max_waiting} Annotate calls are already waiting for their annotation; "
                          "retry later with backoff (or use AnnotateStream)")
        try:
            source, meta = _client_meta(request, context)
            try:
                row = self._wait(self.daemon.submit(request.image, source, meta), request.image, context)
            except Exception as exc:  # every failure becomes a status, never a traceback
                _abort(context, exc)
                raise AssertionError("unreachable: context.abort raises") from exc
            if row is None:  # nobody reads this answer; the access log shows why the call ended
                context.abort(grpc.StatusCode.CANCELLED, "the call ended before its image was annotated; it stays queued")
            return annotation_to_proto(row)
        finally:
            if self._waiting is not None:
                self._waiting.release()

    def _wait(self, fut: "futures.Future[Any]", data: bytes, context: grpc.ServicerContext) -> Any:
        """The row ``fut`` resolves to, waited for only while the call lasts (None once it ended).

        Until the deadline (at most ``default_timeout``: ``TimeoutError``), or until the call ends
        without us: a client that cancels (or whose deadline passed) is gone, and its call
        releases its ``max_waiting`` slot now. It held the slot until its image was annotated or
        ``default_timeout`` passed, so 32 cancelled calls made the server answer "busy" to
        everyone for up to a minute. The image stays queued and is annotated once either way.
        """
        ended: futures.Future[None] = futures.Future()
        if not context.add_callback(lambda: ended.set_result(None)):
            ended.set_result(None)  # the call had ended already
        timeout = self._timeout(context)
        futures.wait([fut, ended], timeout=timeout, return_when=futures.FIRST_COMPLETED)
        if fut.done():
            return fut.result()
        if ended.done():
            return None
        raise TimeoutError(f"image {image_id_of(data)[:12]} is queued but not annotated after {timeout:.1f} s")

    def AnnotateStream(self, request_iterator: Iterator[pb.AnnotateRequest],
                       context: grpc.ServicerContext) -> Iterator[pb.AnnotateStreamResponse]:
        """Submit requests as they arrive, at most ``STREAM_IN_FLIGHT`` unanswered at a time.

        A reader thread takes the next request only when a slot is free, so a fast client is
        held back by gRPC flow control instead of filling the server's memory.
        """
        if self._streams is not None and not self._streams.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{self.max_streams} streams are open on this server (server.max_concurrent_streams); "
                          "close one or retry later")
        metrics = self.daemon.metrics
        try:
            with metrics.stream() if metrics is not None else contextlib.nullcontext():
                yield from self._stream(request_iterator, context)
        finally:
            if self._streams is not None:
                self._streams.release()

    def _stream(self, request_iterator: Iterator[pb.AnnotateRequest],
                context: grpc.ServicerContext) -> Iterator[pb.AnnotateStreamResponse]:
        slots = threading.Semaphore(STREAM_IN_FLIGHT)
        results: queue.Queue[Any] = queue.Queue()
        read = [0]
        done_reading = object()

        def reader() -> None:
            try:
                for req in request_iterator:
                    while not slots.acquire(timeout=0.5):
                        if not context.is_active():
                            return
                    read[0] += 1
                    rid = req.metadata.request_id
                    try:
                        source, meta = _client_meta(req, context)
                        fut = self.daemon.submit(req.image, source, meta)
                    except Exception as exc:  # reported per image; the stream goes on
                        results.put((rid, None, exc))
                        continue
                    fut.add_done_callback(lambda f, rid=rid: results.put((rid, f, None)))
            except grpc.RpcError:
                log.debug("stream request iterator ended by the client")
            finally:
                results.put(done_reading)

        threading.Thread(target=reader, name="stream-reader", daemon=True).start()
        total: int | None = None
        answered = 0
        while total is None or answered < total:
            try:
                item = results.get(timeout=0.5)
            except queue.Empty:
                if not context.is_active():
                    return
                continue
            if item is done_reading:
                total = read[0]
                continue
            rid, fut, exc = item
            slots.release()
            answered += 1
            yield self._stream_response(rid, fut, exc)

    @staticmethod
    def _stream_response(rid: str, fut: futures.Future[Any] | None, exc: BaseException | None) -> pb.AnnotateStreamResponse:
        if fut is not None:
            exc = fut.exception()
        if exc is not None:
            code, message = status_for(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.error("internal error in a stream", exc_info=exc)
            return pb.AnnotateStreamResponse(request_id=rid, error=pb.Error(code=code.value[0], message=message))
        assert fut is not None
        return pb.AnnotateStreamResponse(request_id=rid, annotation=annotation_to_proto(fut.result()))

    def GetAnnotation(self, request: pb.GetAnnotationRequest, context: grpc.ServicerContext) -> pb.Annotation:
        if not is_image_id(request.image_id):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"image_id: expected the 64 lower-case hex digits of the image's sha256 (an "
                          f"Annotation's image_id), got {_shown(request.image_id)}")
        row = None
        try:
            row = self.daemon.store.get(request.image_id)
        except Exception as exc:  # every failure becomes a status
            _abort(context, exc)
        if row is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no image with id {request.image_id}")
        return annotation_to_proto(row)

    def ListAnnotations(self, request: pb.ListAnnotationsRequest,
                        context: grpc.ServicerContext) -> pb.ListAnnotationsResponse:
        if request.page_token and not _valid_page_token(request.page_token):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "page_token: not a token from a previous ListAnnotations answer (malformed cursor)")
        # A misspelt filter matched nothing and read as "no such images".
        if request.state and request.state not in STATES:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"state: expected one of {', '.join(STATES)} (or empty), got {_shown(request.state)}")
        if request.decision and request.decision not in DECISIONS:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"decision: expected one of {', '.join(DECISIONS)} (or empty), got {_shown(request.decision)}")
        if not 0 <= request.page_size <= MAX_PAGE_SIZE:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"page_size: expected 0..{MAX_PAGE_SIZE}, got {request.page_size}")
        try:
            rows, token = self.daemon.store.list(
                state=request.state or None, decision=request.decision or None,
                since=timestamp_to_epoch(request.since) if request.HasField("since") else None,
                until=timestamp_to_epoch(request.until) if request.HasField("until") else None,
                limit=request.page_size or 100, after=request.page_token or None)
        except Exception as exc:  # every failure becomes a status
            _abort(context, exc)
            raise AssertionError("unreachable: context.abort raises") from exc
        answer, size = [], 0
        for row in rows:
            msg = annotation_to_proto(row)
            size += msg.ByteSize() + 8  # the field's tag and length
            if answer and size > MAX_PAGE_BYTES:  # the rest on the next page
                token = list_cursor(answer[-1][0])
                break
            answer.append((row, msg))
        return pb.ListAnnotationsResponse(annotations=[msg for _, msg in answer], next_page_token=token or "")

    def GetStatus(self, request: pb.GetStatusRequest, context: grpc.ServicerContext) -> pb.Status:
        try:
            return status_to_proto(self.daemon.status())
        except Exception as exc:  # every failure becomes a status
            _abort(context, exc)
            raise AssertionError("unreachable: context.abort raises") from exc

    def ReloadModels(self, request: pb.ReloadModelsRequest, context: grpc.ServicerContext) -> pb.Status:
        """Load a bundle and swap it in; while another reload runs, "busy" at once.

        A load takes seconds to minutes (a big bundle, a signature check, the smoke test), and the
        daemon loads one bundle at a time: a second call waited for the first on the daemon's
        lock, holding a pool thread, so a few at once (an operator's script, the sync agent's
        pull, a ``models rollback``) took the spare threads and the health check (a 5 s timeout
        in the container) waited behind them. A caller that gave up meanwhile still had its
        bundle loaded afterwards. Now the call is answered UNAVAILABLE with the ``BUSY_METADATA``
        trailer and nothing is loaded: ``service.client`` retries it with backoff until its
        timeout, waiting on the client's side, so the calls queue without holding a thread and
        load one after the other, as before (the last one's bundle stays). The answer is not
        joined to the running reload, even for the same path: a reload of ``engine.bundle``
        re-reads the ``current`` link, which may have moved since the running one read it."""
        try:
            configured = self.daemon.config.engine.bundle
            assert configured is not None  # Daemon requires engine.bundle
            path = allowed_bundle_path(request.bundle_path, configured) if request.bundle_path else None
        except Exception as exc:  # a path outside the bundles folder is refused even while busy
            _abort(context, exc)
            raise AssertionError("unreachable: context.abort raises") from exc
        if not self._reload.acquire(blocking=False):
            running = self._reloading  # None only in the instant before the holder sets it
            what = "a reload" + (f" of {running[0]} (started {time.monotonic() - running[1]:.0f} s ago)"
                                 if running is not None else "")
            log.info("ReloadModels(%r) answered busy: %s is in progress", request.bundle_path, what)
            context.set_trailing_metadata(BUSY_METADATA)
            context.abort(grpc.StatusCode.UNAVAILABLE,
                          f"{what} is in progress; bundles are loaded one at a time: retry when it has "
                          "finished (nothing was loaded for this call)")
        try:
            self._reloading = (str(path) if path is not None else f"engine.bundle ({configured})", time.monotonic())
            self.daemon.reload(str(path) if path is not None else None)
            return status_to_proto(self.daemon.status())
        except Exception as exc:  # every failure becomes a status
            _abort(context, exc)
            raise AssertionError("unreachable: context.abort raises") from exc
        finally:
            self._reloading = None
            self._reload.release()


def served_methods() -> frozenset[str]:
    """The full names of the methods this server answers (``/annotator.v1.Annotator/Annotate``...):
    the only ones the access log keeps latencies of or labels a metric with. With a token set,
    a call to any name is answered UNAUTHENTICATED, and each made-up name became a label."""
    from grpc_health.v1 import health_pb2 as h
    from grpc_reflection.v1alpha import reflection_pb2 as r

    services = (pb.DESCRIPTOR.services_by_name["Annotator"], h.DESCRIPTOR.services_by_name["Health"],
                r.DESCRIPTOR.services_by_name["ServerReflection"])
    return frozenset(f"/{svc.full_name}/{m.name}" for svc in services for m in svc.methods)


def _read(path: "str | Path", what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"server.{what}: cannot read {path}: {exc}") from exc


def create_server(config: "Config", daemon: "Daemon",
                  health_servicer: health.HealthServicer | None = None) -> tuple[grpc.Server, int]:
    """Build and start the gRPC server; returns (server, bound port).

    Pass ``health_servicer`` to keep a handle for turning health NOT_SERVING at shutdown. Listens on ``config.server.listen`` (``127.0.0.1:0`` picks a free port); TLS when
    ``tls_cert``/``tls_key`` are set, client certificates required when ``tls_client_ca`` is.
    """
    s = config.server
    stats = LatencyStats()
    interceptors: list[grpc.ServerInterceptor] = [AccessLogInterceptor(stats, metrics=daemon.metrics,
                                                                       known_methods=served_methods())]
    if s.token:
        interceptors.append(TokenInterceptor(s.token))
    streams = int(s.max_concurrent_streams or 16)
    # No grpc.max_concurrent_streams: as HTTP/2 SETTINGS it made gRPC refuse (REFUSED_STREAM)
    # calls beyond it on a connection, health checks included; the servicer's bounds do the work.
    options = [("grpc.max_receive_message_length", int(s.max_message_bytes)),
               ("grpc.max_send_message_length", int(s.max_message_bytes)),
               ("grpc.so_reuseport", 0)]
    # A stream or a waiting Annotate call holds a pool thread until it ends: the servicer admits
    # ``streams`` and MAX_WAITING_ANNOTATE of them on the whole server, and the pool keeps
    # SPARE_THREADS more for health, status, reload and the quick calls.
    workers = streams + MAX_WAITING_ANNOTATE + SPARE_THREADS
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
                         interceptors=interceptors, options=options)
    servicer = AnnotatorServicer(daemon, stats, max_streams=streams, max_waiting=MAX_WAITING_ANNOTATE)
    pb_grpc.add_AnnotatorServicer_to_server(servicer, server)
    health_servicer = health_servicer or health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    if s.tls_cert or s.tls_key:
        if not (s.tls_cert and s.tls_key):
            raise ConfigError("server.tls_cert and server.tls_key must be given together")
        ca = _read(s.tls_client_ca, "tls_client_ca") if s.tls_client_ca else None
        creds = grpc.ssl_server_credentials([(_read(s.tls_key, "tls_key"), _read(s.tls_cert, "tls_cert"))],
                                            root_certificates=ca, require_client_auth=ca is not None)
        port = server.add_secure_port(s.listen, creds)
    else:
        port = server.add_insecure_port(s.listen)
    if not port:
        raise ConfigError(f"server.listen: cannot bind {s.listen!r}")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    daemon.latency = stats
    log.info("gRPC server listening on %s (port %d, tls=%s)", s.listen, port, bool(s.tls_cert))
    return server, port


def _split_listen(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:9464"`` -> ``("127.0.0.1", 9464)``; brackets of an IPv6 host removed."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def _start_metrics(config: "Config") -> "tuple[Any, int | None]":
    """(recorder, bound port) when ``metrics.listen`` is set, else (None, None)."""
    if not config.metrics.listen:
        return None, None
    from .metrics import MetricsRecorder, start_metrics_server  # prometheus_client only when used

    recorder = MetricsRecorder(process="daemon")  # the sync agent's series are on its own endpoint
    host, port = _split_listen(config.metrics.listen)
    try:
        return recorder, start_metrics_server(recorder, host, port)
    except OSError as exc:
        raise ConfigError(f"metrics.listen: cannot serve metrics on {config.metrics.listen!r}: {exc}") from exc


def _stop_metrics(recorder: Any) -> None:
    """Free the metrics port of ``_start_metrics`` (None: there is none)."""
    if recorder is not None:
        from .metrics import stop_metrics_server

        stop_metrics_server(recorder)


def _mirror_health(daemon: Any, health_servicer: health.HealthServicer, stop: threading.Event) -> None:
    """gRPC health follows ``Daemon.healthy()`` (what the systemd watchdog reads), checked every
    second until ``stop``: the container's HEALTHCHECK sees a dead worker or a wedged batch too,
    not just a port. Its own thread: a check stuck on a hung disk must not keep ``serve`` from
    seeing SIGTERM."""
    serving = True
    while not stop.wait(1.0):
        if daemon.healthy() != serving and not stop.is_set():
            serving = not serving
            log.warning("gRPC health: %s", "SERVING again" if serving else
                        "NOT_SERVING (a worker thread died or is wedged, or the store does not answer)")
            for name in ("", SERVICE_NAME):
                health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING if serving
                                    else health_pb2.HealthCheckResponse.NOT_SERVING)


class _StoppedWhileStarting(BaseException):
    """SIGTERM or SIGINT while ``Daemon()`` is being made: it ends there. The signal only set an
    Event, read once the daemon served, and the start could wait on for long: a store upgrade by
    another program is waited for as long as it runs (``service.store``), while its
    ``EXTEND_TIMEOUT_USEC`` extended systemd's stop timeout as well, so ``systemctl stop`` hung
    behind it. A step of an upgrade this daemon runs is rolled back, as a kill would (each step
    is its own transaction); a signal inside one SQLite statement takes effect when it returns."""


def serve(config: "Config", ready: threading.Event | None = None, stop: threading.Event | None = None,
          sole: bool = False) -> int:
    """Run the appliance in the foreground until SIGTERM/SIGINT (or ``stop`` is set).

    Start-up: metrics endpoint, daemon (bundle loaded and smoke-tested), gRPC server listening,
    then the daemon's workers and drop folder; only then READY=1 and a STATUS line (port,
    bundle) go to systemd, and the watchdog pings while ``Daemon.healthy()``, which gRPC health
    follows (checked every second). A reload that changes the bundle sends a new STATUS.
    Shutdown order: the signal only sets an Event; STOPPING=1, the watchdog stops, the drop
    folder watcher stops, health turns NOT_SERVING, ``server.stop(grace)``, workers finish their
    batch, leases are released and the store is closed (``Daemon.close``).
    """
    from .daemon import Daemon
    from .systemd import Notifier, Watchdog

    config.require("engine.bundle", "store.root")  # before any signal handler, thread or port
    stop = stop or threading.Event()
    starting = [True]

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()
        if starting[0]:  # ``Daemon()`` may wait for another program's store upgrade as long as it runs
            raise _StoppedWhileStarting(signum)

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
    notifier = Notifier.from_environ(os.environ)
    metrics, metrics_port = _start_metrics(config)
    try:
        daemon = Daemon(config, metrics=metrics, sole=sole)  # sole: serve.lock held (``Daemon``)
    except _StoppedWhileStarting as exc:
        _stop_metrics(metrics)
        log.info("stopped by signal %d while starting (nothing was serving yet)", exc.args[0])
        return 0
    except BaseException:
        _stop_metrics(metrics)
        raise
    finally:
        starting[0] = False
    server: grpc.Server | None = None
    watchdog: Watchdog | None = None
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    try:
        server, port = create_server(config, daemon, health_servicer)
        # Only once the port is ours: a second `serve` of the same config on a busy port ends
        # here without its drop folder or workers having touched the shared folders and store.
        # Listening now, a later move of engine.bundle's link comes as a ReloadModels; one made
        # since the daemon read it (a rollback told "no daemon answers") is taken here.
        daemon.follow_configured_bundle()
        daemon.start()
        bundle_id = daemon.bundle.id

        def status_line() -> str:
            extra = f", metrics on port {metrics_port}" if metrics_port is not None else ""
            return f"serving gRPC on port {port} with bundle {bundle_id}{extra}"

        log.info("annotator serving on port %d with bundle %s", port, bundle_id)  # tests and scripts read this line
        notifier.ready()
        notifier.status(status_line())
        watchdog = Watchdog.from_environ(os.environ, healthy=daemon.healthy, notifier=notifier)
        watchdog.start()
        if ready is not None:
            ready.set()
        threading.Thread(target=_mirror_health, args=(daemon, health_servicer, stop), name="grpc-health",
                         daemon=True).start()
        while not stop.wait(1.0):
            if daemon.bundle.id != bundle_id:  # reloaded through ReloadModels
                bundle_id = daemon.bundle.id
                notifier.status(status_line())
    finally:
        log.info("shutting down")
        notifier.stopping()
        if watchdog is not None:
            watchdog.stop()
        daemon.stop_intake()
        for name in ("", SERVICE_NAME):
            health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if server is not None:
            server.stop(grace=5.0).wait(10.0)
        _stop_metrics(metrics)
        daemon.close()
    return 0
