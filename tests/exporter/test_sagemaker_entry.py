"""The SageMaker entry point's conventions that need no training: hyperparameters, failure file."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from exporter.sagemaker_entry import JobPaths, main, parse_hyperparameters


@pytest.mark.parametrize("raw, expected", [
    ({}, {}),
    ({"epochs": "3", "imgsz": "96", "auto_weight": "0.5", "reviewed_only": "false", "propagated_weight": "1"},
     {"epochs": 3, "imgsz": 96, "auto_weight": 0.5, "reviewed_only": False, "propagated_weight": 1.0}),
    ({"epochs": '"3"', "device": '"cpu"', "reviewed_only": '"true"'},  # the SageMaker SDK's JSON quoting
     {"epochs": 3, "device": "cpu", "reviewed_only": True}),
    ({"sagemaker_program": "x.py", "sagemaker_region": "eu-west-1", "seed": "7"}, {"seed": 7}),
    ({"int8": "true"}, {"int8": True}),
])
def test_hyperparameters_are_parsed_from_strings(raw: dict[str, str], expected: dict[str, object]) -> None:
    assert parse_hyperparameters(raw) == expected


@pytest.mark.parametrize("raw, message", [
    ({"epoch": "3"}, "'epoch': unknown"),
    ({"epochs": "three"}, "'epochs'"),
    ({"reviewed_only": "maybe"}, "'reviewed_only'"),
])
def test_bad_hyperparameters_name_the_key(raw: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_hyperparameters(raw)


def test_paths_follow_the_sagemaker_layout_and_environment(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    paths = JobPaths.from_env(tmp_path, {})
    assert paths.training == tmp_path / "input" / "data" / "training"
    assert paths.model_dir == tmp_path / "model" and paths.failure == tmp_path / "output" / "failure"
    assert paths.hyperparameters == tmp_path / "input" / "config" / "hyperparameters.json"
    assert paths.init is None and paths.work == tmp_path / "checkpoints"
    env = {"SM_CHANNEL_TRAINING": str(tmp_path / "t"), "SM_MODEL_DIR": str(tmp_path / "m")}
    other = JobPaths.from_env(tmp_path, env)
    assert other.training == tmp_path / "t" and other.model_dir == tmp_path / "m"


def test_failure_writes_output_failure_and_exits_1(tmp_path: Path) -> None:
    config = tmp_path / "input" / "config"
    config.mkdir(parents=True)
    (config / "hyperparameters.json").write_text(json.dumps({"epochs": "1"}))
    (tmp_path / "checkpoints").mkdir()
    assert main(["train", "--ml-root", str(tmp_path)], env={}) == 1
    text = (tmp_path / "output" / "failure").read_text()
    assert "no annotations.json" in text and len(text) <= 1025
    (config / "hyperparameters.json").write_text(json.dumps({"epoch": "1"}))
    assert main(["train", "--ml-root", str(tmp_path)], env={}) == 1
    assert "unknown" in (tmp_path / "output" / "failure").read_text()


def test_an_int8_job_leaves_the_int8_copy_in_the_model_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``int8`` = "true": what lands in the model dir (and so in the registry) is the int8 copy
    of the trained bundle, its parent the trained one. Training is replaced by a copy of the demo
    bundle: what is tested is what the job does after it."""
    import shutil

    pytest.importorskip("onnx")
    import exporter.train
    from exporter.sagemaker_entry import run_job
    from service.bundle import load_bundle

    repo = Path(__file__).resolve().parents[2]
    demo, samples = repo / "service" / "assets" / "demo_bundle", repo / "service" / "assets" / "samples"
    monkeypatch.setattr(exporter.train, "train_bundle", lambda cfg: (shutil.copytree(demo, cfg.out),
                                                                     load_bundle(cfg.out))[1])
    (tmp_path / "checkpoints").mkdir()
    paths = JobPaths.from_env(tmp_path, {})
    paths.training.mkdir(parents=True)
    shutil.copyfile(samples / "annotations.json", paths.training / "annotations.json")
    shutil.copytree(samples, paths.training / "images", ignore=shutil.ignore_patterns("*.json"))
    paths.hyperparameters.parent.mkdir(parents=True)
    paths.hyperparameters.write_text(json.dumps({"int8": "true", "epochs": "1"}))
    bundle_id = run_job(paths)
    shipped = load_bundle(paths.model_dir)
    assert shipped.id == bundle_id and shipped.lineage["parent_bundle"] == load_bundle(demo).id
    assert "int8" in shipped.lineage["notes"][-1]
