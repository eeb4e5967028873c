"""Confidence calibration: features against known geometry, the perceptron, the bundle contract,
and the engine applying it."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from service.bundle import load_bundle, write_bundle
from service.cli_daemon import DEMO_BUNDLE
from service.confcal import (
    FEATURES, FEATURES_V1, ConfidenceCalibration, Mlp, calibrate_persons, feature_count, logit, point_features,
)
from service.errors import BundleError


def _constant(logit_value: float, inputs: int) -> Mlp:
    """A perceptron that ignores its input and answers sigmoid(logit_value)."""
    return Mlp(np.zeros(inputs), np.ones(inputs), (np.zeros((inputs, 4)), np.zeros((4, 1))),
               (np.zeros(4), np.array([logit_value])))


def test_point_features_known_geometry() -> None:
    # one person, box (100, 50)-(300, 450) in a 400 x 500 image; K = 2 points
    f = point_features(np.array([[0.5, 0.9]]), np.array([[0.1, 0.0]]), np.array([[[200.0, 250.0], [100.0, 450.0]]]),
                       np.array([[100.0, 50.0, 300.0, 450.0]]), np.array([0.8]), 400, 500, FEATURES_V1)
    assert f.shape == (1, 2, feature_count(2, FEATURES_V1)) == (1, 2, 13)
    np.testing.assert_allclose(f[0, :, 0], [0.0, np.log(9.0)], atol=1e-9)  # logit(main)
    np.testing.assert_allclose(f[0, 1, 1], logit(np.array(0.0)))  # clipped, finite
    np.testing.assert_array_equal(f[0, :, 2:4], np.eye(2))  # one-hot index
    np.testing.assert_allclose(f[0, 0, 4:6], [0.5, 0.5])  # point in the box
    np.testing.assert_allclose(f[0, 1, 4:6], [0.0, 1.0])
    np.testing.assert_allclose(f[0, 0, 6:10], [0.25, 0.1, 0.5, 0.8])  # box x1, y1, w, h in the image
    np.testing.assert_allclose(f[0, 1, 10:12], [0.25, 0.9])  # point in the image
    np.testing.assert_allclose(f[0, :, 12], 0.8)  # person confidence
    assert point_features(np.zeros((0, 2)), np.zeros((0, 2)), np.zeros((0, 2, 2)), np.zeros((0, 4)),
                          np.zeros(0), 10, 10, FEATURES_V1).shape == (0, 2, 13)


def test_person_context_features_known_geometry() -> None:
    # two persons, K = 2: every point of a person carries the person's four values per point
    main = np.array([[0.5, 0.9], [0.2, 0.8]])
    vis = np.array([[0.1, 0.5], [0.5, 0.5]])
    xy = np.array([[[200.0, 250.0], [100.0, 450.0]], [[10.0, 10.0], [20.0, 30.0]]])
    boxes = np.array([[100.0, 50.0, 300.0, 450.0], [0.0, 0.0, 40.0, 40.0]])
    f = point_features(main, vis, xy, boxes, np.array([0.8, 0.6]), 400, 500)
    assert f.shape == (2, 2, feature_count(2)) == (2, 2, 21)
    np.testing.assert_array_equal(f[..., :13], point_features(main, vis, xy, boxes, np.array([0.8, 0.6]), 400, 500,
                                                              FEATURES_V1))
    for point in range(2):
        np.testing.assert_allclose(f[0, point, 13:], [0.0, np.log(9.0), logit(np.array(0.1)), 0.0,  # main, visible
                                                      0.5, 0.0, 0.5, 1.0])  # x, y in the box of both points
        np.testing.assert_allclose(f[1, point, 13:], [logit(np.array(0.2)), logit(np.array(0.8)), 0.0, 0.0,
                                                      0.25, 0.5, 0.25, 0.75])


def test_average_of_perceptrons_is_the_mean_logit() -> None:
    rng = np.random.default_rng(3)

    def member(depth: int) -> Mlp:
        sizes = [4, *([5] * depth), 1]
        return Mlp(rng.normal(size=4), rng.uniform(0.5, 2, 4),
                   tuple(rng.normal(size=(a, b)) for a, b in zip(sizes[:-1], sizes[1:])),
                   tuple(rng.normal(size=b) for b in sizes[1:]))

    x = rng.normal(size=(9, 4))
    for depth in (1, 2):
        members = [member(depth) for _ in range(3)]
        avg = Mlp.average(members)
        np.testing.assert_allclose(avg.logits(x), np.mean([m.logits(x) for m in members], axis=0), rtol=1e-10)
    with pytest.raises(ValueError, match="same inputs and depth"):
        Mlp.average([member(1), member(2)])


def test_mlp_forward_and_json_round_trip() -> None:
    rng = np.random.default_rng(0)
    m = Mlp(rng.normal(size=3), rng.uniform(0.5, 2, 3), (rng.normal(size=(3, 5)), rng.normal(size=(5, 1))),
            (rng.normal(size=5), rng.normal(size=1)))
    x = rng.normal(size=(7, 3))
    h = np.maximum(((x - m.mean) / m.scale) @ m.weights[0] + m.biases[0], 0) @ m.weights[1] + m.biases[1]
    np.testing.assert_allclose(m(x), 1 / (1 + np.exp(-h[:, 0])), rtol=1e-12)
    back = Mlp.from_json(json.loads(json.dumps(m.to_json())), "in_view")
    np.testing.assert_allclose(back(x), m(x), atol=1e-5)  # stored to 6 decimals


@pytest.mark.parametrize("change,message", [
    (lambda d: d["in_view"].update(scale=[0.0] * 21), "positive"),
    (lambda d: d["in_view"]["weights"].pop(), "as many weight matrices"),
    (lambda d: d["visible"].update(mean=[0.0] * 5, scale=[1.0] * 5), "expected 4 x 1"),
    (lambda d: d.update(features="other"), "not supported"),
    (lambda d: d["visible"].update(biases=[[0.0] * 4, ["x"]]), "expected numbers"),
    (lambda d: d.pop("visible"), "'in_view' and 'visible'"),
])
def test_bad_calibration_is_refused_with_a_message(change, message: str) -> None:
    k = 10  # feature_count(10, FEATURES_V1) == 21
    d = ConfidenceCalibration(_constant(0.0, 21), _constant(0.0, 21), FEATURES_V1).to_json()
    change(d)
    with pytest.raises(BundleError, match=message.replace("expected 4 x 1", "layer 0")):
        ConfidenceCalibration.from_json(d, k)


def test_wrong_feature_count_for_the_schema() -> None:
    d = ConfidenceCalibration(_constant(0.0, 21), _constant(0.0, 21), FEATURES_V1).to_json()
    with pytest.raises(BundleError, match="takes 21 features, expected 30 for 19 key points"):
        ConfidenceCalibration.from_json(d, 19)
    d["features"] = FEATURES  # the same perceptrons under the context layout: 19 + 11 + 4 x 19 inputs
    with pytest.raises(BundleError, match="takes 21 features, expected 106 for 19 key points"):
        ConfidenceCalibration.from_json(d, 19)
    del d["features"]  # written before layouts were named: the per-point layout
    assert ConfidenceCalibration.from_json(d, 10).features == FEATURES_V1


def test_apply_keeps_unmatched_persons_never_visible() -> None:
    cal = ConfidenceCalibration(_constant(2.0, feature_count(3)), _constant(1.0, feature_count(3)))
    main, vis = calibrate_persons(cal, np.full((2, 3), 0.3), np.full((2, 3), 0.3), [True, False],
                                  np.zeros((2, 3, 2)), np.array([[0, 0, 10, 10]] * 2, float), np.ones(2), 20, 20)
    np.testing.assert_allclose(main, 1 / (1 + np.exp(-2.0)), rtol=1e-6)
    np.testing.assert_allclose(vis[0], 1 / (1 + np.exp(-2.0)) / (1 + np.exp(-1.0)), rtol=1e-6)  # P(in view) P(vis | in view)
    np.testing.assert_array_equal(vis[1], 0.0)


needs_demo = pytest.mark.skipif(not (DEMO_BUNDLE / "bundle.json").is_file(), reason="no demo bundle shipped")


@needs_demo
def test_bundle_round_trip_and_engine_uses_the_calibration(tmp_path: Path) -> None:
    """A bundle whose calibration says 'in view, not visible' everywhere: every point of every
    person inside the frame becomes occluded, and the records carry the calibrated confidences."""
    from service.engine import Engine
    from service.imageio import read_image

    dst = tmp_path / "b"
    shutil.copytree(DEMO_BUNDLE, dst)
    base = load_bundle(dst)
    f = feature_count(base.keypoints.count)
    cal = ConfidenceCalibration(_constant(4.0, f), _constant(-4.0, f), FEATURES, "test")
    write_bundle(dataclasses.replace(base, confidence_calibration=cal,
                                     thresholds=dataclasses.replace(base.thresholds, main=(0.5,) * 19, visible=(0.5,) * 19)))
    loaded = load_bundle(dst)
    assert loaded.confidence_calibration is not None and loaded.confidence_calibration.method == "test"
    img = read_image(next((DEMO_BUNDLE.parent / "samples").glob("*.jpg")))
    raw = Engine(base).predict([img])[0]
    got = Engine(loaded).predict([img])[0]
    assert len(got.persons) == len(raw.persons) > 0
    for p, r in zip(got.persons, raw.persons):
        assert p.box == r.box
        # occluded, except the points the model put beyond the frame (clipped to its edge): outside
        for kp in p.keypoints:
            on_edge = kp.x in (0.0, float(img.width)) or kp.y in (0.0, float(img.height))
            assert kp.visibility == "occluded" or (kp.visibility == "outside" and on_edge), kp
        assert sum(kp.visibility == "occluded" for kp in p.keypoints) > len(p.keypoints) // 2
        assert all(abs(kp.main_conf - 1 / (1 + np.exp(-4.0))) < 1e-5 for kp in p.keypoints)
    # main_only bundles cannot carry one
    d = json.loads((dst / "bundle.json").read_text())
    d["visibility_mode"] = "main_only"
    del d["models"]["pose_visible"]
    (dst / "bundle.json").write_text(json.dumps(d))
    with pytest.raises(BundleError, match="needs visibility_mode 'two_model'"):
        load_bundle(dst)
