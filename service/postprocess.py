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


OFF_IMAGE_PX = 2.0  # a key point further than this beyond the image's edge is outside it


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
) -> Detections:
    """One image's pose output ``[4 + C + K * D, A]`` -> ``Detections`` with key points.

    Key points come back as [D, K, 3]: x, y in original pixels (clipped to the image) and the
    model's confidence (1.0 when the model has D = 2, i.e. no confidences); ``off_image`` marks
    the points the model placed more than ``OFF_IMAGE_PX`` beyond the image's edge, whatever
    their confidence (a person cut by the frame: the model is sure where the point lies, and it
    lies outside the picture).
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
    off = (x < -OFF_IMAGE_PX) | (x > width + OFF_IMAGE_PX) | (y < -OFF_IMAGE_PX) | (y > height + OFF_IMAGE_PX)
    kpts = clip_points(kpts, width, height)
    boxes = clip_boxes(boxes_to_original(boxes, lb, pixel_scale), width, height)
    return Detections(boxes, scores, cls, kpts, off)
