"""The visibility rule (DESIGN.md, "Visibility rule"): pure, vectorised.

The main pose model is trained on every labelled point, the visible-only model on visible
points alone. A main-model person is matched to a visible-only person by box overlap; then
per key point k:

- visible  (flag 2) if main_conf > main_thr[k] and visible_conf >  visible_thr[k];
- occluded (flag 1) if main_conf > main_thr[k] and visible_conf <= visible_thr[k];
- outside  (flag 0) otherwise.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from .geometry import box_iou

log = logging.getLogger(__name__)

FLAG_VISIBLE, FLAG_OCCLUDED, FLAG_OUTSIDE = 2, 1, 0


def match_persons(
    main_boxes: np.ndarray,
    vis_boxes: np.ndarray,
    iou_thr: float,
    main_scores: np.ndarray | None = None,
) -> list[int | None]:
    """One-to-one greedy matching of main persons to visible-only persons.

    ``main_boxes`` [P, 4] and ``vis_boxes`` [Q, 4] are xyxy in the same frame. Main persons
    take their turn in order of descending ``main_scores`` (given order when None); each takes
    the not-yet-taken visible-only box with the highest IoU, if that IoU >= ``iou_thr``.
    Returns, for each main person (in the input order), the index into ``vis_boxes`` or None.
    """
    main_boxes = np.asarray(main_boxes, dtype=np.float32).reshape(-1, 4)
    vis_boxes = np.asarray(vis_boxes, dtype=np.float32).reshape(-1, 4)
    result: list[int | None] = [None] * len(main_boxes)
    if len(main_boxes) == 0 or len(vis_boxes) == 0:
        return result
    iou = box_iou(main_boxes, vis_boxes)
    order = (
        np.arange(len(main_boxes))
        if main_scores is None
        else np.argsort(-np.asarray(main_scores, dtype=np.float32).reshape(-1), kind="stable")
    )
    taken = np.zeros(len(vis_boxes), dtype=bool)
    for i in order:
        row = np.where(taken, -1.0, iou[i])
        j = int(row.argmax())
        if row[j] >= iou_thr and not taken[j]:
            result[int(i)] = j
            taken[j] = True
    return result


def _thresholds(thr: float | Sequence[float] | np.ndarray, k: int) -> np.ndarray:
    arr = np.asarray(thr, dtype=np.float32).reshape(-1)
    if arr.size == 1:
        return np.full(k, arr[0], dtype=np.float32)
    if arr.size != k:
        raise ValueError(f"thresholds: expected 1 or {k} values, got {arr.size}")
    return arr


def decide_visibility(
    main_conf: np.ndarray,
    vis_conf: np.ndarray,
    main_thr: float | Sequence[float] | np.ndarray,
    vis_thr: float | Sequence[float] | np.ndarray,
) -> np.ndarray:
    """Flags [P, K] (int8: 2 visible, 1 occluded, 0 outside) from confidences [P, K].

    ``main_thr``/``vis_thr`` are one number or K numbers (one per key point). For a person
    with no visible-only match, pass zeros as its ``vis_conf`` row (never visible).
    """
    main_conf = np.asarray(main_conf, dtype=np.float32)
    vis_conf = np.asarray(vis_conf, dtype=np.float32)
    if main_conf.shape != vis_conf.shape or main_conf.ndim != 2:
        raise ValueError(f"expected main_conf and vis_conf of one shape [P, K], got {main_conf.shape} and {vis_conf.shape}")
    k = main_conf.shape[1]
    present = main_conf > _thresholds(main_thr, k)[None, :]
    seen = vis_conf > _thresholds(vis_thr, k)[None, :]
    flags = np.full(main_conf.shape, FLAG_OUTSIDE, dtype=np.int8)
    flags[present & seen] = FLAG_VISIBLE
    flags[present & ~seen] = FLAG_OCCLUDED
    return flags


def decide_visibility_main_only(
    main_conf: np.ndarray, main_thr: float | Sequence[float] | np.ndarray
) -> np.ndarray:
    """Flags [P, K] for bundles without a visible-only model: visible (2) or outside (0), never occluded."""
    main_conf = np.asarray(main_conf, dtype=np.float32)
    if main_conf.ndim != 2:
        raise ValueError(f"expected main_conf of shape [P, K], got {main_conf.shape}")
    present = main_conf > _thresholds(main_thr, main_conf.shape[1])[None, :]
    return np.where(present, FLAG_VISIBLE, FLAG_OUTSIDE).astype(np.int8)
