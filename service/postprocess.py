"""Decoding of raw ultralytics ONNX outputs into detections in original-image pixels.

Layouts (ultralytics 8.4, exported with ``nms=False``), for ONE image of the batch:

- detect: ``[4 + C, A]``: rows cx, cy, w, h (network pixels), then C class scores (sigmoid
  already applied);
- pose: ``[4 + 1 + K * D, A]``: cx, cy, w, h, the person score, then per key point x, y
  (network pixels) and, when D = 3, a confidence (sigmoid already applied).

The steps follow ``ultralytics.utils.nms.non_max_suppression`` + ``scale_boxes``: keep
candidates with score > conf, class-agnostic NMS, at most ``max_det``, map to original pixels,
clip to the image. Pure functions, no I/O.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .geometry import Letterbox, boxes_to_original, clip_boxes, clip_points, cxcywh_to_xyxy, nms, points_to_original

log = logging.getLogger(__name__)

MAX_DET = 300
MAX_NMS = 30000  # candidates handed to NMS at most, as ultralytics does


@dataclass(frozen=True)
class Detections:
    """Detections of one image, in original-image pixels, ordered by descending score.

    boxes: [D, 4] float32 xyxy; scores: [D] float32; class_ids: [D] int64;
    keypoints: [D, K, 3] float32 (x, y, conf) for pose models, else None; off_image: [D, K] bool,
    True where the model put the point beyond the image (its x, y are clipped to the edge), or
    None (no pose model, or not known).
    """

    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray
    keypoints: np.ndarray | None = None
    off_image: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def empty(cls, kpt_count: int | None = None) -> "Detections":
        kpts = None if kpt_count is None else np.zeros((0, kpt_count, 3), np.float32)
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64), kpts)


def _select(
    output: np.ndarray, class_rows: int, conf: float, iou: float, max_det: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Candidate filtering + NMS on one image's [R, A] output. Returns (idx, boxes_net, scores, cls)."""
    if output.ndim != 2 or output.shape[0] < 4 + class_rows:
        raise ValueError(f"expected one image's output [>= {4 + class_rows}, A], got shape {output.shape}")
    cls_scores = output[4:4 + class_rows]  # C, A
    cls_ids = cls_scores.argmax(axis=0)
    scores = cls_scores.max(axis=0)
    cand = np.nonzero(scores > conf)[0]
    if len(cand) > MAX_NMS:
        cand = cand[np.argsort(-scores[cand], kind="stable")[:MAX_NMS]]
    boxes = cxcywh_to_xyxy(output[0:4, cand].T)
    keep = nms(boxes, scores[cand], iou, max_det)[:max_det]
    return cand[keep], boxes[keep], scores[cand][keep].astype(np.float32), cls_ids[cand][keep].astype(np.int64)


def decode_detections(
    output: np.ndarray,
    lb: Letterbox,
    pixel_scale: float | tuple[float, float],
    width: int,
    height: int,
    num_classes: int,
    conf: float,
    iou: float,
    max_det: int = MAX_DET,
) -> Detections:
    """One image's detect output ``[4 + C, A]`` -> ``Detections`` in original pixels.

    ``lb`` is the image's letterbox, ``pixel_scale`` its ``DecodedImage.scale`` (decoded /
    original), ``width``/``height`` the original size used for clipping.
    """
    _, boxes, scores, cls = _select(np.asarray(output, dtype=np.float32), num_classes, conf, iou, max_det)
    boxes = clip_boxes(boxes_to_original(boxes, lb, pixel_scale), width, height)
    return Detections(boxes, scores, cls)


# A key point further than this many *network* pixels beyond the image's edge is outside it (2
# original pixels for a 640 x 480 camera at 320). In network pixels because that is where the
# model's precision lies: 2 original pixels were 0.16 of a network pixel on a 4000 px frame,
# so the same picture at a higher resolution made more of a cut person's points outside.
OFF_IMAGE_NET_PX = 1.0
# Two instances of one person (pose twins): box NMS at nms_iou keeps both when their boxes
# overlap less (one box around the body, one around body and a neighbour: 3-8 % of the persons
# in rendered 5-9 seat cabins went to review doubled). The lower-scored one goes when the two
# put at least TWIN_MIN_POINTS points both are sure of (raw confidence > TWIN_POINT_CONF) in
# the same places, their OKS over those points (the smaller box's area as the scale) above
# TWIN_OKS: two people's points lie a body part apart (OKS near 0), twins' a few pixels.
TWIN_OKS = 0.8
TWIN_POINT_CONF = 0.5
TWIN_MIN_POINTS = 3


def suppress_twins(boxes: np.ndarray, kpts: np.ndarray, sigmas: Sequence[float]) -> np.ndarray:
    """Indices to keep (in order) of instances ordered by descending score: each instance
    whose key points repeat a kept one's (see ``TWIN_OKS``) is dropped. ``boxes`` [D, 4] xyxy,
    ``kpts`` [D, K, 3] (x, y, conf), both in one frame; ``sigmas`` the K OKS sigmas."""
    n = len(boxes)
    if n < 2:
        return np.arange(n)
    sure = kpts[..., 2] > TWIN_POINT_CONF  # [D, K]
    both = sure[:, None, :] & sure[None, :, :]  # [D, D, K]
    d2 = ((kpts[:, None, :, :2] - kpts[None, :, :, :2]) ** 2).sum(-1)
    area = np.prod((boxes[:, 2:] - boxes[:, :2]).clip(min=1.0), axis=1)
    scale = 2.0 * np.minimum(area[:, None], area[None, :])[..., None] * (2.0 * np.asarray(sigmas, np.float32)) ** 2
    count = both.sum(-1)
    oks = (np.exp(-d2 / scale) * both).sum(-1) / np.maximum(count, 1)
    twin = (count >= TWIN_MIN_POINTS) & (oks > TWIN_OKS)
    keep: list[int] = []
    for i in range(n):
        if not any(twin[i, j] for j in keep):
            keep.append(i)
    return np.array(keep, dtype=np.int64)


def decode_poses(
    output: np.ndarray,
    kpt_shape: tuple[int, int],
    lb: Letterbox,
    pixel_scale: float | tuple[float, float],
    width: int,
    height: int,
    conf: float,
    iou: float,
    max_det: int = MAX_DET,
    num_classes: int = 1,
    sigmas: Sequence[float] | None = None,
) -> Detections:
    """One image's pose output ``[4 + C + K * D, A]`` -> ``Detections`` with key points.

    Key points come back as [D, K, 3]: x, y in original pixels (clipped to the image) and the
    model's confidence (1.0 when the model has D = 2, i.e. no confidences); ``off_image`` marks
    the points the model placed more than ``OFF_IMAGE_NET_PX`` network pixels beyond the image's edge, whatever
    their confidence (a person cut by the frame: the model is sure where the point lies, and it
    lies outside the picture). With ``sigmas`` (the schema's K OKS sigmas) an instance that
    repeats a better one's key points is dropped too (``suppress_twins``).
    """
    output = np.asarray(output, dtype=np.float32)
    k, d = int(kpt_shape[0]), int(kpt_shape[1])
    if output.ndim != 2 or output.shape[0] != 4 + num_classes + k * d:
        raise ValueError(
            f"pose output: expected [{4 + num_classes + k * d}, A] for kpt_shape {list(kpt_shape)}, got {output.shape}"
        )
    idx, boxes, scores, cls = _select(output, num_classes, conf, iou, max_det)
    raw = output[4 + num_classes:, idx].T.reshape(len(idx), k, d)
    kpts = np.ones((len(idx), k, 3), dtype=np.float32)
    kpts[..., :d] = raw[..., :3]
    kpts = points_to_original(kpts, lb, pixel_scale)
    x, y = kpts[..., 0], kpts[..., 1]
    sx, sy = pixel_scale if isinstance(pixel_scale, tuple) else (pixel_scale, pixel_scale)
    mx, my = OFF_IMAGE_NET_PX / (lb.gain_x * sx), OFF_IMAGE_NET_PX / (lb.gain_y * sy)  # type: ignore[operator]
    off = (x < -mx) | (x > width + mx) | (y < -my) | (y > height + my)
    kpts = clip_points(kpts, width, height)
    boxes = clip_boxes(boxes_to_original(boxes, lb, pixel_scale), width, height)
    if sigmas is not None and len(sigmas) == k:
        keep = suppress_twins(boxes, kpts, sigmas)
        boxes, scores, cls, kpts, off = boxes[keep], scores[keep], cls[keep], kpts[keep], off[keep]
    return Detections(boxes, scores, cls, kpts, off)
