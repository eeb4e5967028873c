"""COCO metrics over ``Prediction`` records: pycocotools wrappers and the visibility confusion.

- ``keypoint_ap``: pycocotools ``COCOeval(iouType="keypoints")`` with the caller's OKS sigmas
  (the bundle's); the result score is the person confidence, key points as predicted (the
  location estimate also for ``outside`` points: OKS measures localisation only).
- ``head_box_ap``: pycocotools ``COCOeval(iouType="bbox")`` restricted to the head category.
- ``visibility_report``: 3-class confusion matrix (visible / occluded / outside) over ground
  truth points, from ``VisibilitySamples``.

pycocotools prints to stdout; its output is captured and logged at DEBUG.
"""
from __future__ import annotations

import contextlib
import io
import logging
from typing import Any, Mapping, Sequence

import numpy as np

from service.record import Prediction

from .calibrate import VisibilitySamples

log = logging.getLogger(__name__)

VISIBILITY_LABELS = ("visible", "occluded", "outside")
_FLAG_ROW = {2: 0, 1: 1, 0: 2}  # flag -> row/column in VISIBILITY_LABELS order


@contextlib.contextmanager
def _quiet():
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        yield
    if buf.getvalue().strip():
        log.debug("pycocotools: %s", buf.getvalue().strip())


def load_coco(data: Mapping[str, Any]) -> Any:
    """A pycocotools ``COCO`` index over an already parsed dataset dict."""
    from pycocotools.coco import COCO

    with _quiet():
        coco = COCO()
        coco.dataset = dict(data)
        coco.createIndex()
    return coco


def keypoint_results(
    predictions: Mapping[int, Prediction], category_id: int, kpt_map: Sequence[int]
) -> list[dict[str, Any]]:
    """COCO key point results: one per predicted person, key points in dataset order."""
    out = []
    for image_id, pred in predictions.items():
        for p in pred.persons:
            kps = []
            for i in kpt_map:
                kp = p.keypoints[i]
                kps += [float(kp.x), float(kp.y), 1.0]
            out.append({"image_id": int(image_id), "category_id": category_id, "keypoints": kps,
                        "score": float(p.conf)})
    return out


def head_results(predictions: Mapping[int, Prediction], category_id: int) -> list[dict[str, Any]]:
    """COCO bbox results (x, y, w, h in pixels) for every predicted head."""
    out = []
    for image_id, pred in predictions.items():
        for h in pred.heads:
            x1, y1, x2, y2 = h.box
            out.append({"image_id": int(image_id), "category_id": category_id,
                        "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(h.conf)})
    return out


def _run_cocoeval(coco_gt: Any, results: list[dict[str, Any]], iou_type: str, category_id: int,
                  image_ids: Sequence[int], sigmas: Sequence[float] | None = None) -> tuple[float, float]:
    """(AP over IoU/OKS 0.50:0.95, AP at 0.50); 0.0 for both when there is no result."""
    from pycocotools.cocoeval import COCOeval

    if not results:
        return 0.0, 0.0
    with _quiet():
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.params.catIds = [category_id]
        ev.params.imgIds = sorted(int(i) for i in image_ids)
        if sigmas is not None:
            ev.params.kpt_oks_sigmas = np.asarray(sigmas, dtype=np.float64)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # COCOeval reports -1 when the ground truth has no instance in the evaluated images.
    return max(float(ev.stats[0]), 0.0), max(float(ev.stats[1]), 0.0)


def keypoint_ap(coco_gt: Any, predictions: Mapping[int, Prediction], category_id: int,
                kpt_map: Sequence[int], sigmas: Sequence[float]) -> dict[str, float]:
    """``{"oks_ap": AP@OKS .50:.95, "oks_ap50": AP@OKS .50}`` over the predicted images."""
    res = keypoint_results(predictions, category_id, kpt_map)
    ap, ap50 = _run_cocoeval(coco_gt, res, "keypoints", category_id, list(predictions), sigmas)
    return {"oks_ap": ap, "oks_ap50": ap50}


def head_box_ap(coco_gt: Any, predictions: Mapping[int, Prediction], category_id: int) -> dict[str, float]:
    """``{"map50_95", "map50"}`` of head boxes over the predicted images."""
    res = head_results(predictions, category_id)
    ap, ap50 = _run_cocoeval(coco_gt, res, "bbox", category_id, list(predictions))
    return {"map50_95": ap, "map50": ap50}


def confusion_matrix(gt_flag: np.ndarray, pred_flag: np.ndarray) -> np.ndarray:
    """``int64 [3, 3]`` counts; rows = ground truth, columns = prediction, both in
    ``VISIBILITY_LABELS`` order (visible, occluded, outside)."""
    cm = np.zeros((3, 3), dtype=np.int64)
    rows = np.vectorize(_FLAG_ROW.get, otypes=[np.int64])(gt_flag) if len(gt_flag) else np.zeros(0, np.int64)
    cols = np.vectorize(_FLAG_ROW.get, otypes=[np.int64])(pred_flag) if len(pred_flag) else np.zeros(0, np.int64)
    np.add.at(cm, (rows, cols), 1)
    return cm


def visibility_report(samples: VisibilitySamples, names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, confusion (rows = truth), per-class recall and per key point accuracy.

    ``names`` are the dataset's key point names (index = ``samples.kpt_index``). Classes or
    key points without any ground-truth point get ``None``. ``accuracy`` counts every
    ground-truth point (a person no prediction matches has all its points predicted
    ``outside``); ``accuracy_matched`` counts only the points of matched people, which
    separates the visibility rule from detection and localisation misses.
    """
    cm = confusion_matrix(samples.gt_flag, samples.pred_flag)
    total = int(cm.sum())
    correct = samples.gt_flag == samples.pred_flag
    recall = {lab: (float(cm[i, i] / cm[i].sum()) if cm[i].sum() else None)
              for i, lab in enumerate(VISIBILITY_LABELS)}
    per_kpt = {}
    for k, name in enumerate(names):
        sel = samples.kpt_index == k
        per_kpt[name] = float(correct[sel].mean()) if sel.any() else None
    return {
        "accuracy": float(correct.mean()) if total else None,
        "points": total,
        "matched_points": int(np.count_nonzero(samples.matched)),
        "accuracy_matched": (float(correct[samples.matched].mean()) if np.count_nonzero(samples.matched) else None),
        "labels": list(VISIBILITY_LABELS),
        "confusion": cm.tolist(),
        "recall": recall,
        "per_keypoint_accuracy": per_kpt,
    }
