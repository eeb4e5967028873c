"""Evaluate a bundle on a COCO key-points dataset through the daemon's own engine.

    python -m exporter.evaluate BUNDLE_DIR annotations.json IMAGES_DIR OUT_DIR [--limit N]

Needs only the runtime and the ``eval`` extra (onnxruntime, numpy, cv2, pycocotools,
matplotlib); no torch or ultralytics.

Two views of the predictions (the choice the issue asked to document):

- the **AP view**: the engine runs with ``det_conf`` = ``person_conf`` = 0.001 (as
  ``ultralytics val`` does), keeping the bundle's NMS IoU and key point thresholds. Head box
  mAP and key point OKS AP are computed on it, so low-confidence detections fill the
  precision-recall curve.
- the **operating view**: what the daemon would output, at the bundle's own ``det_conf`` and
  ``person_conf``. Visibility accuracy and the contact sheet use it. For a bundle whose
  persons come from the main model alone (``main_only``) it is derived exactly from the AP
  view by dropping persons with ``conf <= person_conf`` and heads with ``conf <= det_conf``:
  greedy NMS keeps the same boxes above a threshold whatever lower threshold it started from,
  and the visibility rule is per person. With a visible-only model the match between the two
  models' persons could change with the threshold, so the engine runs a second time at the
  bundle's thresholds on the same decoded images.

Speed: ``engine_images_per_s`` counts ``Engine.predict`` time of the AP pass only;
``end_to_end_images_per_s`` counts file reading + decoding + that pass (not the second pass,
drawing or metrics).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from service.bundle import Bundle, load_bundle
from service.durable import write_json_atomic
from service.draw import contact_sheet, draw_prediction
from service.errors import ImageError
from service.record import Prediction

from .calibrate import collect_visibility_samples, person_category
from .coco_metrics import head_box_ap, keypoint_ap, load_coco, visibility_report
from .report import print_metrics_table, write_confusion_png, write_png

log = logging.getLogger(__name__)

AP_CONF = 0.001
SHEET_IMAGES = 16


@dataclasses.dataclass
class DatasetPredictions:
    """Predictions for the evaluated images (image id -> Prediction) in both views."""

    ap_view: dict[int, Prediction]
    operating_view: dict[int, Prediction]
    engine_seconds: float
    total_seconds: float
    sheet_images: list[np.ndarray]
    sheet_captions: list[str]
    two_pass: bool
    failed_images: list[str]


def ap_bundle(bundle: Bundle, conf: float = AP_CONF) -> Bundle:
    """The bundle with detection confidences lowered for AP (key point thresholds kept)."""
    t = dataclasses.replace(bundle.thresholds, person_conf=min(conf, bundle.thresholds.person_conf),
                            det_conf=min(conf, bundle.thresholds.det_conf))
    return dataclasses.replace(bundle, thresholds=t)


def operating_from_ap(pred: Prediction, bundle: Bundle, engine: Any) -> Prediction:
    """Operating view of one AP-view prediction (exact for bundles without a visible model)."""
    t = bundle.thresholds
    persons = tuple(p for p in pred.persons if p.conf > t.person_conf)
    if "head" in bundle.models:
        heads = tuple(h for h in pred.heads if h.conf > t.det_conf)
    elif bundle.head_from_face:
        heads = tuple(h for p in persons if (h := engine.head_from_face(p, pred.width, pred.height)) is not None)
    else:
        heads = ()
    return dataclasses.replace(pred, persons=persons, heads=heads)


def predict_dataset(
    bundle: Bundle,
    dataset: Mapping[str, Any],
    images_dir: Path,
    limit: int | None = None,
    progress: bool = True,
    sheet_images: int = SHEET_IMAGES,
    max_side_hint: int | None = None,
    letterbox: str = "square",
) -> DatasetPredictions:
    """Run the engine over the dataset's images (sorted by id, the first ``limit``).

    An image that cannot be read is logged, listed in ``failed_images`` and gets an empty
    prediction (its ground truth still counts). ``max_side_hint`` is passed to
    ``read_image`` (None: full decode, as ultralytics does).
    """
    from service.engine import Engine

    infos = sorted(dataset["images"], key=lambda im: int(im["id"]))[: limit if limit is not None else None]
    engine = Engine(ap_bundle(bundle), letterbox=letterbox)
    two_pass = bundle.visibility_mode == "two_model" and "pose_visible" in bundle.models
    engine_op = Engine(bundle, letterbox=letterbox) if two_pass else None
    pick = set(np.linspace(0, len(infos) - 1, min(sheet_images, len(infos))).astype(int).tolist()) if infos else set()
    out = DatasetPredictions({}, {}, 0.0, 0.0, [], [], two_pass, [])
    t_start = time.perf_counter()
    for ok, failed, decoded in decoded_batches(infos, images_dir, engine.batch_size, "evaluation", progress,
                                               max_side_hint):
        for info in failed:
            out.failed_images.append(str(info["file_name"]))
            empty = Prediction(int(info["width"]), int(info["height"]))
            out.ap_view[int(info["id"])] = out.operating_view[int(info["id"])] = empty
        t0 = time.perf_counter()
        preds = engine.predict(decoded)
        out.engine_seconds += time.perf_counter() - t0
        out.total_seconds = time.perf_counter() - t_start
        ops = engine_op.predict(decoded) if engine_op is not None else [
            operating_from_ap(p, bundle, engine) for p in preds]
        for (pos, info), im, pred, op in zip(ok, decoded, preds, ops):
            image_id = int(info["id"])
            out.ap_view[image_id], out.operating_view[image_id] = pred, op
            if pos in pick:
                out.sheet_images.append(draw_prediction(im.pixels, op, bundle.keypoints))
                out.sheet_captions.append(f"{info['file_name']}  {len(op.persons)}p {len(op.heads)}h")
    return out


def decoded_batches(infos: Sequence[Mapping[str, Any]], images_dir: Path, batch_size: int, what: str,
                    progress: bool = True, max_side_hint: int | None = None,
                    ) -> Iterator[tuple[list[tuple[int, Mapping[str, Any]]], list[Mapping[str, Any]], list[Any]]]:
    """The images of ``infos`` (COCO image entries) decoded ``batch_size`` at a time: yields
    ``(ok, failed, decoded)`` per batch, ``ok`` the ``(position in infos, info)`` of each decoded
    image in order, ``failed`` the infos whose image could not be read (logged as ``what``).
    With ``progress`` logs ``what: n/N images`` about every tenth of the way."""
    from service.imageio import read_image

    step = max(1, len(infos) // 10)
    for start in range(0, len(infos), batch_size):
        chunk = infos[start:start + batch_size]
        ok: list[tuple[int, Mapping[str, Any]]] = []
        failed: list[Mapping[str, Any]] = []
        decoded: list[Any] = []
        for pos, info in enumerate(chunk, start):
            try:
                decoded.append(read_image(images_dir / info["file_name"], max_side_hint=max_side_hint))
                ok.append((pos, info))
            except ImageError as exc:
                log.warning("%s: skipping %s: %s", what, info["file_name"], exc)
                failed.append(info)
        yield ok, failed, decoded
        done = start + len(chunk)
        if progress and (done // step != start // step or done == len(infos)):
            log.info("%s: %d/%d images", what, done, len(infos))


def with_visible_area(data: Mapping[str, Any], category_id: int) -> dict[str, Any] | None:
    """The dataset with each person's ``area`` replaced by ``attributes.visible_area`` (the
    modal segment: only the pixels in front), or None when the dataset does not carry it.

    Synthetic datasets give ``area`` as the amodal person area (the pixels the person would
    cover with nothing in front), the scale of their amodal key points; with the modal area
    the OKS of a rear passenger hidden to 10 % by the front seat tolerates a tenth of the
    error for the same body, so it mostly measures guesses of hidden points. Both are
    reported."""
    anns = []
    seen = False
    for a in data["annotations"]:
        va = (a.get("attributes") or {}).get("visible_area") if a.get("category_id") == category_id else None
        if va is not None:
            seen = True
            a = {**a, "area": max(float(va), 1.0)}
        anns.append(a)
    return {**data, "annotations": anns} if seen else None


def keypoint_mapping(bundle: Bundle, dataset_names: Sequence[str]) -> list[int]:
    """Index in the bundle's key points of each dataset key point (matched by name)."""
    names = list(bundle.keypoints.names)
    missing = [n for n in dataset_names if n not in names]
    if missing:
        raise ValueError(f"the dataset's key points {missing} are not in bundle {bundle.id} (it has {names})")
    return [names.index(n) for n in dataset_names]


def evaluate(
    bundle_path: str | Path,
    annotations_json: str | Path,
    images_dir: str | Path,
    out_dir: str | Path,
    limit: int | None = None,
    progress: bool = True,
    letterbox: str = "square",
) -> dict[str, Any]:
    """Evaluate and write ``metrics.json``, ``contact_sheet.png`` and ``confusion.png``.

    Returns the metrics dict (also in ``metrics.json``): ``head`` (``map50``, ``map50_95``;
    None without heads), ``keypoints`` (``oks_ap``, ``oks_ap50``), ``visibility`` (see
    ``coco_metrics.visibility_report``), ``speed`` and what was evaluated.
    """
    bundle = load_bundle(bundle_path)
    data = json.loads(Path(annotations_json).read_text(encoding="utf-8"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cat = person_category(data)
    kpt_map = keypoint_mapping(bundle, cat["keypoints"])
    sigmas = [bundle.keypoints.sigmas[i] for i in kpt_map]
    coco_gt = load_coco(data)

    preds = predict_dataset(bundle, data, Path(images_dir), limit=limit, progress=progress, letterbox=letterbox)
    n = len(preds.ap_view)
    modal = with_visible_area(data, int(cat["id"]))
    head_cat = next((c for c in data["categories"] if c.get("name") == "head"), None)
    has_heads = "head" in bundle.models or bundle.head_from_face
    samples = collect_visibility_samples(preds.operating_view, coco_gt, sigmas=sigmas, kpt_map=kpt_map)
    t = bundle.thresholds
    metrics: dict[str, Any] = {
        "bundle_id": bundle.id,
        "letterbox": letterbox,
        "dataset": {"annotations": str(annotations_json), "images_dir": str(images_dir), "images": n,
                    "failed_images": preds.failed_images, "keypoints": list(cat["keypoints"])},
        "head": head_box_ap(coco_gt, preds.ap_view, int(head_cat["id"])) if head_cat and has_heads else None,
        "keypoints": {**keypoint_ap(coco_gt, preds.ap_view, int(cat["id"]), kpt_map, sigmas),
                      "sigmas": sigmas,
                      "visible_area": None if modal is None else keypoint_ap(
                          load_coco(modal), preds.ap_view, int(cat["id"]), kpt_map, sigmas)},
        "visibility": visibility_report(samples, cat["keypoints"]),
        "speed": {
            "engine_seconds": round(preds.engine_seconds, 4), "total_seconds": round(preds.total_seconds, 4),
            "engine_images_per_s": n / preds.engine_seconds if preds.engine_seconds > 0 else None,
            "end_to_end_images_per_s": n / preds.total_seconds if preds.total_seconds > 0 else None,
        },
        "views": {
            "ap": {"det_conf": min(AP_CONF, t.det_conf), "person_conf": min(AP_CONF, t.person_conf)},
            "operating": {"det_conf": t.det_conf, "person_conf": t.person_conf,
                          "derived": "second engine pass" if preds.two_pass else "filtered from the AP view"},
            "nms_iou": t.nms_iou, "main": list(t.main), "visible": list(t.visible),
        },
    }
    write_json_atomic(out / "metrics.json", metrics)
    write_png(out / "contact_sheet.png", contact_sheet(preds.sheet_images, cols=4, captions=preds.sheet_captions))
    write_confusion_png(out / "confusion.png", metrics["visibility"]["confusion"], metrics["visibility"]["labels"],
                        title=f"visibility, bundle {bundle.id}")
    log.info("evaluation of %s on %d images written to %s", bundle.id, n, out)
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: evaluate, write the files, print the metrics table."""
    ap = argparse.ArgumentParser(prog="python -m exporter.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("annotations")
    ap.add_argument("images")
    ap.add_argument("out")
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N images (by id)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    metrics = evaluate(args.bundle, args.annotations, args.images, args.out, limit=args.limit)
    print_metrics_table(metrics)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
