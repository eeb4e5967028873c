"""Fitting the confidence calibration (numpy) and ``annotator calibrate``."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from exporter.calibrate import VisibilitySamples
from exporter.confcal_fit import FitSettings, calibrated_samples, fit_confidence_calibration, fit_mlp
from service.cli_daemon import DEMO_BUNDLE
from service.confcal import FEATURES, FEATURES_V1, feature_count


def test_fit_mlp_learns_a_nonlinear_rule() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3000, 3))
    y = ((x[:, 0] > 0) ^ (x[:, 1] > 0)).astype(float)  # XOR: no linear model gets this
    mlp, report = fit_mlp(x, y, np.arange(3000) // 10, FitSettings(max_steps=1500))
    xt = rng.normal(size=(1000, 3))
    acc = np.mean((mlp(xt) > 0.5) == ((xt[:, 0] > 0) ^ (xt[:, 1] > 0)))
    assert acc > 0.9, report
    assert report["held_out_points"] == 600 and report["best_step"] > 0


def _samples(n_persons: int, k: int = 3, seed: int = 0) -> VisibilitySamples:
    """Rows of ``n_persons`` matched persons whose visibility is decided by the point's height
    in its box (top: visible, middle: occluded, bottom: outside); the raw confidences are noise."""
    rng = np.random.default_rng(seed)
    n = n_persons * k
    f = np.zeros((n, feature_count(k)))
    f[:, 0], f[:, 1] = rng.normal(size=n), rng.normal(size=n)
    f[np.arange(n), 2 + np.tile(np.arange(k), n_persons)] = 1
    y_in_box = rng.uniform(0, 1, n)
    f[:, 2 + k + 1] = y_in_box
    gt = np.where(y_in_box < 0.4, 2, np.where(y_in_box < 0.8, 1, 0)).astype(np.int8)
    m = rng.uniform(0, 1, n).astype(np.float32)
    return VisibilitySamples(gt, m, rng.uniform(0, 1, n).astype(np.float32), np.tile(np.arange(k), n_persons),
                             np.ones(n, bool), np.zeros(n, np.int8), f, np.ones(n, bool),
                             np.repeat(np.arange(n_persons) // 2, k))


def test_calibration_recovers_what_the_raw_confidences_miss() -> None:
    s = _samples(1500)
    cal, report = fit_confidence_calibration(s, FitSettings(max_steps=800))
    assert cal is not None, report
    # each calibrator: three perceptrons side by side in one (their mean logit)
    assert report["in_view"]["members"] == 3 and len(report["in_view"]["held_out_losses"]) == 3
    assert cal.in_view.weights[0].shape[1] == 3 * 64
    # 4,500 points: too few for the person context; the per-point layout, v2's first columns
    assert cal.features == FEATURES_V1 and cal.in_view.inputs == feature_count(3, FEATURES_V1) == 14
    c = calibrated_samples(s, cal)
    flags = np.where(c.main_conf > 0.5, np.where(c.visible_conf > 0.5, 2, 1), 0)
    assert np.mean(flags == s.gt_flag) > 0.9
    # unmatched rows keep 0 (predicted outside, as in the evaluation)
    s2 = VisibilitySamples(*(getattr(s, a) for a in ("gt_flag", "main_conf", "visible_conf", "kpt_index")),
                           np.arange(len(s)) % 2 == 0, s.pred_flag, s.features, s.vis_matched, s.image_id)
    s2.main_conf[1::2] = 0
    c2 = calibrated_samples(s2, cal)
    assert np.all(c2.main_conf[1::2] == 0) and np.all(c2.main_conf[::2] == c.main_conf[::2])


def test_enough_points_fit_the_person_context(monkeypatch: pytest.MonkeyPatch) -> None:
    import exporter.confcal_fit as fit

    monkeypatch.setattr(fit, "CONTEXT_MIN_POINTS", 3000)
    s = _samples(1500)
    cal, report = fit_confidence_calibration(s, FitSettings(max_steps=300, members=1))
    assert cal is not None and cal.features == FEATURES == report["features"]
    assert cal.in_view.inputs == feature_count(3) == 3 + 11 + 4 * 3
    assert cal.in_view.weights[0].shape[1] == 64  # one member: a plain perceptron
    c = calibrated_samples(s, cal)
    assert np.mean(np.where(c.main_conf > 0.5, np.where(c.visible_conf > 0.5, 2, 1), 0) == s.gt_flag) > 0.85


def test_too_few_points_skip_the_calibration() -> None:
    cal, report = fit_confidence_calibration(_samples(10))
    assert cal is None and "fewer than" in report["skipped"]
    with pytest.raises(ValueError, match="features=True"):
        fit_confidence_calibration(VisibilitySamples(*[np.zeros(0)] * 6))


@pytest.mark.slow
@pytest.mark.skipif(not (DEMO_BUNDLE / "bundle.json").is_file(), reason="no demo bundle shipped")
def test_annotator_calibrate_writes_a_new_bundle(tmp_path: Path) -> None:
    from exporter.synth import generate
    from service.bundle import load_bundle
    from service.cli import main

    data = generate(tmp_path / "cal", 50, seed=77)
    src = load_bundle(DEMO_BUNDLE)
    dst = tmp_path / "recal"
    assert main(["calibrate", str(DEMO_BUNDLE), str(data), str(dst)]) == 0
    b = load_bundle(dst)
    assert b.id != src.id and b.lineage["parent_bundle"] == src.id
    assert b.lineage["recalibrated_on"]["images"] == 50
    report = b.metrics["confidence_calibration"]
    assert report["accuracy_raw"] > 0.5
    if b.confidence_calibration is not None:  # kept only when it helped on these images
        assert report["accuracy_calibrated"] > report["accuracy_raw"]
        assert "confidence_calibration" in b.thresholds.method
    assert json.loads((DEMO_BUNDLE / "bundle.json").read_text())["id"] == src.id  # source untouched
    assert main(["calibrate", str(DEMO_BUNDLE), str(data), str(dst)]) == 2  # never over an existing bundle


@pytest.mark.skipif(not (DEMO_BUNDLE / "bundle.json").is_file(), reason="no demo bundle shipped")
def test_calibrate_refuses_a_dataset_with_another_schema(tmp_path: Path) -> None:
    from service.cli import main

    coco = {"images": [], "annotations": [], "categories": [
        {"id": 1, "name": "person", "keypoints": ["nose", "left_eye"], "skeleton": []}]}
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "annotations.json").write_text(json.dumps(coco))
    assert main(["calibrate", str(DEMO_BUNDLE), str(tmp_path / "d"), str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_calibration_predicts_in_batches_and_skips_unreadable_images(tmp_path: Path) -> None:
    from exporter.calibrate_bundle import predict_images
    from exporter.synth import generate
    from service.bundle import load_bundle
    from service.engine import Engine
    from service.imageio import read_image

    data = generate(tmp_path / "cal", 10, seed=78)  # more than one engine batch (8)
    coco = json.loads((data / "annotations.json").read_text())
    bad = coco["images"][3]
    (data / "images" / bad["file_name"]).write_bytes(b"not an image")
    bundle = load_bundle(DEMO_BUNDLE)
    preds = predict_images(bundle, coco, data / "images")
    assert sorted(preds) == sorted(im["id"] for im in coco["images"] if im["id"] != bad["id"])
    engine = Engine(bundle)
    for im in coco["images"][8:]:  # the second batch, against one image per call
        alone = engine.predict([read_image(data / "images" / im["file_name"])])[0]
        got = preds[im["id"]]
        assert len(got.persons) == len(alone.persons)
        for a, b in zip(got.persons, alone.persons):
            assert np.allclose(a.box, b.box, atol=1e-2)
            assert np.allclose([k.visible_conf for k in a.keypoints], [k.visible_conf for k in b.keypoints], atol=1e-3)


def test_keep_or_drop_is_decided_on_held_out_images() -> None:
    from exporter.calibrate_bundle import HELD_OUT, held_out_gain, held_out_images

    s = _samples(1500)
    held = held_out_images(s.image_id)
    ids = np.unique(s.image_id)
    assert len(np.unique(s.image_id[held])) == round(HELD_OUT * len(ids))
    for i in ids:  # whole images: all of an image's rows on one side
        assert len(set(held[s.image_id == i].tolist())) == 1
    assert np.array_equal(held, held_out_images(s.image_id)) and not np.array_equal(held, held_out_images(s.image_id, seed=1))
    check = held_out_gain(s, 3)
    assert check is not None and check["held_out_images"] == round(HELD_OUT * len(ids))
    # the raw confidences are noise, the point's place in its box decides: only the calibration sees it
    assert check["accuracy_calibrated_held_out"] > 0.85 > 0.6 > check["accuracy_raw_held_out"]
    assert held_out_gain(_samples(40), 3) is None  # too few points to fit on three quarters


def test_a_calibration_that_loses_on_held_out_images_is_never_fitted_on_all(monkeypatch: pytest.MonkeyPatch) -> None:
    import exporter.calibrate_bundle as cb
    from exporter.calibrate import apply_rule

    fits: list[int] = []

    def counted(s: VisibilitySamples) -> tuple:
        fits.append(len(s))
        return fit_confidence_calibration(s, FitSettings(max_steps=300, members=1))

    monkeypatch.setattr(cb, "fit_confidence_calibration", counted)
    s = _samples(1500)  # the calibration sees what the raw confidences miss: fitted on 3/4, then on all
    cal, thr, report = cb.choose_calibration(s, 3)
    assert cal is not None and fits == [int(np.sum(~cb.held_out_images(s.image_id))), len(s)]
    assert report["accuracy_calibrated_held_out"] > report["accuracy_raw_held_out"] and "skipped" not in report
    # the raw confidences decide exactly: no calibration can beat them on held-out images, so
    # the one fit is on three quarters and the thresholds are the raw ones
    fits.clear()
    exact = VisibilitySamples(apply_rule(s.main_conf, s.visible_conf, 0.5, 0.5), *(
        getattr(s, a) for a in ("main_conf", "visible_conf", "kpt_index", "matched", "pred_flag", "features",
                                "vis_matched", "image_id")))
    cal, thr, report = cb.choose_calibration(exact, 3)
    assert cal is None and report["skipped"] == "no gain on held-out images" and len(fits) == 1
    assert report["accuracy_raw"] == pytest.approx(1.0) and thr["global"]["accuracy"] == pytest.approx(1.0)
    assert cb.choose_calibration(exact, 3, fit=False)[2] == {"skipped": "not asked"} and len(fits) == 1
