"""exporter.evaluate and exporter.coco_metrics: visibility confusion on hand-made predictions,
pycocotools wrappers, and the issue's bar: evaluating a YOLO11n-pose bundle through the engine
gives the OKS AP that pycocotools gives on ultralytics' own predictions."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from exporter.calibrate import collect_visibility_samples
from exporter.coco_metrics import confusion_matrix, head_box_ap, keypoint_ap, load_coco, visibility_report
from service.keypoints import COCO17_NAMES, COCO17_SIGMAS
from service.record import Head, Keypoint, Person, Prediction

COCO_PEOPLE = Path(__file__).resolve().parents[3] / "shared" / "eval" / "coco-val-people"
SAMPLES = Path(__file__).resolve().parents[2] / "service" / "assets" / "samples"


@pytest.fixture(scope="module")
def people(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, float]:
    """(annotations.json, images folder, the OKS AP a COCO-pretrained model at least reaches there)
    of photos with COCO-17 key points: the 36 COCO val photos
    in ../shared beside the checkout (their licences keep them out of the repository), or, where
    that folder is absent (a bare clone, CI), the project's own sample cabin photos with their
    ground truth cut to the COCO 17 points (the cabin schema adds mouth and neck after them;
    head boxes dropped), so that the engine is held to pycocotools on ultralytics everywhere."""
    if (COCO_PEOPLE / "annotations.json").is_file():
        return COCO_PEOPLE / "annotations.json", COCO_PEOPLE / "images", 0.3
    data = json.loads((SAMPLES / "annotations.json").read_text())
    person = next(c for c in data["categories"] if c["name"] == "person")
    assert person["keypoints"][:17] == list(COCO17_NAMES)
    person = {**person, "keypoints": list(COCO17_NAMES), "skeleton": [e for e in person["skeleton"] if max(e) <= 17]}
    anns = []
    for a in data["annotations"]:
        if a["category_id"] == person["id"]:
            kps = a["keypoints"][:51]
            anns.append({**a, "keypoints": kps, "num_keypoints": sum(1 for v in kps[2::3] if v > 0)})
    out = tmp_path_factory.mktemp("samples-coco17") / "annotations.json"
    out.write_text(json.dumps({**data, "categories": [person], "annotations": anns}))
    return out, SAMPLES, 0.03  # measured 0.055 (AP50 0.17): COCO's model on rendered cabins


def _dataset() -> dict:
    """One image, one person with 6 visible, 6 occluded, 5 outside points, one head."""
    flags = [2] * 6 + [1] * 6 + [0] * 5
    kps: list[float] = []
    for k, f in enumerate(flags):
        kps += [100 + 5 * k, 100 + 10 * k, f] if f else [0, 0, 0]
    return {
        "images": [{"id": 7, "file_name": "x.jpg", "width": 640, "height": 480}],
        "categories": [{"id": 1, "name": "person", "keypoints": list(COCO17_NAMES), "skeleton": []},
                       {"id": 2, "name": "head"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1, "bbox": [90, 90, 100, 180], "area": 18000.0,
             "keypoints": kps, "num_keypoints": 12, "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 2, "bbox": [95, 60, 40, 40], "area": 1600.0, "iscrowd": 0},
        ],
    }


def _prediction(vis: list[str]) -> Prediction:
    kps = tuple(Keypoint(100 + 5 * k, 100 + 10 * k, 0.9, 0.5, s) for k, s in enumerate(vis))
    return Prediction(640, 480, heads=(Head((95.0, 60.0, 135.0, 100.0), 0.9),),
                      persons=(Person((90.0, 90.0, 190.0, 270.0), 0.95, kps),))


def test_visibility_confusion_on_hand_made_predictions() -> None:
    # truth:      V V V V V V | O O O O O O | X X X X X
    # predicted:  V V V V O X | O O O V X X | X X X O V
    vis = (["visible"] * 4 + ["occluded", "outside"] + ["occluded"] * 3 + ["visible", "outside", "outside"]
           + ["outside"] * 3 + ["occluded", "visible"])
    rep = visibility_report(collect_visibility_samples({7: _prediction(vis)}, _dataset()), COCO17_NAMES)
    assert rep["labels"] == ["visible", "occluded", "outside"]
    assert rep["confusion"] == [[4, 1, 1], [1, 3, 2], [1, 1, 3]]
    assert rep["accuracy"] == pytest.approx(10 / 17) == pytest.approx(rep["accuracy_matched"])
    assert rep["recall"] == pytest.approx({"visible": 4 / 6, "occluded": 3 / 6, "outside": 3 / 5})
    assert rep["per_keypoint_accuracy"]["nose"] == 1.0 and rep["per_keypoint_accuracy"]["right_ankle"] == 0.0


def test_unmatched_ground_truth_counts_as_predicted_outside() -> None:
    far = Prediction(640, 480, persons=(Person((500.0, 300.0, 600.0, 400.0), 0.9, tuple(
        Keypoint(550.0, 350.0, 0.9, 0.9, "visible") for _ in range(17))),))
    rep = visibility_report(collect_visibility_samples({7: far}, _dataset()), COCO17_NAMES)
    assert rep["confusion"] == [[0, 0, 6], [0, 0, 6], [0, 0, 5]] and rep["matched_points"] == 0
    assert rep["accuracy"] == pytest.approx(5 / 17) and rep["accuracy_matched"] is None


@pytest.mark.parametrize("gt, pred, expected", [
    ([], [], [[0, 0, 0]] * 3),
    ([2, 1, 0, 0], [2, 2, 0, 1], [[1, 0, 0], [1, 0, 0], [0, 1, 1]]),
])
def test_confusion_matrix(gt: list[int], pred: list[int], expected: list[list[int]]) -> None:
    assert confusion_matrix(np.array(gt, np.int8), np.array(pred, np.int8)).tolist() == expected


def test_perfect_predictions_score_one() -> None:
    coco = load_coco(_dataset())
    pred = {7: _prediction(["visible"] * 17)}
    assert keypoint_ap(coco, pred, 1, list(range(17)), COCO17_SIGMAS) == pytest.approx({"oks_ap": 1.0, "oks_ap50": 1.0})
    assert head_box_ap(coco, pred, 2) == pytest.approx({"map50_95": 1.0, "map50": 1.0})
    assert keypoint_ap(coco, {7: Prediction(640, 480)}, 1, list(range(17)), COCO17_SIGMAS)["oks_ap"] == 0.0


# -- through the engine, against ultralytics ----------------------------------------------------

@pytest.fixture(scope="module")
def coco17_bundle_640(tmp_path_factory: pytest.TempPathFactory, yolo11n_pose_pt: Path) -> Path:
    from exporter.bundle_build import build_bundle

    out = tmp_path_factory.mktemp("coco17-640")
    build_bundle(out, None, yolo11n_pose_pt, None, 640)
    return out


def _ultralytics_reference(pt: Path, images: list[dict], folder: Path) -> list[dict]:
    """COCO results from ultralytics' own predictor: score = box conf, key points as predicted.

    ``rect=False``: ``YOLO.predict`` defaults to ``rect=True`` for .pt models, i.e. a minimal
    letterbox padded to a multiple of the stride (640x480 for a 640x480 photo), while an ONNX
    model exported at 640 takes a 640x640 square. The input tensors then differ and so do the
    results (measured: OKS AP 0.490 with rect=True vs 0.507 with rect=False on these 36 photos);
    the same image size means the same 640x640 letterbox. The engine drops pose twins after NMS
    (``service.postprocess.suppress_twins``: an instance repeating a better one's sure points),
    which ultralytics keeps: the same rule is applied to its instances (in score order, as NMS
    gives them), so that what is compared is the decoding and the evaluation, to 0.005 AP.
    """
    from ultralytics import YOLO

    from service.postprocess import suppress_twins

    model = YOLO(str(pt))
    results = []
    for im in images:
        r = model.predict(str(folder / im["file_name"]), conf=0.001, iou=0.7, imgsz=640,
                          max_det=300, rect=False, verbose=False, device="cpu")[0]
        kpts = r.keypoints.data.cpu().numpy()
        confs = r.boxes.conf.cpu().numpy()
        assert (np.diff(confs) <= 0).all()  # NMS's order, which suppress_twins expects
        for i in suppress_twins(r.boxes.xyxy.cpu().numpy(), kpts, COCO17_SIGMAS):
            conf = confs[i]
            xy = np.concatenate([kpts[i, :, :2], np.ones((kpts.shape[1], 1))], axis=1)
            results.append({"image_id": im["id"], "category_id": 1, "score": float(conf),
                            "keypoints": xy.ravel().tolist()})
    return results


@pytest.mark.slow
@pytest.mark.train
def test_oks_ap_matches_ultralytics(coco17_bundle_640: Path, yolo11n_pose_pt: Path, tmp_path: Path,
                                    people: tuple[Path, Path, float]) -> None:
    pytest.importorskip("ultralytics")
    from pycocotools.cocoeval import COCOeval

    from exporter.evaluate import evaluate

    annotations, images, floor = people
    metrics = evaluate(coco17_bundle_640, annotations, images, tmp_path, progress=False)
    data = json.loads(annotations.read_text())
    coco = load_coco(data)
    ev = COCOeval(coco, coco.loadRes(_ultralytics_reference(yolo11n_pose_pt, data["images"], images)), "keypoints")
    ev.params.kpt_oks_sigmas = np.array(COCO17_SIGMAS)
    ev.evaluate(), ev.accumulate(), ev.summarize()
    print(f"engine OKS AP {metrics['keypoints']['oks_ap']:.4f} AP50 {metrics['keypoints']['oks_ap50']:.4f}; "
          f"ultralytics OKS AP {ev.stats[0]:.4f} AP50 {ev.stats[1]:.4f}")
    assert metrics["keypoints"]["oks_ap"] == pytest.approx(ev.stats[0], abs=0.005)
    assert metrics["keypoints"]["oks_ap50"] == pytest.approx(ev.stats[1], abs=0.005)
    assert metrics["keypoints"]["oks_ap"] > floor  # a real model on photos of people, not two zeros

    assert metrics["dataset"]["images"] == len(data["images"]) and metrics["head"] is None
    vis = metrics["visibility"]
    assert sum(map(sum, vis["confusion"])) == vis["points"] > 0
    assert [row[1] for row in vis["confusion"]] == [0, 0, 0]  # main_only: never "occluded"
    assert metrics["speed"]["engine_images_per_s"] > 0
    assert json.loads((tmp_path / "metrics.json").read_text())["keypoints"] == metrics["keypoints"]
    for name in ("contact_sheet.png", "confusion.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.train
def test_two_model_bundle_runs_second_pass_and_cli(coco17_bundle_640: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str],
                                                   people: tuple[Path, Path, float]) -> None:
    """Same ONNX file as main and visible model: the operating view comes from a second pass."""
    from exporter.bundle_build import build_bundle
    from exporter.evaluate import main

    onnx = coco17_bundle_640 / "pose_main.onnx"
    bundle_dir = tmp_path / "bundle"
    build_bundle(bundle_dir, None, onnx, onnx, 640)
    assert main([str(bundle_dir), str(people[0]), str(people[1]),
                 str(tmp_path / "out"), "--limit", "3"]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["dataset"]["images"] == 3
    assert metrics["views"]["operating"]["derived"] == "second engine pass"
    assert "key point OKS AP" in capsys.readouterr().out


def test_evaluation_modules_import_no_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, exporter.evaluate, exporter.calibrate, service.draw; "
            "bad = [m for m in ('torch', 'ultralytics') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.slow
@pytest.mark.train
def test_unreadable_image_is_listed_and_counts_as_empty(coco17_bundle_640: Path, tmp_path: Path,
                                                        people: tuple[Path, Path, float]) -> None:
    from exporter.evaluate import evaluate

    data = json.loads(people[0].read_text())
    keep = {im["id"] for im in sorted(data["images"], key=lambda im: im["id"])[:2]}
    data["images"] = [im for im in data["images"] if im["id"] in keep] + [
        {"id": max(im["id"] for im in data["images"]) + 1, "file_name": "missing.jpg", "width": 640, "height": 480}]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    (tmp_path / "annotations.json").write_text(json.dumps(data))
    metrics = evaluate(coco17_bundle_640, tmp_path / "annotations.json", people[1], tmp_path / "out",
                       progress=False)
    assert metrics["dataset"]["images"] == 3 and metrics["dataset"]["failed_images"] == ["missing.jpg"]


def test_visible_area_variant_replaces_only_person_areas() -> None:
    from exporter.evaluate import with_visible_area

    data = {"annotations": [
        {"id": 1, "category_id": 1, "area": 900.0, "attributes": {"visible_area": 100.0}},
        {"id": 2, "category_id": 1, "area": 400.0, "attributes": {"visible_area": 0.0}},
        {"id": 3, "category_id": 2, "area": 50.0, "attributes": {"visible_area": 5.0}},
    ], "images": [], "categories": []}
    out = with_visible_area(data, 1)
    assert [a["area"] for a in out["annotations"]] == [100.0, 1.0, 50.0]
    assert data["annotations"][0]["area"] == 900.0  # the input is not changed
    assert with_visible_area({"annotations": [{"id": 1, "category_id": 1, "area": 9.0}]}, 1) is None
