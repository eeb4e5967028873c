"""One-to-one matching of ground-truth persons to predicted persons by OKS (pure numpy).

OKS follows the COCO definition (pycocotools ``computeOks``) over the labelled ground-truth
points: ``exp(-d^2 / (2 * area * (2 sigma)^2))`` averaged over points with flag > 0, where
``area`` is the ground-truth segment area in pixels^2.
"""
from __future__ import annotations

import numpy as np


def oks_matrix(gt_kpts: np.ndarray, gt_areas: np.ndarray, pr_kpts: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """OKS ``[G, P]`` between ground truth ``[G, K, 3]`` (x, y, flag; pixels) with areas
    ``[G]`` and predictions ``[P, K, 2]`` (x, y; pixels). A ground truth with no labelled
    point has OKS 0 with everything."""
    g, p = gt_kpts.shape[0], pr_kpts.shape[0]
    if g == 0 or p == 0:
        return np.zeros((g, p))
    var = (2.0 * np.asarray(sigmas, dtype=np.float64)) ** 2  # [K]
    d2 = ((gt_kpts[:, None, :, :2] - pr_kpts[None, :, :, :2]) ** 2).sum(-1)  # [G, P, K]
    e = d2 / var[None, None, :] / (gt_areas[:, None, None] + np.spacing(1)) / 2.0
    labelled = (gt_kpts[:, :, 2] > 0)[:, None, :]  # [G, 1, K]
    count = labelled.sum(-1)  # [G, 1]
    sim = (np.exp(-e) * labelled).sum(-1) / np.maximum(count, 1)
    return np.where(count > 0, sim, 0.0)


def match_persons(
    gt_kpts: np.ndarray,
    gt_boxes_xywh: np.ndarray,
    gt_areas: np.ndarray,
    pr_kpts: np.ndarray,
    pr_boxes_xyxy: np.ndarray,
    sigmas: np.ndarray,
    threshold: float = 0.5,
) -> dict[int, int]:
    """Greedy one-to-one matching: pairs taken in order of decreasing OKS, each ground truth
    and each prediction used at most once, pairs below ``threshold`` never matched.

    Shapes: ``gt_kpts [G, K, 3]``, ``gt_boxes_xywh [G, 4]`` (ties are broken by box IoU),
    ``gt_areas [G]``, ``pr_kpts [P, K, 2]``, ``pr_boxes_xyxy [P, 4]``. Returns
    ``{gt_index: prediction_index}``.
    """
    sim = oks_matrix(gt_kpts, gt_areas, pr_kpts, sigmas)
    if sim.size == 0:
        return {}
    # A tiny box-IoU term only orders pairs whose OKS is equal.
    sim = sim + 1e-9 * box_iou_xywh_xyxy(gt_boxes_xywh, pr_boxes_xyxy)
    pairs: dict[int, int] = {}
    used: set[int] = set()
    for flat in np.argsort(-sim, axis=None, kind="stable"):
        gi, pi = divmod(int(flat), sim.shape[1])
        if sim[gi, pi] < threshold:
            break
        if gi in pairs or pi in used:
            continue
        pairs[gi] = pi
        used.add(pi)
    return pairs


def box_iou_xywh_xyxy(gt_xywh: np.ndarray, pr_xyxy: np.ndarray) -> np.ndarray:
    """IoU ``[G, P]`` between ``[G, 4]`` boxes (x, y, w, h) and ``[P, 4]`` boxes (x1, y1, x2, y2)."""
    g = np.concatenate([gt_xywh[:, :2], gt_xywh[:, :2] + gt_xywh[:, 2:4]], axis=1)
    lt = np.maximum(g[:, None, :2], pr_xyxy[None, :, :2])
    rb = np.minimum(g[:, None, 2:], pr_xyxy[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_g = (g[:, 2:] - g[:, :2]).prod(-1)
    area_p = (pr_xyxy[:, 2:] - pr_xyxy[:, :2]).prod(-1)
    return inter / np.maximum(area_g[:, None] + area_p[None, :] - inter, 1e-9)
