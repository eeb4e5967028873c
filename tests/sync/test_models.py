"""Model pull against a real daemon behind a real gRPC server, real bundles, a folder registry.

The appliance here: the daemon annotates real photos, every image goes to review, the review
accepts the auto labels unchanged and all reviewed images are hold-out images, so the bundle
in use scores its best and a candidate with absurd thresholds scores visibly worse.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from service.bundle import Bundle, Thresholds, load_bundle, write_bundle
from service.errors import BundleError
from service.store import REVIEW_PENDING, UPLOADED
from sync.dataset import Dataset
from sync.gate import GateConfig, ValidationGate
from sync.merge import Merger
from sync.models import ModelPuller, ModelPullTask, ModelSlots, grpc_reload_fn
from sync.objectstore import LocalFolderStore
from sync.registry import BundleRegistry
from sync.review import ReviewedLabel, persons_from_record
from sync.signing import public_key_pem, sign_manifest

pytestmark = pytest.mark.slow


def publish(registry: Path, base: Bundle, bundle_id: str, created: str, key: Ed25519PrivateKey | None,
            thresholds: Thresholds | None = None) -> Path:
    """Copy ``base`` into ``registry/bundles/<id>`` with a new id (and thresholds), signed with ``key``."""
    folder = registry / "bundles" / bundle_id
    shutil.copytree(base.path, folder)
    (folder / "bundle.sig").unlink(missing_ok=True)
    write_bundle(dataclasses.replace(base, path=folder, id=bundle_id, created=created,
                                     thresholds=thresholds or base.thresholds))
    if key is not None:
        (folder / "bundle.sig").write_bytes(sign_manifest((folder / "bundle.json").read_bytes(), key))
    return folder


@pytest.fixture
def appliance(tmp_path: Path, pose_bundle: Bundle, coco_people_photos: list[Path]) -> Iterator[dict[str, Any]]:
    """A running daemon serving ``<models>/current`` (the adopted coco17 bundle), five reviewed
    hold-out photos in the dataset, a signing key and an empty folder registry."""
    from service.client import AnnotatorClient
    from service.config import load_config
    from service.daemon import Daemon
    from service.server import create_server

    key = Ed25519PrivateKey.generate()
    (tmp_path / "registry.pub").write_bytes(public_key_pem(key))
    slots = ModelSlots(tmp_path / "data" / "models")
    config = load_config(None, env={}, overrides={
        "server.listen": "127.0.0.1:0", "store.root": str(tmp_path / "data" / "store"), "store.min_free_mb": 0,
        "engine.bundle": str(slots.root / "current"), "engine.batch_size": 4, "judge.threshold": 1.0,
        "judge.audit_fraction": 1.0, "judge.near_duplicate": False})
    dataset = Dataset(tmp_path / "data" / "dataset", holdout_fraction=1.0)
    registry = BundleRegistry(LocalFolderStore(tmp_path / "registry"))
    gate = ValidationGate(dataset, lambda i: daemon.store.image_path(i), GateConfig(margin=0.02, min_images=3),
                          slots.root / "work")
    puller = ModelPuller(slots, registry, gate, lambda p: None, public_key=tmp_path / "registry.pub")
    puller.adopt(pose_bundle.path, unsigned=True)  # the first bundle, a local one; pulls must be signed
    daemon = Daemon(config)
    daemon.start()
    server, port = create_server(daemon.config, daemon)
    puller.reload_fn = grpc_reload_fn(f"127.0.0.1:{port}")
    client = AnnotatorClient(f"127.0.0.1:{port}", timeout=60)
    try:
        labels = []
        for photo in coco_people_photos:
            ann = client.annotate(photo.read_bytes())
            assert daemon.store.set_state(ann.image_id, (REVIEW_PENDING,), UPLOADED)
            record = daemon.store.get(ann.image_id).record
            heads, persons = persons_from_record(record)
            labels.append(ReviewedLabel(ann.image_id, ann.width, ann.height, heads, persons, "labelstudio", "p-1",
                                        1_790_000_000.0, "ann", False, tuple(record["keypoint_names"])))
        report = Merger(daemon.store, dataset).merge(labels)
        assert len(report.merged) == len(coco_people_photos) and len(dataset.holdout()) == len(labels)
        yield {"slots": slots, "puller": puller, "client": client, "key": key, "base": pose_bundle,
               "registry": tmp_path / "registry", "photos": coco_people_photos, "daemon": daemon,
               "dataset": dataset}
    finally:
        client.close()
        server.stop(grace=1.0).wait(5)
        daemon.close()
        dataset.close()


def test_good_candidate_switches_and_rollback_restores(appliance: dict[str, Any]) -> None:
    slots, puller, client, base = appliance["slots"], appliance["puller"], appliance["client"], appliance["base"]
    publish(appliance["registry"], base, "20300101T000000-good0001", "2030-01-01T00:00:00Z", appliance["key"])
    publish(appliance["registry"], base, "20200101T000000-old00001", "2020-01-01T00:00:00Z", appliance["key"])

    result = puller.pull_once()
    assert result.switched_to == "20300101T000000-good0001" and result.newer == ["20300101T000000-good0001"]
    gate = result.gate["20300101T000000-good0001"]
    assert gate.passed and gate.quality_checked and gate.images == len(appliance["photos"])
    assert gate.candidate["visibility_accuracy"] == pytest.approx(gate.current["visibility_accuracy"])
    assert client.status().bundle_id == "20300101T000000-good0001"
    assert slots.current_path().name == "20300101T000000-good0001" and slots.previous_path().name == base.id
    assert client.annotate(appliance["photos"][0].read_bytes() + b"\0").bundle_id == "20300101T000000-good0001"

    assert puller.rollback() == base.id
    assert client.status().bundle_id == base.id and slots.current_path().name == base.id
    assert "rolled back" in slots.refused()["20300101T000000-good0001"]
    again = puller.pull_once()
    assert again.switched_to is None and again.newer == []  # never used again


def test_corrupt_tampered_unsigned_and_worse_candidates_are_refused(appliance: dict[str, Any]) -> None:
    slots, puller, client, base, key = (appliance[k] for k in ("slots", "puller", "client", "base", "key"))
    reg = appliance["registry"]
    corrupt = publish(reg, base, "b-corrupt", "2030-01-04T00:00:00Z", key)
    onnx = corrupt / base.models["pose_main"].file
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    tampered = publish(reg, base, "b-tampered", "2030-01-03T00:00:00Z", key)
    manifest = json.loads((tampered / "bundle.json").read_text())
    manifest["thresholds"]["det_conf"] = 0.01
    (tampered / "bundle.json").write_text(json.dumps(manifest))
    publish(reg, base, "b-unsigned", "2030-01-02T00:00:00Z", None)
    absurd = dataclasses.replace(base.thresholds, main=(0.995,) * base.keypoints.count)
    publish(reg, base, "b-worse", "2030-01-01T00:00:00Z", key, thresholds=absurd)

    result = puller.pull_once()
    assert result.switched_to is None
    assert set(result.refused) == {"b-corrupt", "b-tampered", "b-unsigned", "b-worse"}
    assert "checksum mismatch" in result.refused["b-corrupt"]
    assert "does not match bundle.json" in result.refused["b-tampered"]
    assert "bundle.sig is missing" in result.refused["b-unsigned"]
    assert "validation gate" in result.refused["b-worse"] and "visibility_accuracy" in result.refused["b-worse"]
    assert set(slots.refused()) == set(result.refused)
    assert (slots.root / "refused" / "b-worse.reason.txt").is_file()
    assert not any((slots.root / "staging").iterdir()) and slots.installed() == [base.id]
    # The old bundle keeps serving, and nothing refused is tried again.
    assert client.status().bundle_id == base.id and slots.current_path().name == base.id
    assert client.annotate(appliance["photos"][1].read_bytes() + b"\0").bundle_id == base.id
    assert puller.pull_once().newer == []


def test_a_gross_regression_is_refused_with_fewer_hold_out_images_than_min_holdout(
        appliance: dict[str, Any], tmp_path: Path) -> None:
    """Five reviewed hold-out images, min_holdout 20: the gate passed on checksums alone, so a
    box's first retraining (one epoch: OKS AP50 0.02 against 1.00) went into service. Now a gross
    regression is refused (margin 0.5 / sqrt(5) = 0.22); the same bundle again passes, said as a
    coarse check."""
    base, daemon = appliance["base"], appliance["daemon"]
    gate = ValidationGate(appliance["dataset"], daemon.store.image_path, GateConfig(margin=0.02, min_images=20),
                          tmp_path / "work20")
    absurd = dataclasses.replace(base.thresholds, main=(0.995,) * base.keypoints.count)
    worse = load_bundle(publish(tmp_path / "reg20", base, "b-worse", "2030-01-01T00:00:00Z", None, thresholds=absurd))
    same = load_bundle(publish(tmp_path / "reg20", base, "b-same", "2030-01-02T00:00:00Z", None))
    refused = gate.check(base, worse)
    assert not refused.passed and not refused.quality_checked and refused.images == len(appliance["photos"])
    assert "fewer than 20: a gross regression only, margin 0.22" in refused.reason
    assert "visibility_accuracy" in refused.reason, refused.reason
    passed = gate.check(base, same)
    assert passed.passed and not passed.quality_checked and "a gross regression only" in passed.reason
    # One image: a single missed person is the whole metric; nothing is refused on one image.
    one = gate._holdout()[:1]
    gate._holdout = lambda: one  # type: ignore[method-assign]
    alone = gate.check(base, worse)
    assert alone.passed and "margin 1.05" in alone.reason, alone.reason


def test_checksums_only_gate_engine_swap_and_daemon_refusal(tmp_path: Path, pose_bundle: Bundle) -> None:
    """No hold-out images: the gate passes on checksums alone and says so; the reload swaps a
    real Engine; a reload the daemon refuses restores the pointers and refuses the bundle."""
    import numpy as np

    from service.engine import Engine

    serving = {"engine": Engine(pose_bundle)}

    def swap(path: str) -> None:
        serving["engine"] = Engine(load_bundle(path))

    dataset = Dataset(tmp_path / "dataset")
    slots = ModelSlots(tmp_path / "models")
    gate = ValidationGate(dataset, lambda i: tmp_path / "none" / i, GateConfig(min_images=3), tmp_path / "work")
    puller = ModelPuller(slots, BundleRegistry(LocalFolderStore(tmp_path / "registry")), gate, swap)
    puller.adopt(pose_bundle.path)
    publish(tmp_path / "registry", pose_bundle, "b-new", "2030-01-01T00:00:00Z", None)
    result = puller.pull_once()
    assert result.switched_to == "b-new" and serving["engine"].bundle.id == "b-new"
    assert not result.gate["b-new"].quality_checked and "checksums only" in result.gate["b-new"].reason
    assert len(serving["engine"].predict_arrays([np.zeros((64, 64, 3), np.uint8)])) == 1
    task = ModelPullTask(puller)
    assert task.name == "models" and task.run_once() is False  # nothing newer

    def refuse(path: str) -> None:
        raise BundleError(f"{path}: fails on a blank image")

    puller.reload_fn = refuse
    publish(tmp_path / "registry", pose_bundle, "b-newer", "2030-02-01T00:00:00Z", None)
    result = puller.pull_once()
    assert result.switched_to is None and "daemon refused" in result.refused["b-newer"]
    assert slots.current_path().name == "b-new" and slots.previous_path().name == pose_bundle.id
    assert serving["engine"].bundle.id == "b-new"
    dataset.close()


def test_models_cli_adopt_pull_list_rollback(tmp_path: Path, pose_bundle: Bundle,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from service.store import Store
    from sync.models_cli import register

    parser = argparse.ArgumentParser(prog="annotator")
    register(parser.add_subparsers(dest="command", required=True))

    def run(*argv: str) -> str:
        args = parser.parse_args([*argv[:2], "--store-root", str(tmp_path / "store"),
                                  "--registry", str(tmp_path / "registry"), *argv[2:]])
        assert args.func(args) == 0
        return capsys.readouterr().out

    Store(tmp_path / "store").close()
    run("models", "adopt", str(pose_bundle.path))
    publish(tmp_path / "registry", pose_bundle, "b-cli", "2030-01-01T00:00:00Z", None)
    assert "[newer]" in run("models", "list")
    out = run("models", "pull", "--once")
    assert "switched to b-cli" in out and "checksums only" in out
    listing = run("models", "list")
    assert "current   b-cli" in listing and f"previous  {pose_bundle.id}" in listing
    assert f"rolled back to {pose_bundle.id}" in run("models", "rollback")
    assert "refused   b-cli: " in run("models", "list")


def test_models_cli_reloads_with_the_daemons_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`annotator models pull/rollback --daemon` against a daemon with a [server] token: every
    reload was UNAUTHENTICATED (rollback then said the daemon 'could not load' the bundle)."""
    import argparse

    import sync.models
    from service.store import Store
    from sync.models_cli import _settings, build_puller, register

    config = tmp_path / "annotator.toml"
    config.write_text('[server]\ntoken = "s3cret-token"\n')
    Store(tmp_path / "store").close()
    parser = argparse.ArgumentParser(prog="annotator")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["models", "rollback", "--config", str(config), "--store-root", str(tmp_path / "store"),
                              "--registry", str(tmp_path / "registry"), "--daemon", "127.0.0.1:1"])
    s = _settings(args)
    assert s.daemon_token == "s3cret-token" and "s3cret" not in repr(s)
    seen = {}
    monkeypatch.setattr(sync.models, "grpc_reload_fn", lambda target, **kw: seen.update(target=target, **kw))
    _, closing = build_puller(s, with_gate=False)
    for c in closing:
        c.close()
    assert seen == {"target": "127.0.0.1:1", "token": "s3cret-token", "tls": None}
