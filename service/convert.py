"""Conversions between store rows / daemon status and ``annotator.v1`` protobuf messages.

Only the gRPC edge (``service.server``, ``service.client``) uses this module; the rest of the
package works with ``service.store.ImageRow`` and plain dicts.

The annotation record the daemon stores (``Daemon.record_for``) is ``Prediction.to_json()``
plus ``image_id``, ``source``, ``keypoint_names``, ``bundle_id`` and ``judgement``; coordinates
are original-image pixels after EXIF orientation.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping

from google.protobuf.timestamp_pb2 import Timestamp

from protos.annotator.v1 import annotator_pb2 as pb

if TYPE_CHECKING:
    from .daemon import DaemonStatus
    from .store import ImageRow

VISIBILITY_TO_PROTO = {"visible": pb.VISIBILITY_VISIBLE, "occluded": pb.VISIBILITY_OCCLUDED,
                       "outside": pb.VISIBILITY_OUTSIDE}
VISIBILITY_FROM_PROTO = {v: k for k, v in VISIBILITY_TO_PROTO.items()}


def epoch_to_timestamp(seconds: float | None) -> Timestamp | None:
    """Epoch seconds -> ``google.protobuf.Timestamp`` (None stays None)."""
    if seconds is None or not math.isfinite(seconds):
        return None
    ts = Timestamp()
    whole = math.floor(seconds)
    ts.seconds, ts.nanos = int(whole), int(round((seconds - whole) * 1e9)) % 1_000_000_000
    return ts


def timestamp_to_epoch(ts: Timestamp) -> float:
    """``google.protobuf.Timestamp`` -> epoch seconds."""
    return ts.seconds + ts.nanos / 1e9


def _box(values: Any) -> pb.Box:
    x1, y1, x2, y2 = (float(v) for v in values)
    return pb.Box(x1=x1, y1=y1, x2=x2, y2=y2)


def _persons(record: Mapping[str, Any]) -> list[pb.Person]:
    names = list(record.get("keypoint_names") or [])
    out = []
    for p in record.get("persons", []):
        kpts = [pb.Keypoint(name=names[i] if i < len(names) else "", x=float(k["x"]), y=float(k["y"]),
                            main_conf=float(k["main_conf"]), visible_conf=float(k["visible_conf"]),
                            visibility=VISIBILITY_TO_PROTO.get(k["visibility"], pb.VISIBILITY_UNSPECIFIED))
                for i, k in enumerate(p.get("keypoints", []))]
        out.append(pb.Person(box=_box(p["box"]), conf=float(p["conf"]), keypoints=kpts))
    return out


def annotation_to_proto(row: "ImageRow") -> pb.Annotation:
    """A store row (any state) as an ``annotator.v1.Annotation``."""
    record = row.record or {}
    msg = pb.Annotation(
        image_id=row.image_id, state=row.state, source=row.source,
        width=int(row.width or record.get("width") or 0), height=int(row.height or record.get("height") or 0),
        heads=[pb.Head(box=_box(h["box"]), conf=float(h["conf"])) for h in record.get("heads", [])],
        persons=_persons(record),
        bundle_id=row.bundle_id or "", camera_id=row.camera or "", error=row.error or "",
    )
    if row.decision is not None or row.score is not None:
        msg.judgement.CopyFrom(pb.Judgement(score=float(row.score or 0.0), reasons=list(row.reasons),
                                            decision=row.decision or "", audit=bool(row.audit)))
    for field, value in (("received_at", row.received_at), ("updated_at", row.updated_at)):
        ts = epoch_to_timestamp(value)
        if ts is not None:
            getattr(msg, field).CopyFrom(ts)
    return msg


def annotation_to_dict(msg: pb.Annotation) -> dict[str, Any]:
    """An ``Annotation`` message as a plain dict shaped like the stored record (for clients)."""
    return {
        "image_id": msg.image_id, "state": msg.state, "source": msg.source, "camera_id": msg.camera_id,
        "width": msg.width, "height": msg.height, "bundle_id": msg.bundle_id, "error": msg.error,
        "heads": [{"box": [h.box.x1, h.box.y1, h.box.x2, h.box.y2], "conf": h.conf} for h in msg.heads],
        "persons": [{"box": [p.box.x1, p.box.y1, p.box.x2, p.box.y2], "conf": p.conf,
                     "keypoints": [{"name": k.name, "x": k.x, "y": k.y, "main_conf": k.main_conf,
                                    "visible_conf": k.visible_conf,
                                    "visibility": VISIBILITY_FROM_PROTO.get(k.visibility, "unspecified")}
                                   for k in p.keypoints]} for p in msg.persons],
        "judgement": {"score": msg.judgement.score, "reasons": list(msg.judgement.reasons),
                      "decision": msg.judgement.decision, "audit": msg.judgement.audit},
        "received_at": timestamp_to_epoch(msg.received_at), "updated_at": timestamp_to_epoch(msg.updated_at),
    }


def status_to_proto(status: "DaemonStatus") -> pb.Status:
    """The daemon's status snapshot as an ``annotator.v1.Status``."""
    t = status.thresholds
    judgement = status.judgement
    return pb.Status(
        bundle_id=status.bundle_id, bundle_path=status.bundle_path,
        thresholds=pb.Thresholds(det_conf=t.det_conf, person_conf=t.person_conf, nms_iou=t.nms_iou,
                                 main=list(t.main), visible=list(t.visible),
                                 score_threshold=float(judgement.get("score_threshold", 0.0)),
                                 audit_fraction=float(judgement.get("audit_fraction", 0.0))),
        queue_depths={k: int(v) for k, v in status.queue_depths.items()},
        counters={k: int(v) for k, v in status.counters.items()},
        uptime_seconds=status.uptime_seconds, paused_reason=status.paused_reason or "",
        version=status.version, providers=list(status.providers), run_batch=int(status.run_batch),
        notices=list(status.notices),
    )
