"""A real (tiny) training run: three models, ONNX export, calibration, bundle, resume."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from exporter.synth import generate
from service.bundle import load_bundle


@pytest.mark.slow
def test_train_bundle_end_to_end_and_resume(tmp_path: Path, ultralytics_offline: None) -> None:
    pytest.importorskip("ultralytics")
    from exporter.train import TrainConfig, train_bundle

    d = generate(tmp_path / "data", 16, seed=4)
    cfg = TrainConfig(annotations=d / "annotations.json", images=d / "images", out=tmp_path / "bundle",
                      work=tmp_path / "work", epochs=1, imgsz=96, batch=8, workers=0, val_fraction=0.25)
    b = train_bundle(cfg)
    assert set(b.models) == {"head", "pose_main", "pose_visible"}
    assert b.visibility_mode == "two_model"
    assert b.lineage["dataset"]["version"].startswith("sha256:")
    assert b.lineage["dataset"]["holdout_included"] is None  # a plain COCO dataset does not say
    assert b.lineage["training"]["epochs"] == 1
    assert len(b.thresholds.main) == 19 and "calibrated" in b.thresholds.method
    cal = b.metrics["calibration"]
    assert "reference_accuracy" in cal["global"] and len(cal["per_keypoint"]) == 19
    # 4 validation images hold far fewer than 2,000 matched points: thresholds only
    assert b.confidence_calibration is None and "fewer than" in b.metrics["confidence_calibration"]["skipped"]
    assert all((cfg.out / "weights" / f"{r}.pt").is_file() for r in b.models)
    # Re-running with the same work folder resumes: finished roles are not trained again.
    marker = [(cfg.work / "runs" / r / "DONE").stat().st_mtime for r in b.models]
    b2 = train_bundle(cfg)
    assert [(cfg.work / "runs" / r / "DONE").stat().st_mtime for r in b.models] == marker
    assert all((cfg.work / "runs" / r / "FINGERPRINT").is_file() for r in b.models)
    assert load_bundle(cfg.out).id == b2.id
    manifest = json.loads((cfg.out / "bundle.json").read_text())
    assert manifest["format"] == 1 and manifest["models"]["pose_main"]["kpt_shape"] == [19, 3]


def test_continuing_a_bundle_fine_tunes(tmp_path: Path) -> None:
    from exporter.train import FINETUNE_ARGS, TrainConfig, train_args

    bundle = tmp_path / "bundle"
    (bundle / "weights").mkdir(parents=True)
    (bundle / "weights" / "pose_main.pt").write_bytes(b"weights")
    data_yaml = tmp_path / "data.yaml"
    data_yaml.write_text("path: .\ntrain: images\nkpt_shape: [19, 3]\nnames: {0: person}\n")

    def cfg(init: str, **extra: object) -> TrainConfig:
        return TrainConfig(annotations=tmp_path / "a.json", images=tmp_path, out=tmp_path / "out",
                           work=tmp_path / "work", epochs=5, init=init, extra=dict(extra))

    model, args = train_args(cfg(str(bundle)), "pose_main", data_yaml)
    assert model == str(bundle / "weights" / "pose_main.pt")
    assert {k: args[k] for k in FINETUNE_ARGS} == FINETUNE_ARGS == {"optimizer": "SGD", "lr0": 0.002, "warmup_epochs": 0}
    assert args["epochs"] == 5 and args["data"] == str(data_yaml)
    _, args = train_args(cfg(str(bundle), lr0=0.01, optimizer="AdamW"), "pose_main", data_yaml)
    assert (args["optimizer"], args["lr0"], args["warmup_epochs"]) == ("AdamW", 0.01, 0)  # extra has the last word
    # A role the bundle has no weights for starts afresh, with ultralytics' own schedule.
    model, args = train_args(cfg(str(bundle)), "pose_visible", data_yaml)
    assert model != str(bundle / "weights" / "pose_visible.pt") and "optimizer" not in args
    _, args = train_args(cfg("scratch"), "pose_main", data_yaml)
    assert "optimizer" not in args and "warmup_epochs" not in args


def test_training_uses_every_core_unless_told(ultralytics_offline: None) -> None:
    """ultralytics sets torch to cpu_count - 1 threads when it picks the CPU; the model's
    callback at the start of training sets the number the run asked for."""
    pytest.importorskip("ultralytics")
    import torch

    from exporter.train import _yolo, training_threads

    assert training_threads(3) == 3 and training_threads() >= 1
    model = _yolo("yolo11n.yaml", 3)
    before = torch.get_num_threads()
    try:
        model.callbacks["on_pretrain_routine_start"][-1](None)  # ours is the last one added
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


# --- fast tests: ultralytics and the bundle build replaced -------------------------------------------

def _dataset(root: Path, names: list[str] | None = None, info: dict | None = None, tag: int = 0) -> tuple[Path, Path]:
    """A 6-image COCO key-points dataset (``tag`` moves its boxes: another export); (json, images)."""
    from service.keypoints import CABIN19_NAMES

    names = list(CABIN19_NAMES) if names is None else names
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    ims, anns = [], []
    for i in range(1, 7):
        ims.append({"id": i, "file_name": f"im{i}.jpg", "width": 64, "height": 48})
        (images / f"im{i}.jpg").write_bytes(b"\xff\xd8fake")
        anns.append({"id": i, "image_id": i, "category_id": 1, "bbox": [4 + tag, 4, 20, 30], "iscrowd": 0,
                     "keypoints": [10, 10, 2] * len(names), "num_keypoints": len(names)})
        anns.append({"id": 100 + i, "image_id": i, "category_id": 2, "bbox": [8 + tag, 4, 8, 8], "iscrowd": 0})
    coco = {"images": ims, "annotations": anns,
            "categories": [{"id": 1, "name": "person", "keypoints": names, "skeleton": []}, {"id": 2, "name": "head"}]}
    if info is not None:
        coco["info"] = info
    ann = root / "annotations.json"
    ann.write_text(json.dumps(coco))
    return ann, images


class _FakeYOLO:
    """Stands in for ``ultralytics.YOLO``: records each call and writes the run's checkpoints."""

    calls: list[tuple[str, dict]] = []

    def __init__(self, weights: str) -> None:
        self.weights = weights

    def train(self, **kw: object) -> None:
        _FakeYOLO.calls.append((self.weights, kw))
        run = Path(self.weights).parents[1] if kw.get("resume") else Path(str(kw["project"])) / str(kw["name"])
        (run / "weights").mkdir(parents=True, exist_ok=True)
        tag = f"trained from {self.weights} on {kw.get('data', 'resumed')}".encode()
        for name in ("best.pt", "last.pt"):
            (run / "weights" / name).write_bytes(tag)


@pytest.fixture()
def fake_yolo(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict]]:
    _FakeYOLO.calls = []
    monkeypatch.setattr("exporter.train._yolo", lambda weights, threads: _FakeYOLO(weights))
    monkeypatch.setattr("exporter.train.ultralytics_env", lambda *a: {})
    return _FakeYOLO.calls


def test_a_run_of_other_inputs_is_not_reused_nor_resumed(tmp_path: Path, fake_yolo: list) -> None:
    """Re-running ``annotator train`` with the same work folder reuses a finished role and
    resumes an interrupted one only when its fingerprint (annotations, label set, starting
    weights, arguments) is this call's: another export or --init trains afresh."""
    from exporter.labelsets import derive_label_sets
    from exporter.train import TrainConfig, train_role

    work = tmp_path / "out.work"
    bundle = tmp_path / "parent"
    (bundle / "weights").mkdir(parents=True)
    (bundle / "weights" / "pose_main.pt").write_bytes(b"parent weights")

    def role(tag: int, init: str = "scratch") -> Path:
        ann, images = _dataset(tmp_path / "export", tag=tag)  # same paths, other content: a new export
        shutil.rmtree(work / "labelsets", ignore_errors=True)  # as train_bundle rebuilds them
        sets = derive_label_sets(ann, images, work / "labelsets", 0.2)
        cfg = TrainConfig(annotations=ann, images=images, out=tmp_path / "out", work=work, init=init)
        return train_role(cfg, "pose_main", sets.data_yaml["pose_main"])

    run = work / "runs" / "pose_main"
    best = role(1)
    assert len(fake_yolo) == 1 and not fake_yolo[0][1].get("resume")
    assert (run / "DONE").is_file() and json.loads((run / "FINGERPRINT").read_text())["sha256"]
    assert role(1) == best and len(fake_yolo) == 1  # same inputs: finished, reused
    role(2)  # another export in the same work folder: trained afresh
    assert len(fake_yolo) == 2 and fake_yolo[1][0] == "yolo11n-pose.yaml" and not fake_yolo[1][1].get("resume")
    (run / "DONE").unlink()  # killed: last.pt and no DONE
    role(2)
    assert len(fake_yolo) == 3 and fake_yolo[2][1] == {"resume": True}  # same inputs: resumed
    (run / "DONE").unlink()
    role(1)  # killed, then re-run on the first export: its last.pt is not resumed
    assert len(fake_yolo) == 4 and not fake_yolo[3][1].get("resume")
    role(1, init=str(bundle))  # another --init: the parent's weights, fine-tuned
    assert len(fake_yolo) == 5 and fake_yolo[4][0] == str(bundle / "weights" / "pose_main.pt")
    assert role(1, init=str(bundle)) == best and len(fake_yolo) == 5
    (bundle / "weights" / "pose_main.pt").write_bytes(b"other parent weights")  # same path, other weights
    role(1, init=str(bundle))
    assert len(fake_yolo) == 6
    (run / "FINGERPRINT").unlink()  # a run folder that cannot say what it was trained from
    role(1, init=str(bundle))
    assert len(fake_yolo) == 7 and (run / "FINGERPRINT").is_file()


class _Built(Exception):
    """Raised by the stand-in build_bundle: ``train_bundle`` got that far."""


def _train_until_build(monkeypatch: pytest.MonkeyPatch, cfg: object) -> dict:
    """Run ``train_bundle`` with train_role and build_bundle replaced; what they were given."""
    from exporter.train import train_bundle

    seen: dict = {"roles": []}

    def train_role(cfg, role, data_yaml, kpt_names=None):  # noqa: ANN001, ANN202 - the stand-in
        seen["roles"].append((role, kpt_names))
        return cfg.work / f"{role}.pt"

    def build_bundle(out_dir, **kw):  # noqa: ANN001, ANN202
        seen["build"] = kw
        raise _Built

    monkeypatch.setattr("exporter.train.train_role", train_role)
    monkeypatch.setattr("exporter.bundle_build.build_bundle", build_bundle)
    with pytest.raises(_Built):
        train_bundle(cfg)
    return seen


def test_an_export_with_the_holdout_is_refused_unless_allowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``annotator dataset export --include-holdout`` adds the gate's validation images: training
    on them needs --allow-holdout, and the lineage says so and names the exact json."""
    import hashlib

    from exporter.train import TrainConfig
    from service.errors import AnnotatorError

    ann, images = _dataset(tmp_path / "d", info={"dataset_version": "v1", "holdout_included": True})

    def cfg(**kw: object) -> TrainConfig:
        return TrainConfig(annotations=ann, images=images, out=tmp_path / "out", work=tmp_path / "work",
                           val_fraction=0.2, **kw)

    with pytest.raises(AnnotatorError, match="--allow-holdout"):
        _train_until_build(monkeypatch, cfg())
    assert not (tmp_path / "work").exists()  # refused before anything was written
    lineage = _train_until_build(monkeypatch, cfg(allow_holdout=True))["build"]["lineage"]["dataset"]
    assert lineage["holdout_included"] is True and lineage["version"] == "v1"
    assert lineage["annotations_sha256"] == "sha256:" + hashlib.sha256(ann.read_bytes()).hexdigest()
    ann2, images2 = _dataset(tmp_path / "e", info={"dataset_version": "v1", "holdout_included": False})
    seen = _train_until_build(monkeypatch, TrainConfig(annotations=ann2, images=images2, out=tmp_path / "out",
                                                       work=tmp_path / "work2", val_fraction=0.2))
    assert seen["build"]["lineage"]["dataset"]["holdout_included"] is False


def test_the_bundle_schema_and_start_weights_follow_the_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """19 points that are not the cabin-19 points are not cabin-19: the bundle gets the dataset's
    names and the COCO head is not mapped onto them; the cabin names keep the cabin schema."""
    from exporter.train import TrainConfig, train_args
    from service.keypoints import CABIN19, CABIN19_NAMES, KeypointSchema

    other = [f"marker{i}" for i in range(19)]
    for names in (other, list(CABIN19_NAMES)):
        root = tmp_path / names[0]
        ann, images = _dataset(root, names=names)
        seen = _train_until_build(monkeypatch, TrainConfig(annotations=ann, images=images, out=root / "out",
                                                           work=root / "work", val_fraction=0.2))
        assert seen["build"]["keypoint_names"] == names
        assert dict(seen["roles"])["pose_main"] == names
    assert KeypointSchema.for_names(list(CABIN19_NAMES)) is CABIN19  # what build_bundle picked by count before

    pre = tmp_path / "coco.pt"
    pre.write_bytes(b"coco pose")
    mapped = tmp_path / "cabin-init"
    monkeypatch.setattr("exporter.train.pretrained_pose_checkpoint", lambda: pre)
    monkeypatch.setattr("exporter.cabin_init.write_cabin_init", lambda out: mapped)
    ann, images = _dataset(tmp_path / "x", names=other)
    yaml = tmp_path / "data.yaml"
    yaml.write_text("path: .\nkpt_shape: [19, 3]\n")
    cfg = TrainConfig(annotations=ann, images=images, out=tmp_path / "out", work=tmp_path / "work")
    assert train_args(cfg, "pose_main", yaml, other)[0] == str(pre)
    assert train_args(cfg, "pose_main", yaml)[0] == str(pre)  # the names read from the annotations
    assert train_args(cfg, "pose_main", yaml, list(CABIN19_NAMES))[0] == str(mapped / "weights" / "pose_main.pt")
