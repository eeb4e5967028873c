"""The terminal views of a running daemon: ``annotator status`` and ``annotator healthcheck``.

``format_status(status)`` turns an ``annotator.v1.Status`` (from ``GetStatus``) into a compact
block of text: bundle, thresholds, queue depths per life-cycle state, counters, uptime and the
reason ingest is paused, if it is. ``health_check(target)`` asks ``grpc.health.v1.Health/Check``
(exempt from the bearer token, so an orchestrator can probe without the secret).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Sequence

import grpc

if TYPE_CHECKING:
    from protos.annotator.v1 import annotator_pb2 as pb

    from .client import TlsOptions

log = logging.getLogger(__name__)

# Life-cycle order (service.store); unknown states reported by a newer daemon follow, sorted.
STATE_ORDER = ("received", "annotated", "auto_accepted", "review_pending", "uploaded", "reviewed", "failed")
# Counters the daemon counts since its start (the others are the store's, kept across restarts).
SINCE_START = ("drop_taken", "drop_quarantined")
LATENCY = ("annotate_p50_us", "annotate_p99_us")  # unary gRPC Annotate calls answered OK (service.interceptors)
# The drop folder's files not taken yet and the oldest one's wait (``DropFolder.backlog``): a
# gauge, not a counter, so a line of its own.
BACKLOG = ("drop_backlog", "drop_backlog_oldest_s")


def format_duration(seconds: float) -> str:
    """``93784.0`` -> ``"1d 2h 3m"``; under a minute: ``"42s"``."""
    s = max(0, int(seconds))
    days, rest = divmod(s, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if not (days or hours or minutes):
        return f"{secs}s"
    parts = [f"{days}d"] if days else []
    if days or hours:
        parts.append(f"{hours}h")
    parts.append(f"{minutes}m")
    return " ".join(parts)


def _points(values: Sequence[float]) -> str:
    """Per-key-point thresholds in one short phrase: ``0.60`` or ``0.55-0.70 (17 points)``."""
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return f"{lo:.2f}" if hi - lo < 1e-9 else f"{lo:.2f}-{hi:.2f} ({len(values)} points)"


def format_status(status: "pb.Status", target: str = "") -> str:
    """The daemon's state as text for a terminal (about 15 lines)."""
    t = status.thresholds
    head = f"annotator {status.version or '?'}" + (f" at {target}" if target else "")
    lines = [f"{head}, up {format_duration(status.uptime_seconds)}",
             f"bundle      {status.bundle_id or '-'}" + (f"  ({status.bundle_path})" if status.bundle_path else ""),
             f"engine      {', '.join(p.removesuffix('ExecutionProvider') for p in status.providers) or '?'}, "
             f"{status.run_batch or '?'} image(s) per run",
             f"thresholds  detection {t.det_conf:.2f}, person {t.person_conf:.2f}, NMS IoU {t.nms_iou:.2f}, "
             f"main {_points(t.main)}, visible {_points(t.visible)}",
             f"judge       review below score {t.score_threshold:.2f}, audit {t.audit_fraction * 100:.1f} %",
             f"ingest      {'PAUSED: ' + status.paused_reason if status.paused_reason else 'accepting'}"]
    lines += [f"notice      {n}" for n in status.notices]
    depths = dict(status.queue_depths)
    states = [s for s in STATE_ORDER if s in depths] + sorted(set(depths) - set(STATE_ORDER))
    if states:
        width = max(len(s) for s in states)
        lines.append("")
        lines.append(f"{'state':<{width}}  {'images':>8}")
        lines += [f"{s:<{width}}  {depths[s]:>8}" for s in states]
        lines.append(f"{'total':<{width}}  {sum(depths.values()):>8}")
    counters = dict(status.counters)
    latency = [counters.pop(k) for k in LATENCY if k in counters]
    since_start = {k: counters.pop(k) for k in SINCE_START if k in counters}
    backlog = [counters.pop(k) for k in BACKLOG if k in counters]
    if counters or since_start or latency or backlog:
        lines.append("")
    if len(backlog) == 2:
        lines.append("drop folder " + (f"{backlog[0]} file(s) waiting to be taken, the oldest seen "
                                       f"{format_duration(backlog[1])} ago" if backlog[0] else "no file waiting"))
    if counters:
        lines.append("counters    " + ", ".join(f"{k} {v}" for k, v in sorted(counters.items())))
    if since_start:
        lines.append("this start  " + ", ".join(f"{k} {v}" for k, v in sorted(since_start.items())))
    if len(latency) == 2:
        # Only unary Annotate calls: a dropped or streamed image's time is the annotator_annotate_seconds
        # histogram of /metrics. 0 is no call at all (a real one takes at least a model run).
        lines.append("gRPC call   " + (f"Annotate p50 {_ms(latency[0])}, p99 {_ms(latency[1])} (unary calls answered OK, "
                                       "the last 1024; drop folder and streams not included)"
                                       if any(latency) else "no unary Annotate call answered yet (the drop folder "
                                       "and streams are not timed here)"))
    return "\n".join(lines)


def _ms(us: int) -> str:
    """Microseconds as milliseconds for a person: ``140121`` -> ``"140 ms"``, ``489`` -> ``"0.5 ms"``."""
    ms = us / 1000.0
    return f"{ms:.0f} ms" if ms >= 10 else f"{ms:.1f} ms"


def health_check(target: str, service: str = "", timeout: float = 3.0, tls: "TlsOptions | None" = None) -> tuple[bool, str]:
    """(serving, one line) from ``grpc.health.v1.Health/Check`` of ``target`` (``HOST:PORT``)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if tls is not None:
        creds = grpc.ssl_channel_credentials(tls.root_certificates, tls.client_key, tls.client_cert)
        options = [("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else []
        channel = grpc.secure_channel(target, creds, options=options)
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                              timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            details = exc.details() if hasattr(exc, "details") else str(exc)
            return False, f"{target}: {getattr(code, 'name', code)}: {details}"
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{target}: {name}"
