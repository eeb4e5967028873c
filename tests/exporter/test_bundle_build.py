"""build_bundle: export, metadata, visibility mode, verification; fixed-batch models in the engine."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from service.bundle import load_bundle
from service.errors import BundleError
from service.imageio import read_image
from service.keypoints import COCO17


def test_built_bundle_contents(coco17_bundle) -> None:
    b = coco17_bundle
    entry = b.models["pose_main"]
    assert (entry.file, entry.task, entry.names, entry.kpt_shape, entry.imgsz) == (
        "pose_main.onnx", "pose", ("person",), (17, 3), (320, 320))
    assert b.keypoints == COCO17
    assert b.visibility_mode == "main_only" and b.head_from_face
    assert any("main_only" in n for n in b.lineage["notes"])
    on_disk = json.loads((b.path / "bundle.json").read_text())
    assert on_disk["id"] == b.id and len(on_disk["models"]["pose_main"]["sha256"]) == 64
    assert load_bundle(b.path).id == b.id


def test_two_model_bundle(coco17_two_model_bundle) -> None:
    b = coco17_two_model_bundle
    assert set(b.models) == {"pose_main", "pose_visible"} and b.visibility_mode == "two_model"
    assert b.thresholds.main == (0.5,) * 17 and b.thresholds.visible == (0.9,) * 17
    assert "notes" not in b.lineage


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(head=None, pose_main=None, pose_visible=None), "at least one model"),
        (dict(head=None, pose_main=None, pose_visible="x.onnx"), "needs a pose_main"),
        (dict(head=None, pose_main="missing.onnx", pose_visible=None), "does not exist"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs, message) -> None:
    from exporter.bundle_build import build_bundle

    with pytest.raises(BundleError, match=message):
        build_bundle(tmp_path / "b", imgsz=320, **{k: (tmp_path / v if v else None) for k, v in kwargs.items()})


def test_wrong_keypoint_names(tmp_path: Path, coco17_bundle) -> None:
    from exporter.bundle_build import build_bundle

    with pytest.raises(BundleError, match="3 names given but the pose models have 17"):
        build_bundle(tmp_path / "b", None, coco17_bundle.model_path("pose_main"), None, 320,
                     keypoint_names=["a", "b", "c"])


def test_fixed_batch_export_runs_in_the_engine(tmp_path: Path, yolo11n_pose_pt, coco17_bundle,
                                               coco_people_photos) -> None:
    from exporter.bundle_build import build_bundle
    from service.engine import Engine

    fixed = build_bundle(tmp_path / "fixed", None, yolo11n_pose_pt, None, 320, dynamic_batch=False)
    engine = Engine(fixed, batch_size=8)
    assert engine.models["pose_main"].fixed_batch == 1
    images = [read_image(p) for p in coco_people_photos[:3]]
    got = engine.predict(images)
    want = Engine(coco17_bundle).predict(images)
    for a, b in zip(got, want):
        assert len(a.persons) == len(b.persons)
        for pa, pb in zip(a.persons, b.persons):
            np.testing.assert_allclose(pa.box, pb.box, atol=0.05)
