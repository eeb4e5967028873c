"""Pre- and post-processing geometry: pure numpy functions, no I/O, no globals.

Coordinate frames used throughout the engine:

- *original*: pixels of the image as the user sees it, after EXIF orientation
  (``DecodedImage.width`` x ``DecodedImage.height``);
- *decoded*: pixels of the array actually decoded, which may be a reduced-size decode of the
  original (``decoded = original * pixel_scale``);
- *network*: pixels of the letterboxed network input (``size`` = (height, width)).

``letterbox`` reproduces ultralytics' ``LetterBox(auto=False, scale_fill=False, scaleup=True,
center=True)`` (ultralytics 8.4 ``data/augment.py``) bit for bit, and the inverse mapping
reproduces ``ultralytics.utils.ops.scale_boxes`` / ``scale_coords``: each side is rounded
separately when resizing, so the inverse uses one gain per axis.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

log = logging.getLogger(__name__)

PAD_VALUE = 114


@dataclass(frozen=True)
class Letterbox:
    """How one decoded image was placed into the network input.

    ``scale`` is the nominal ratio min(net_h / h, net_w / w); ``pad_x``/``pad_y`` are the left
    and top padding in network pixels. ``gain_x``/``gain_y`` are the exact per-axis ratios after
    ultralytics rounds each resized side to whole pixels (new_w / w, new_h / h); they default to
    ``scale`` when not given.
    """

    scale: float
    pad_x: float
    pad_y: float
    gain_x: float | None = None
    gain_y: float | None = None

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise ValueError(f"Letterbox.scale: expected > 0, got {self.scale}")
        if self.gain_x is None:
            object.__setattr__(self, "gain_x", float(self.scale))
        if self.gain_y is None:
            object.__setattr__(self, "gain_y", float(self.scale))


def as_bgr(image: np.ndarray) -> np.ndarray:
    """HxW, HxWx1, HxWx3 or HxWx4 uint8 -> HxWx3 uint8 BGR (alpha dropped, gray replicated)."""
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        return cv2.cvtColor(image.reshape(image.shape[:2]), cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    raise ValueError(f"expected an HxW, HxWx1, HxWx3 or HxWx4 image, got shape {image.shape}")


def letterbox(image: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, Letterbox]:
    """Resize keeping aspect ratio and pad to ``size`` = (height, width) with gray 114.

    ``image``: HxW (gray) or HxWxC uint8 BGR. Returns an ``size[0] x size[1] x 3`` uint8 BGR
    array and the ``Letterbox`` needed to map network coordinates back. Upscaling is allowed.
    """
    image = as_bgr(image)
    h, w = image.shape[:2]
    net_h, net_w = int(size[0]), int(size[1])
    r = min(net_h / h, net_w / w)
    new_w, new_h = max(round(w * r), 1), max(round(h * r), 1)
    dw, dh = (net_w - new_w) / 2, (net_h - new_h) / 2
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    if (w, h) != (new_w, new_h):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    out = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    return out, Letterbox(scale=r, pad_x=float(left), pad_y=float(top), gain_x=new_w / w, gain_y=new_h / h)


def to_tensor(images: Sequence[np.ndarray]) -> np.ndarray:
    """Letterboxed HxWx3 uint8 BGR images (all one size) -> float32 NCHW RGB in 0..1.

    An empty sequence gives an array of shape (0, 3, 0, 0).
    """
    if len(images) == 0:
        return np.zeros((0, 3, 0, 0), dtype=np.float32)
    batch = np.stack(images)  # N, H, W, 3 (BGR)
    batch = batch[..., ::-1].transpose(0, 3, 1, 2)  # N, 3, H, W (RGB)
    return np.ascontiguousarray(batch, dtype=np.float32) / np.float32(255.0)


def _pixel_scales(pixel_scale: float | tuple[float, float]) -> tuple[float, float]:
    if isinstance(pixel_scale, tuple):
        return float(pixel_scale[0]), float(pixel_scale[1])
    return float(pixel_scale), float(pixel_scale)


def points_to_original(
    xy: np.ndarray, lb: Letterbox, pixel_scale: float | tuple[float, float] = 1.0
) -> np.ndarray:
    """Network-frame points [..., 2+] -> original-frame points (same shape, float32, copy).

    Only the first two values of the last axis (x, y) are mapped. ``pixel_scale`` is
    decoded / original size (``DecodedImage.scale``), or (scale_x, scale_y).
    """
    sx, sy = _pixel_scales(pixel_scale)
    out = np.array(xy, dtype=np.float32, copy=True)
    if out.size == 0:
        return out
    out[..., 0] = (out[..., 0] - lb.pad_x) / (lb.gain_x * sx)  # type: ignore[operator]
    out[..., 1] = (out[..., 1] - lb.pad_y) / (lb.gain_y * sy)  # type: ignore[operator]
    return out


def points_to_network(xy: np.ndarray, lb: Letterbox, pixel_scale: float | tuple[float, float] = 1.0) -> np.ndarray:
    """Inverse of ``points_to_original``: original-frame points -> network-frame points."""
    sx, sy = _pixel_scales(pixel_scale)
    out = np.array(xy, dtype=np.float32, copy=True)
    if out.size == 0:
        return out
    out[..., 0] = out[..., 0] * (lb.gain_x * sx) + lb.pad_x  # type: ignore[operator]
    out[..., 1] = out[..., 1] * (lb.gain_y * sy) + lb.pad_y  # type: ignore[operator]
    return out


def boxes_to_original(
    xyxy: np.ndarray, lb: Letterbox, pixel_scale: float | tuple[float, float] = 1.0
) -> np.ndarray:
    """Network-frame boxes [N, 4] (x1, y1, x2, y2) -> original-frame boxes [N, 4] float32."""
    boxes = np.asarray(xyxy, dtype=np.float32).reshape(-1, 4)
    return points_to_original(boxes.reshape(-1, 2, 2), lb, pixel_scale).reshape(-1, 4)


def clip_boxes(xyxy: np.ndarray, width: int, height: int) -> np.ndarray:
    """Clip [N, 4] xyxy boxes to 0..width, 0..height (copy)."""
    out = np.array(xyxy, dtype=np.float32, copy=True).reshape(-1, 4)
    out[:, 0::2] = out[:, 0::2].clip(0, width)
    out[:, 1::2] = out[:, 1::2].clip(0, height)
    return out


def clip_points(xy: np.ndarray, width: int, height: int) -> np.ndarray:
    """Clip the x, y of points [..., 2+] to 0..width, 0..height (copy)."""
    out = np.array(xy, dtype=np.float32, copy=True)
    if out.size:
        out[..., 0] = out[..., 0].clip(0, width)
        out[..., 1] = out[..., 1].clip(0, height)
    return out


def cxcywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """[N, 4] (center x, center y, width, height) -> [N, 4] (x1, y1, x2, y2)."""
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    half = b[:, 2:4] / 2
    return np.concatenate([b[:, 0:2] - half, b[:, 0:2] + half], axis=1)


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    """[N, 4] (x1, y1, x2, y2) -> [N, 4] (x1, y1, width, height), the form cv2.dnn wants."""
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return np.concatenate([b[:, 0:2], b[:, 2:4] - b[:, 0:2]], axis=1)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix [N, M] of xyxy boxes a [N, 4] and b [M, 4]; 0 where the union is empty."""
    a = np.asarray(a, dtype=np.float32).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float32).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod((rb - lt).clip(min=0), axis=2)
    area_a = np.prod((a[:, 2:] - a[:, :2]).clip(min=0), axis=1)
    area_b = np.prod((b[:, 2:] - b[:, :2]).clip(min=0), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0).astype(np.float32)


def nms(boxes_xyxy: np.ndarray, scores: np.ndarray, iou: float, max_det: int = 0) -> np.ndarray:
    """Class-agnostic non-maximum suppression (cv2.dnn.NMSBoxes, which takes xywh boxes).

    Returns kept indices (int64) ordered by descending score, at most ``max_det`` when > 0.
    Boxes with score <= 0 are dropped (cv2 keeps only score > threshold = 0).
    """
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    # top_k 0: suppress among every candidate, then keep the best max_det (as ultralytics does);
    # NMSBoxes' own top_k keeps the best max_det candidates *before* suppressing, so a crowd of
    # overlapping boxes for one person pushed a second person out at a low det_conf (AP).
    kept = np.asarray(cv2.dnn.NMSBoxes(xyxy_to_xywh(boxes).astype(np.float64), scores, 0.0, float(iou), top_k=0),
                      dtype=np.int64).reshape(-1)
    return kept[:max_det] if max_det > 0 else kept
