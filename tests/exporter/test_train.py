"""A real (tiny) training run: three models, ONNX export, calibration, bundle, resume."""
from __future__ import annotations

import json
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
