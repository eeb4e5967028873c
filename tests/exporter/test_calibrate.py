"""exporter.calibrate: threshold search on samples with a known best threshold, and samples
collected from hand-made predictions against hand-made ground truth."""
from __future__ import annotations

import numpy as np
import pytest

from exporter.calibrate import VisibilitySamples, apply_rule, calibrate_thresholds, collect_visibility_samples
from service.keypoints import COCO17_NAMES, COCO17_SIGMAS
from service.record import Keypoint, Person, Prediction


def _samples(m: np.ndarray, v: np.ndarray, gt: np.ndarray, k: np.ndarray) -> VisibilitySamples:
    return VisibilitySamples(gt.astype(np.int8), m.astype(np.float32), v.astype(np.float32),
                             k.astype(np.int32), np.ones(len(gt), bool), np.zeros(len(gt), np.int8))


def test_global_threshold_recovered_exactly() -> None:
    rng = np.random.default_rng(0)
    m, v = rng.uniform(size=4000), rng.uniform(size=4000)
    gt = apply_rule(m, v, 0.3, 0.75)
    res = calibrate_thresholds(_samples(m, v, gt, np.zeros(4000)), kpt_count=1, per_keypoint=False)
    assert (res["global"]["main"], res["global"]["visible"]) == pytest.approx((0.3, 0.75))
    assert res["global"]["accuracy"] == 1.0
    assert res["global"]["reference_accuracy"] == pytest.approx(np.mean(apply_rule(m, v, 0.6, 0.6) == gt))
    assert res["global"]["reference_accuracy"] < 0.9


def test_per_keypoint_thresholds_and_fallback() -> None:
    rng = np.random.default_rng(1)
    truth = {0: (0.2, 0.8), 1: (0.5, 0.4)}
    parts = []
    for k, (tm, tv) in truth.items():
        m, v = rng.uniform(size=1500), rng.uniform(size=1500)
        parts.append((m, v, apply_rule(m, v, tm, tv), np.full(1500, k)))
    m, v = rng.uniform(size=10), rng.uniform(size=10)  # key point 2: too few points
    parts.append((m, v, apply_rule(m, v, 0.9, 0.1), np.full(10, 2)))
    s = _samples(*(np.concatenate(c) for c in zip(*parts)))
    res = calibrate_thresholds(s, kpt_count=4, min_points=30)
    for k, (tm, tv) in truth.items():
        row = res["per_keypoint"][k]
        assert (row["main"], row["visible"], row["fallback"]) == (pytest.approx(tm), pytest.approx(tv), False)
        assert row["accuracy"] == 1.0 and row["points"] == 1500
    for k in (2, 3):  # few points / no points: the global pair
        row = res["per_keypoint"][k]
        assert row["fallback"] and (row["main"], row["visible"]) == (res["global"]["main"], res["global"]["visible"])
    assert res["main"][0] == pytest.approx(0.2) and res["visible"][1] == pytest.approx(0.4)
    assert res["per_keypoint"][3]["points"] == 0 and np.isnan(res["per_keypoint"][3]["accuracy"])


def test_ties_prefer_the_reference_pair() -> None:
    # Every point is visible with confidences 1.0: any pair is perfect, 0.6/0.6 is chosen.
    s = _samples(np.ones(50), np.ones(50), np.full(50, 2), np.zeros(50))
    res = calibrate_thresholds(s, kpt_count=1)
    assert (res["global"]["main"], res["global"]["visible"]) == pytest.approx((0.6, 0.6))


def test_empty_samples() -> None:
    empty = _samples(np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0))
    res = calibrate_thresholds(empty, kpt_count=2)
    assert res["global"]["points"] == 0 and all(r["fallback"] for r in res["per_keypoint"])
    assert len(res["main"]) == 2


def _gt_dataset() -> dict:
    def person(ann_id: int, xy: tuple[float, float], flags: list[int], **extra: object) -> dict:
        kps = []
        for k, f in enumerate(flags):
            kps += [xy[0] + 3 * k, xy[1] + 2 * k, f] if f else [0, 0, 0]
        return {"id": ann_id, "image_id": 1, "category_id": 1, "bbox": [xy[0], xy[1], 60, 40], "area": 2400.0,
                "keypoints": kps, "num_keypoints": sum(1 for f in flags if f), "iscrowd": 0, **extra}

    flags_a = [2] * 10 + [1] * 4 + [0] * 3
    return {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 640, "height": 480}],
        "categories": [{"id": 1, "name": "person", "keypoints": list(COCO17_NAMES), "skeleton": []}],
        "annotations": [
            person(1, (100, 100), flags_a),
            person(2, (400, 300), [2] * 17),  # nobody predicted here: all outside
            person(3, (10, 10), [0] * 17),  # unlabelled person: left out
            person(4, (200, 200), [2] * 17, iscrowd=1),  # crowd: left out
        ],
    }


def _predicted(xy: tuple[float, float], conf: float, vis: list[str], m: float = 0.9, v: float = 0.8) -> Person:
    kps = tuple(Keypoint(xy[0] + 3 * k, xy[1] + 2 * k, m, v, s) for k, s in enumerate(vis))
    return Person((xy[0], xy[1], xy[0] + 60, xy[1] + 40), conf, kps)


def test_collect_samples_matches_one_to_one() -> None:
    vis = ["visible"] * 8 + ["occluded"] * 6 + ["outside"] * 3
    pred = Prediction(640, 480, persons=(
        _predicted((100, 100), 0.9, vis),
        _predicted((101, 100), 0.8, ["visible"] * 17),  # duplicate of the same person: unmatched
        _predicted((10, 400), 0.7, ["visible"] * 17),  # nobody there
    ))
    s = collect_visibility_samples({1: pred}, _gt_dataset(), sigmas=COCO17_SIGMAS)
    assert len(s) == 34  # two evaluated GT persons x 17
    assert s.matched.tolist() == [True] * 17 + [False] * 17
    np.testing.assert_array_equal(s.pred_flag[:17], [2] * 8 + [1] * 6 + [0] * 3)
    np.testing.assert_array_equal(s.pred_flag[17:], 0)
    assert s.main_conf[:17] == pytest.approx(0.9) and not s.main_conf[17:].any()
    np.testing.assert_array_equal(s.kpt_index, list(range(17)) * 2)


def test_collect_samples_skips_images_without_predictions() -> None:
    s = collect_visibility_samples({}, _gt_dataset())
    assert len(s) == 0 and s.gt_flag.dtype == np.int8
