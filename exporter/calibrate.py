"""Visibility samples from predictions vs. ground truth, and calibration of the key point
thresholds (``main``, ``visible``) that decide visible / occluded / outside.

The rule (see DESIGN.md, "Visibility rule") for one point with main confidence ``m`` and
visible-only confidence ``v``::

    visible  (flag 2) if m > t_main and v > t_visible
    occluded (flag 1) if m > t_main and v <= t_visible
    outside  (flag 0) otherwise

``collect_visibility_samples`` pairs every labelled ground-truth person with at most one
predicted person (greedy one-to-one on OKS, COCO definition, at least 0.5) and
returns one sample per ground-truth point. Points of unmatched ground-truth persons get
``m = v = 0``, so they are predicted ``outside`` at every threshold, exactly as in the
evaluation. ``calibrate_thresholds`` then chooses the thresholds on a grid.

Runtime + numpy only: no torch, no pycocotools needed here.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from service.confcal import FEATURES, feature_count, person_features
from service.keypoints import KeypointSchema
from service.record import Prediction

from .matching import match_persons

log = logging.getLogger(__name__)

REFERENCE_THRESHOLD = 0.6


@dataclass(frozen=True)
class VisibilitySamples:
    """One row per ground-truth key point of every evaluated ground-truth person.

    All arrays have shape ``[N]``: ``gt_flag`` int8 (2 visible, 1 occluded, 0 outside);
    ``main_conf``/``visible_conf`` float32 in 0..1 (0 when unmatched); ``kpt_index`` int32,
    index in the dataset's key point order; ``matched`` bool; ``pred_flag`` int8, the flag the
    engine decided at its own thresholds (0 when unmatched).
    """

    gt_flag: np.ndarray
    main_conf: np.ndarray
    visible_conf: np.ndarray
    kpt_index: np.ndarray
    matched: np.ndarray
    pred_flag: np.ndarray
    # With ``collect_visibility_samples(..., features=True)``: ``service.confcal.point_features``
    # of each row's matched point ``[N, F]`` (zeros when unmatched), whether the predicted person
    # had a visible-only match ``[N]``, and the image id ``[N]``.
    features: np.ndarray | None = None
    vis_matched: np.ndarray | None = None
    image_id: np.ndarray | None = None
    layout: str = FEATURES  # ``service.confcal`` feature layout of ``features``

    def __len__(self) -> int:
        return int(self.gt_flag.shape[0])


def _gt_as_dict(coco_gt: Any) -> Mapping[str, Any]:
    """Accept a pycocotools ``COCO`` object or an already parsed COCO dict."""
    return coco_gt.dataset if hasattr(coco_gt, "dataset") else coco_gt


def person_category(dataset: Mapping[str, Any]) -> Mapping[str, Any]:
    """The category that carries key points (named ``person`` in our datasets)."""
    for cat in dataset["categories"]:
        if cat.get("keypoints"):
            return cat
    raise ValueError("dataset has no category with 'keypoints'; expected a COCO key-points dataset")


def collect_visibility_samples(
    predictions: Mapping[int, Prediction],
    coco_gt: Any,
    sigmas: Sequence[float] | None = None,
    kpt_map: Sequence[int] | None = None,
    match_threshold: float = 0.5,
    features: bool | str = False,
) -> VisibilitySamples:
    """Pair ground truth with predictions, image by image, and return per-point samples.

    ``predictions``: image id -> Prediction (images absent here are skipped). ``coco_gt``: a
    pycocotools ``COCO`` or the parsed ``annotations.json``. ``sigmas``: OKS sigmas in dataset
    order (default: the known schema for the dataset's names). ``kpt_map[j]``: index in the
    prediction of dataset point ``j`` (default identity). Crowd regions and persons with no
    labelled point (``num_keypoints == 0``, COCO's unlabelled people) are left out. With
    ``features`` (True: the current layout, or a ``service.confcal`` layout name) the rows also
    carry what ``exporter.confcal_fit`` fits on (see ``VisibilitySamples``).
    """
    data = _gt_as_dict(coco_gt)
    cat = person_category(data)
    k = len(cat["keypoints"])
    sig = np.asarray(sigmas if sigmas is not None else KeypointSchema.for_names(cat["keypoints"]).sigmas,
                     dtype=np.float64)
    kmap = np.asarray(kpt_map if kpt_map is not None else range(k), dtype=np.int64)
    by_image: dict[int, list[Mapping[str, Any]]] = {}
    for ann in data["annotations"]:
        if ann.get("category_id") == cat["id"] and not ann.get("iscrowd", 0) and _labelled(ann):
            by_image.setdefault(int(ann["image_id"]), []).append(ann)

    cols: dict[str, list[np.ndarray]] = {n: [] for n in ("gt", "m", "v", "k", "matched", "pred", "f", "vm", "img")}
    layout = features if isinstance(features, str) else FEATURES
    nfeat = feature_count(k, layout)
    flag_of = {"visible": 2, "occluded": 1, "outside": 0}
    for image_id, pred in predictions.items():
        anns = by_image.get(int(image_id), [])
        if not anns:
            continue
        gt_kpts = np.array([a["keypoints"] for a in anns], dtype=np.float64).reshape(len(anns), k, 3)
        gt_boxes = np.array([a["bbox"] for a in anns], dtype=np.float64)
        gt_areas = np.array([a.get("area", a["bbox"][2] * a["bbox"][3]) for a in anns], dtype=np.float64)
        persons = pred.persons
        pr_kpts = np.array([[(p.keypoints[i].x, p.keypoints[i].y) for i in kmap] for p in persons],
                           dtype=np.float64).reshape(len(persons), k, 2)
        pr_boxes = np.array([p.box for p in persons], dtype=np.float64).reshape(len(persons), 4)
        pairs = match_persons(gt_kpts, gt_boxes, gt_areas, pr_kpts, pr_boxes, sig, match_threshold)
        feats = person_features(persons, pred.width, pred.height, kmap, layout) if features else None
        for g in range(len(anns)):
            m = np.zeros(k, np.float32)
            v = np.zeros(k, np.float32)
            pf = np.zeros(k, np.int8)
            p_idx = pairs.get(g)
            if p_idx is not None:
                kps = [persons[p_idx].keypoints[i] for i in kmap]
                m = np.array([kp.main_conf for kp in kps], np.float32)
                v = np.array([kp.visible_conf for kp in kps], np.float32)
                pf = np.array([flag_of[kp.visibility] for kp in kps], np.int8)
            cols["gt"].append(gt_kpts[g, :, 2].astype(np.int8))
            cols["m"].append(m)
            cols["v"].append(v)
            cols["k"].append(np.arange(k, dtype=np.int32))
            cols["matched"].append(np.full(k, p_idx is not None))
            cols["pred"].append(pf)
            if feats is not None:
                cols["f"].append(feats[p_idx] if p_idx is not None else np.zeros((k, nfeat)))
                cols["vm"].append(np.full(k, p_idx is not None and persons[p_idx].visible_match_conf > 0))
                cols["img"].append(np.full(k, int(image_id), np.int64))

    def cat_or_empty(key: str, dtype: Any) -> np.ndarray:
        return np.concatenate(cols[key]).astype(dtype) if cols[key] else np.zeros(0, dtype)

    return VisibilitySamples(
        gt_flag=cat_or_empty("gt", np.int8), main_conf=cat_or_empty("m", np.float32),
        visible_conf=cat_or_empty("v", np.float32), kpt_index=cat_or_empty("k", np.int32),
        matched=cat_or_empty("matched", bool), pred_flag=cat_or_empty("pred", np.int8),
        features=(np.concatenate(cols["f"]) if cols["f"] else np.zeros((0, nfeat))) if features else None,
        vis_matched=cat_or_empty("vm", bool) if features else None,
        image_id=cat_or_empty("img", np.int64) if features else None,
        layout=layout,
    )


def _labelled(ann: Mapping[str, Any]) -> bool:
    n = ann.get("num_keypoints")
    if n is None:
        n = int(np.count_nonzero(np.asarray(ann["keypoints"])[2::3]))
    return int(n) > 0


def apply_rule(main_conf: np.ndarray, visible_conf: np.ndarray, t_main: float | np.ndarray,
               t_visible: float | np.ndarray) -> np.ndarray:
    """Visibility flags ``int8 [N]`` (2/1/0) for confidences ``[N]`` and thresholds
    (scalars or ``[N]`` arrays, e.g. per-point thresholds gathered by key point index)."""
    above = main_conf > t_main
    return np.where(above, np.where(visible_conf > t_visible, 2, 1), 0).astype(np.int8)


def _accuracy_grid(gt: np.ndarray, m: np.ndarray, v: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Accuracy ``[G_main, G_visible]`` of the rule over samples, for every grid pair."""
    acc = np.zeros((len(grid), len(grid)))
    if len(gt) == 0:
        return acc
    for i, tm in enumerate(grid):
        above = m > tm
        out_ok = np.count_nonzero(~above & (gt == 0))
        vis = above[None, :] & (v[None, :] > grid[:, None])  # [G_visible, N]
        vis_ok = np.count_nonzero(vis & (gt == 2)[None, :], axis=1)
        occ_ok = np.count_nonzero(above[None, :] & ~vis & (gt == 1)[None, :], axis=1)
        acc[i] = (out_ok + vis_ok + occ_ok) / len(gt)
    return acc


def _best(acc: np.ndarray, grid: np.ndarray) -> tuple[float, float, float]:
    """Best grid pair; ties go to the pair nearest the reference (0.6, 0.6)."""
    dist = (grid[:, None] - REFERENCE_THRESHOLD) ** 2 + (grid[None, :] - REFERENCE_THRESHOLD) ** 2
    best = acc.max()
    cand = np.argwhere(np.isclose(acc, best, rtol=0, atol=1e-12))
    i, j = min(cand, key=lambda ij: dist[ij[0], ij[1]])
    return float(grid[i]), float(grid[j]), float(best)


def _accuracy(gt: np.ndarray, m: np.ndarray, v: np.ndarray, tm: float, tv: float) -> float:
    return float(np.mean(apply_rule(m, v, tm, tv) == gt)) if len(gt) else float("nan")


def calibrate_thresholds(
    samples: VisibilitySamples,
    kpt_count: int,
    grid: np.ndarray = np.linspace(0.05, 0.95, 19),
    per_keypoint: bool = True,
    min_points: int = 30,
) -> dict[str, Any]:
    """Choose ``main`` and ``visible`` thresholds that maximise 3-class visibility accuracy.

    Accuracy is over all samples (unmatched points count as predicted outside at any
    threshold). The global pair is searched first; with ``per_keypoint`` every key point
    with at least ``min_points`` matched samples gets its own pair, the others fall back to
    the global pair. Returns a JSON-ready dict::

        {"main": [K floats], "visible": [K floats], "method": str,
         "global": {"main", "visible", "accuracy", "reference_accuracy", "points"},
         "per_keypoint": [{"index", "main", "visible", "accuracy", "reference_accuracy",
                           "points", "matched_points", "fallback"}] * K}

    ``reference_accuracy`` is the accuracy at the fixed reference 0.6 / 0.6.
    """
    grid = np.asarray(grid, dtype=np.float64)
    gt, m, v, kidx = samples.gt_flag, samples.main_conf, samples.visible_conf, samples.kpt_index
    g_main, g_vis, g_acc = _best(_accuracy_grid(gt, m, v, grid), grid)
    ref = REFERENCE_THRESHOLD
    result: dict[str, Any] = {
        "global": {"main": g_main, "visible": g_vis, "accuracy": g_acc if len(gt) else float("nan"),
                   "reference_accuracy": _accuracy(gt, m, v, ref, ref), "points": int(len(gt))},
        "per_keypoint": [],
    }
    mains, visibles = [], []
    for k in range(kpt_count):
        sel = kidx == k
        n_matched = int(np.count_nonzero(sel & samples.matched))
        gk, mk, vk = gt[sel], m[sel], v[sel]
        fallback = not per_keypoint or n_matched < min_points
        if fallback:
            tm, tv = g_main, g_vis
            acc = _accuracy(gk, mk, vk, tm, tv)
        else:
            tm, tv, acc = _best(_accuracy_grid(gk, mk, vk, grid), grid)
        mains.append(tm)
        visibles.append(tv)
        result["per_keypoint"].append({
            "index": k, "main": tm, "visible": tv, "accuracy": acc,
            "reference_accuracy": _accuracy(gk, mk, vk, ref, ref),
            "points": int(np.count_nonzero(sel)), "matched_points": n_matched, "fallback": fallback,
        })
    result["main"], result["visible"] = mains, visibles
    own = sum(1 for r in result["per_keypoint"] if not r["fallback"])
    result["method"] = (f"grid search {grid[0]:.2f}..{grid[-1]:.2f} ({len(grid)} steps) maximising 3-class "
                        f"visibility accuracy over {len(gt)} points; {own}/{kpt_count} key points with "
                        f">= {min_points} matched points have their own pair, the rest use the global pair")
    log.info("calibrated thresholds: global main=%.2f visible=%.2f accuracy=%.4f (reference 0.6/0.6: %.4f)",
             g_main, g_vis, result["global"]["accuracy"], result["global"]["reference_accuracy"])
    return result
