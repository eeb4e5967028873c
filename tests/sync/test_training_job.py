"""The cloud training job against moto's SageMaker API in server mode, with the real entry point.

moto completes a training job at once and never runs the container, so the test plays the
container: it downloads the job's ``training`` channel from S3 into a fake ``/opt/ml`` tree,
writes the job's hyperparameters (strings) there, runs ``python -m exporter.sagemaker_entry
train`` (1 epoch, 96 px, 12 images), tars ``model/`` and uploads it where moto says the
artifact is. The sync agent's task then publishes the bundle to the registry.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from s3servers import S3Server
from service.bundle import load_bundle
from sync.errors import RetryableError, SyncConfigError
from sync.objectstore import LocalFolderStore
from sync.registry import BundleRegistry
from sync.training_job import build_training_task
from sync.training_settings import TrainingSettings, training_settings_from

REPO = Path(__file__).resolve().parents[2]


def test_settings_are_validated(tmp_path: Path) -> None:
    good = {"role_arn": "arn:aws:iam::1:role/r", "image_uri": "img", "input_s3": "s3://b/in", "output_s3": "s3://b/out",
            "hyperparameters": {"epochs": 3, "reviewed_only": True}}
    s = training_settings_from(good, "box-1", tmp_path)
    assert s.hyperparameters == {"epochs": "3", "reviewed_only": "true"} and s.job_prefix == "annotator-box-1"
    assert s.propagate is None and training_settings_from({**good, "propagate": 10}, "box-1", tmp_path).propagate == 10
    for bad, message in (({**good, "input_s3": "/local"}, "input_s3"), ({**good, "colour": "red"}, "colour"),
                         ({k: v for k, v in good.items() if k != "role_arn"}, "role_arn"),
                         ({**good, "min_new_reviewed": 0}, "min_new_reviewed"),
                         # checked as the job checks them: a typo failed a paid job after its start
                         ({**good, "hyperparameters": {"epoch": 3}}, "hyperparameter 'epoch': unknown"),
                         ({**good, "hyperparameters": {"epochs": "three"}}, "hyperparameter 'epochs'"),
                         ({**good, "hyperparameters": {"reviewed_only": "maybe"}}, "reviewed_only"),
                         ({**good, "propagate": 65}, "propagate: expected dHash bits")):
        with pytest.raises(SyncConfigError, match=message):
            training_settings_from(bad, "box-1", tmp_path)


def play_the_container(s3: object, job: dict, ml: Path) -> Path:
    """Do what SageMaker does with the job's image; returns the model.tar.gz."""
    for channel in job["InputDataConfig"]:
        bucket, _, prefix = channel["DataSource"]["S3DataSource"]["S3Uri"][5:].partition("/")
        dest = ml / "input" / "data" / channel["ChannelName"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):  # type: ignore[attr-defined]
            for obj in page.get("Contents", []):
                target = dest / obj["Key"][len(prefix):].lstrip("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                s3.download_file(bucket, obj["Key"], str(target))  # type: ignore[attr-defined]
    (ml / "input" / "config").mkdir(parents=True)
    (ml / "input" / "config" / "hyperparameters.json").write_text(json.dumps(job["HyperParameters"]))
    (ml / "checkpoints").mkdir()
    proc = subprocess.run([sys.executable, "-m", "exporter.sagemaker_entry", "train", "--ml-root", str(ml)],
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (ml / "output" / "failure").exists()
    tar_path = ml / "model.tar.gz"
    with tarfile.open(tar_path, "w:gz") as t:
        for item in sorted((ml / "model").iterdir()):
            t.add(item, arcname=item.name)
    return tar_path


@pytest.mark.slow
def test_agent_starts_a_training_job_and_publishes_its_bundle(
        moto_server: S3Server, s3_env: None, ultralytics_offline: Path, tmp_path: Path) -> None:
    from exporter.synth import generate

    data = generate(tmp_path / "data", 12, seed=21)
    coco = json.loads((data / "annotations.json").read_text())
    for n, im in enumerate(coco["images"]):  # shaped like `annotator dataset export`: half auto-accepted
        im["origin"] = "reviewed" if n % 2 == 0 else "auto"
    coco["info"] = {"dataset_version": "v-test-1"}
    (data / "annotations.json").write_text(json.dumps(coco))

    def export(out: Path) -> tuple[str, int]:
        shutil.copytree(data, out)
        return "v-test-1", 6

    bucket = moto_server.new_bucket()
    settings = TrainingSettings(
        role_arn="arn:aws:iam::123456789012:role/annotator-training", appliance_id="box-1",
        image_uri="123456789012.dkr.ecr.us-east-1.amazonaws.com/annotator:train",
        input_s3=f"s3://{bucket}/datasets", output_s3=f"s3://{bucket}/jobs", min_new_reviewed=1, poll_interval=0,
        region="us-east-1", endpoint_url=moto_server.endpoint_url, instance_type="ml.m5.large",
        hyperparameters={"epochs": "1", "imgsz": "96", "batch": "8", "workers": "0", "val_fraction": "0.25",
                         "auto_weight": "0.5"})
    registry = LocalFolderStore(tmp_path / "registry")
    parent = tmp_path / "current"  # the bundle in use (no weights/: the job falls back to pretrained)
    parent.mkdir()
    (parent / "bundle.json").write_text(json.dumps({"id": "parent-bundle-1"}))
    task = build_training_task(settings, registry, tmp_path, export, current_bundle=lambda: parent)

    assert task.run_once() is True  # export, upload, create_training_job
    state = task.state()
    assert state["status"] == "InProgress" and state["dataset_version"] == "v-test-1"
    job = task.trainer.describe(state["job"])
    assert job["HyperParameters"]["auto_weight"] == "0.5"
    assert job["AlgorithmSpecification"]["TrainingImage"] == settings.image_uri
    assert [c["ChannelName"] for c in job["InputDataConfig"]] == ["training", "init"]
    s3 = moto_server.client()
    assert s3.head_object(Bucket=bucket, Key=f"datasets/{state['job']}/annotations.json")

    with pytest.raises(RetryableError, match="not there"):  # moto says Completed; no artifact yet
        task.run_once()
    tar_path = play_the_container(s3, job, tmp_path / "ml")
    artifact = job["ModelArtifacts"]["S3ModelArtifacts"]
    assert artifact.startswith(f"s3://{bucket}/jobs/{state['job']}/") and artifact.endswith("model.tar.gz")
    s3.upload_file(str(tar_path), bucket, artifact[len(f"s3://{bucket}/"):])

    assert task.run_once() is True  # fetch, verify, publish
    state = task.state()
    assert state["status"] == "Completed"
    (bundle_id,) = BundleRegistry(registry).bundle_ids()
    assert state["bundle_id"] == bundle_id
    pulled = load_bundle(BundleRegistry(registry).download(bundle_id, tmp_path / "pulled"))
    assert pulled.lineage["dataset"]["version"] == "v-test-1"
    assert pulled.lineage["dataset"]["mix"]["auto_weight"] == 0.5
    assert pulled.lineage["parent_bundle"] == "parent-bundle-1"  # continued from the init channel
    assert (tmp_path / "pulled" / "weights" / "pose_main.pt").is_file()
    assert task.run_once() is False  # same dataset version: no second job


def test_agent_wires_the_training_task_before_the_model_pull(tmp_path: Path) -> None:
    from sync.agent import build_agent
    from sync.config import load_sync_config

    config = tmp_path / "annotator.toml"
    training = ('[sync.training]\nrole_arn = "arn:aws:iam::1:role/r"\nimage_uri = "img"\n'
                'input_s3 = "s3://b/in"\noutput_s3 = "s3://b/out"\nregion = "us-east-1"\n')
    config.write_text('[store]\nroot = "store"\n[sync]\nappliance_id = "box-1"\n' + training)
    with pytest.raises(SyncConfigError, match="sync.models.registry"):
        build_agent(load_sync_config(config, env={}), env={})
    config.write_text('[store]\nroot = "store"\n[sync]\nappliance_id = "box-1"\n' + training
                      + '[sync.models]\n[sync.models.registry]\nkind = "local"\nroot = "registry"\n')
    agent = build_agent(load_sync_config(config, env={}), env={})
    try:
        names = [t.name for t in agent.tasks]
        assert names.index("training") == names.index("models") - 1
    finally:
        agent.close()
