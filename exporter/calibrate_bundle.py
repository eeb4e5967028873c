"""Calibrate a bundle's visibility decision on labelled images through the daemon's engine.

``calibrate_bundle`` runs the bundle *without* its confidence calibration over labelled images
(the validation split in ``annotator train``, or any COCO key-points dataset with
``annotator calibrate``), pairs predictions with the ground truth (``exporter.calibrate``),
then

1. fits the confidence calibration (``exporter.confcal_fit``; two-model bundles only, and only
   with enough matched points), and keeps it when it raises the accuracy on images it did not
   see: a calibration and both threshold sets are fitted on 75 % of the images (seeded, whole
   images) and compared on the other 25 %; only when the calibration wins there is it fitted
   on all images and kept (in-sample accuracy is no guide: the person-context calibration reads
   0.90 in-sample on 100 images and 0.81 on a test set);
2. chooses the per-key-point ``main``/``visible`` thresholds for the confidences the engine will
   then produce (calibrated or raw) by grid search (``calibrate_thresholds``).

``annotator calibrate SRC DATASET DST`` writes the result as a new bundle (new id; the lineage
names SRC as parent): the way to adapt a bundle to a new camera or car from reviewed images
without retraining, and how ``annotator learning-curve --calibration-count N`` calibrates on a
fresh synthetic set.

Runtime + numpy only: no torch.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from service.bundle import Bundle, load_bundle, new_bundle_id, write_bundle
from service.confcal import ConfidenceCalibration

from .calibrate import (
    VisibilitySamples, apply_rule, calibrate_thresholds, collect_visibility_samples, person_category,
)
from .confcal_fit import calibrated_samples, fit_confidence_calibration

log = logging.getLogger(__name__)


def _accuracy(s: VisibilitySamples, cal: Mapping[str, Any]) -> float:
    k = s.kpt_index
    flags = apply_rule(s.main_conf, s.visible_conf, np.asarray(cal["main"])[k], np.asarray(cal["visible"])[k])
    return float(np.mean(flags == s.gt_flag)) if len(s) else float("nan")


HELD_OUT = 0.25  # share of the images the keep-or-drop decision is made on


def _take(s: VisibilitySamples, rows: np.ndarray) -> VisibilitySamples:
    """The samples' ``rows`` (a boolean mask), every per-row array cut alike."""
    cut = {f.name: (v[rows] if isinstance(v := getattr(s, f.name), np.ndarray) else v)
           for f in dataclasses.fields(s)}
    return VisibilitySamples(**cut)


def held_out_images(image_id: np.ndarray, share: float = HELD_OUT, seed: int = 0) -> np.ndarray:
    """Row mask of the held-out images: ``share`` of the distinct image ids, seeded."""
    uniq = np.unique(image_id)
    rng = np.random.default_rng(seed)
    held = rng.choice(uniq, size=max(1, int(round(len(uniq) * share))), replace=False) if len(uniq) > 1 else uniq[:0]
    return np.isin(image_id, held)


def held_out_gain(samples: VisibilitySamples, k: int) -> dict[str, Any] | None:
    """Fit a calibration and both threshold sets on the kept images, compare on the held-out ones.

    Returns the two held-out accuracies, or None when the kept images are too few to fit one.
    """
    held = held_out_images(samples.image_id)
    fit_part, test_part = _take(samples, ~held), _take(samples, held)
    cal, _ = fit_confidence_calibration(fit_part)
    if cal is None or not len(test_part):
        return None
    raw = _accuracy(test_part, calibrate_thresholds(fit_part, k))
    calibrated = _accuracy(calibrated_samples(test_part, cal), calibrate_thresholds(calibrated_samples(fit_part, cal), k))
    return {"held_out_images": int(len(np.unique(samples.image_id[held]))), "accuracy_raw_held_out": raw,
            "accuracy_calibrated_held_out": calibrated}


def choose_calibration(samples: VisibilitySamples, k: int, fit: bool = True
                       ) -> tuple[ConfidenceCalibration | None, dict[str, Any], dict[str, Any]]:
    """The confidence calibration to keep (None: none), the thresholds for what the engine will
    then produce, and the report (``bundle.metrics.confidence_calibration``).

    The keep-or-drop check on held-out images comes first, so a calibration that loses there is
    never fitted on all images. Without that check (too few points to hold any out) the
    in-sample comparison is all there is.
    """
    thr = calibrate_thresholds(samples, k)
    if not fit:
        return None, thr, {"skipped": "not asked"}
    check = held_out_gain(samples, k)
    if check is not None and check["accuracy_calibrated_held_out"] <= check["accuracy_raw_held_out"]:
        return None, thr, {"skipped": "no gain on held-out images", "accuracy_raw": _accuracy(samples, thr), **check}
    cal, report = fit_confidence_calibration(samples)
    if cal is None:
        return None, thr, report
    cs = calibrated_samples(samples, cal)
    thr_c = calibrate_thresholds(cs, k)
    report = {**report, "accuracy_raw": _accuracy(samples, thr), "accuracy_calibrated": _accuracy(cs, thr_c),
              **(check or {})}
    if check is not None or report["accuracy_calibrated"] > report["accuracy_raw"]:
        return cal, thr_c, report
    return None, thr, {**report, "skipped": "no gain on these images"}


def check_schema(bundle: Bundle, coco: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` unless the dataset's key points are the bundle's, in its order."""
    names = list(person_category(coco)["keypoints"])
    if names != list(bundle.keypoints.names):
        raise ValueError(f"the dataset's key points {names} are not the bundle's {list(bundle.keypoints.names)} "
                         f"in the same order; calibrate on a dataset with the bundle's schema")


def predict_images(bundle: Bundle, coco: Mapping[str, Any], images_dir: Path,
                   letterbox: str = "square") -> dict[int, Any]:
    """Image id -> ``Prediction`` of the bundle's engine (unreadable images are skipped)."""
    from service.engine import Engine

    from .evaluate import decoded_batches

    engine = Engine(bundle, letterbox=letterbox)
    preds = {}
    for ok, _failed, decoded in decoded_batches(list(coco["images"]), images_dir, engine.batch_size, "calibration"):
        preds.update(zip((info["id"] for _, info in ok), engine.predict(decoded) if decoded else []))
    return preds


def calibrate_bundle(bundle: Bundle, coco: Mapping[str, Any], images_dir: Path, fit_confidences: bool = True,
                     source: str = "validation", letterbox: str = "square") -> Bundle:
    """Calibrate ``bundle`` in place (its ``bundle.json`` is rewritten) on ``coco`` images; see the
    module docstring. ``source`` names the images in the bundle's ``thresholds.method``;
    ``letterbox``: the engine's (``engine.letterbox``) that the daemon will run it with."""
    from .coco_metrics import load_coco as to_cocoapi

    check_schema(bundle, coco)
    raw = dataclasses.replace(bundle, confidence_calibration=None)
    two_model = bundle.visibility_mode == "two_model" and "pose_visible" in bundle.models
    preds = predict_images(raw, coco, images_dir, letterbox)
    samples = collect_visibility_samples(preds, to_cocoapi(coco), sigmas=bundle.keypoints.sigmas,
                                         features=two_model and fit_confidences)
    cal, thr, report = choose_calibration(samples, bundle.keypoints.count, two_model and fit_confidences)
    if not two_model:
        report = {"skipped": "not a two-model bundle"}
    g = thr["global"]
    method = (f"calibrated on {len(coco['images'])} {source} images ({g['points']} points"
              f"{', rect letterbox: run with engine.letterbox = rect' if letterbox == 'rect' else ''}): "
              f"per-key-point grid search maximising 3-class visibility accuracy")
    if cal is not None:
        method += (f" over the calibrated confidences (confidence_calibration: {report['accuracy_raw']:.4f} -> "
                   f"{report['accuracy_calibrated']:.4f} on these images")
        if "accuracy_raw_held_out" in report:
            method += (f"; {report['accuracy_raw_held_out']:.4f} -> {report['accuracy_calibrated_held_out']:.4f} on "
                       f"{report['held_out_images']} images held out of a fit on the others")
        method += ")"
    else:
        method += (f"; global pair main={g['main']:.2f} visible={g['visible']:.2f} accuracy {g['accuracy']:.4f} vs "
                   f"{g['reference_accuracy']:.4f} at the reference 0.6/0.6")
    t = dataclasses.replace(bundle.thresholds, main=tuple(thr["main"]), visible=tuple(thr["visible"]), method=method)
    metrics = {**bundle.metrics, "calibration": thr, "confidence_calibration": report}
    out = dataclasses.replace(bundle, thresholds=t, metrics=metrics, confidence_calibration=cal)
    write_bundle(out)
    return load_bundle(bundle.path)


def recalibrated_copy(src: Path, annotations: Path, images_dir: Path, dst: Path, fit_confidences: bool = True,
                      letterbox: str = "square") -> Bundle:
    """``annotator calibrate``: copy ``src`` to ``dst`` under a new id (parent: ``src``'s id) and
    calibrate the copy on the dataset. ``dst`` must not exist (bundles are immutable)."""
    bundle = load_bundle(src)
    if dst.exists():
        raise FileExistsError(f"{dst} exists; give a new folder (a bundle is never changed in place)")
    coco = json.loads(annotations.read_text(encoding="utf-8"))
    check_schema(bundle, coco)
    tmp = dst.with_name(dst.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("bundle.sig"))
    lineage = {**bundle.lineage, "parent_bundle": bundle.id,
               "recalibrated_on": {"annotations": str(annotations), "images": len(coco.get("images", []))}}
    # The copy's files are the verified source's; write_bundle recomputes the checksums anyway.
    copy = dataclasses.replace(bundle, path=tmp, id=new_bundle_id(bundle.id), lineage=lineage)
    write_bundle(copy)
    calibrate_bundle(copy, coco, images_dir, fit_confidences, source=annotations.parent.name, letterbox=letterbox)
    tmp.rename(dst)
    return load_bundle(dst)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from service.cli import dataset_paths
    from service.errors import AnnotatorError

    ann, images = dataset_paths(args.dataset, args.images)
    try:
        b = recalibrated_copy(Path(args.src), ann, images, Path(args.dst), fit_confidences=not args.thresholds_only,
                              letterbox=args.letterbox)
    except FileExistsError as exc:
        raise AnnotatorError(str(exc)) from exc
    print(f"bundle {b.id} (parent {b.lineage.get('parent_bundle')}) written to {args.dst}")
    print(f"thresholds: {b.thresholds.method}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("calibrate", help="a copy of a bundle with its visibility decision calibrated on labelled images")
    s.add_argument("src", help="bundle directory")
    s.add_argument("dataset", help="COCO key-points json or a folder with annotations.json and images/")
    s.add_argument("dst", help="new bundle directory (must not exist)")
    s.add_argument("--images", help="images folder (default: images/ beside the json)")
    s.add_argument("--thresholds-only", action="store_true",
                   help="only the per-key-point thresholds, no confidence calibration")
    s.add_argument("--letterbox", choices=("square", "rect"), default="square",
                   help="calibrate for the daemon's engine.letterbox (default square)")
    s.set_defaults(func=cmd_calibrate)
