"""Mistakenness: how far a reviewer moved the auto label of one image (pure numpy, no I/O).

Both labels are in the dataset's canonical form (``sync.dataset``): original-image pixels,
boxes ``[x1, y1, x2, y2]``, key points ``[x, y, flag]`` with flags 2 visible / 1 occluded /
0 outside, all persons in the same key-point order. Three terms, each in [0, 1]:

- ``boxes``: heads and persons are matched one to one (greedy by IoU, IoU > 0); each match
  slot costs ``1 - IoU``, a box present on one side only costs 1; the mean over slots.
- ``points``: for matched persons, every point with a location on both sides (flag > 0)
  costs ``1 - exp(-d^2 / (2 s^2 (2 sigma)^2))`` (COCO OKS per point, ``s^2`` = area of the
  reviewed person box, ``sigma`` from the key-point schema); each located point of an
  unmatched person costs 1; the mean over those points.
- ``visibility``: the fraction of points whose flag changed; an unmatched person counts as
  all-outside on the missing side.

``score`` is the mean of the terms that had anything to measure (0 when nothing did, e.g. two
empty labels). An unchanged label scores exactly 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np


@dataclass(frozen=True)
class Mistakenness:
    """Per-image figure; ``score`` summarises ``boxes``, ``points`` and ``visibility`` (each 0..1)."""

    score: float
    boxes: float
    points: float
    visibility: float
    changed_points: int
    total_points: int

    def to_json(self) -> dict[str, Any]:
        return {"score": round(self.score, 6), "boxes": round(self.boxes, 6), "points": round(self.points, 6),
                "visibility": round(self.visibility, 6), "changed_points": self.changed_points,
                "total_points": self.total_points}


def box_iou_xyxy(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU ``[A, B]`` between ``[A, 4]`` and ``[B, 4]`` boxes (x1, y1, x2, y2; pixels)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(-1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    same = np.all(a[:, None, :] == b[None, :, :], axis=-1)  # identical (even degenerate) boxes
    return np.where(same, 1.0, inter / np.maximum(union, 1e-9))


def match_boxes(a: np.ndarray, b: np.ndarray) -> list[tuple[int, int, float]]:
    """Greedy one-to-one matching by descending IoU (> 0): ``[(index_a, index_b, iou)]``."""
    iou = box_iou_xyxy(a, b)
    if iou.size == 0:
        return []
    pairs: list[tuple[int, int, float]] = []
    used_a: set[int] = set()
    used_b: set[int] = set()
    for flat in np.argsort(-iou, axis=None, kind="stable"):
        i, j = divmod(int(flat), iou.shape[1])
        if iou[i, j] <= 0:
            break
        if i in used_a or j in used_b:
            continue
        pairs.append((i, j, float(iou[i, j])))
        used_a.add(i)
        used_b.add(j)
    return pairs


def _kpts(person: Mapping[str, Any], count: int) -> np.ndarray:
    k = np.asarray(person.get("keypoints", []), dtype=np.float64).reshape(-1, 3)
    if len(k) != count:
        raise ValueError(f"person has {len(k)} key points; expected {count} (the dataset's schema)")
    return k


def mistakenness(auto: Mapping[str, Any], reviewed: Mapping[str, Any], sigmas: Sequence[float]) -> Mistakenness:
    """Compare the auto label with the reviewed one (both canonical dicts: ``heads`` = list of
    boxes, ``persons`` = list of ``{"box", "keypoints": [[x, y, flag]] * K}``); see module doc."""
    count = len(sigmas)
    var = (2.0 * np.asarray(sigmas, dtype=np.float64)) ** 2
    box_costs: list[float] = []
    point_costs: list[float] = []
    changed = total = 0

    heads_a = np.asarray(auto.get("heads", []), dtype=np.float64).reshape(-1, 4)
    heads_r = np.asarray(reviewed.get("heads", []), dtype=np.float64).reshape(-1, 4)
    head_pairs = match_boxes(heads_a, heads_r)
    box_costs += [1.0 - iou for _, _, iou in head_pairs]
    box_costs += [1.0] * (len(heads_a) + len(heads_r) - 2 * len(head_pairs))

    pa, pr = list(auto.get("persons", [])), list(reviewed.get("persons", []))
    boxes_a = np.asarray([p["box"] for p in pa], dtype=np.float64).reshape(-1, 4)
    boxes_r = np.asarray([p["box"] for p in pr], dtype=np.float64).reshape(-1, 4)
    person_pairs = match_boxes(boxes_a, boxes_r)
    box_costs += [1.0 - iou for _, _, iou in person_pairs]
    for i, j, _ in person_pairs:
        ka, kr = _kpts(pa[i], count), _kpts(pr[j], count)
        fa, fr = ka[:, 2].astype(int), kr[:, 2].astype(int)
        changed += int(np.count_nonzero(fa != fr))
        total += count
        both = (fa > 0) & (fr > 0)
        x1, y1, x2, y2 = boxes_r[j]
        area = max((x2 - x1) * (y2 - y1), 1.0)
        d2 = ((ka[:, :2] - kr[:, :2]) ** 2).sum(-1)
        sim = np.exp(-d2 / var / area / 2.0)
        point_costs += (1.0 - sim[both]).tolist()
        point_costs += [1.0] * int(np.count_nonzero((fa > 0) ^ (fr > 0)))
    matched_a = {i for i, _, _ in person_pairs}
    matched_r = {j for _, j, _ in person_pairs}
    for side, matched in ((pa, matched_a), (pr, matched_r)):
        for idx, person in enumerate(side):
            if idx in matched:
                continue
            box_costs.append(1.0)
            flags = _kpts(person, count)[:, 2]
            located = int(np.count_nonzero(flags > 0))
            changed += located
            total += count
            point_costs += [1.0] * located

    def mean(values: list[float]) -> float | None:
        return float(np.mean(values)) if values else None

    terms = [mean(box_costs), mean(point_costs), (changed / total) if total else None]
    present = [t for t in terms if t is not None]
    score = float(np.mean(present)) if present else 0.0
    return Mistakenness(score=score, boxes=terms[0] or 0.0, points=terms[1] or 0.0,
                        visibility=terms[2] or 0.0, changed_points=changed, total_points=total)


def summarise(values: Sequence[float]) -> dict[str, Any]:
    """``{"count", "mean", "median", "p90", "max"}`` of per-image scores (None when empty)."""
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return {"count": 0, "mean": None, "median": None, "p90": None, "max": None}
    return {"count": int(arr.size), "mean": float(arr.mean()), "median": float(np.median(arr)),
            "p90": float(np.percentile(arr, 90)), "max": float(arr.max())}
