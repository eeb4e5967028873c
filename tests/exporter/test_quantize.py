"""Int8 bundles (``annotator quantize``): the daemon runs them as they are, the layers that move
the labels stay float32, and the labels stay those of the float32 bundle."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from procs import REPO, command_env
from service.bundle import load_bundle
from service.engine import Engine
from service.imageio import read_image

DEMO = REPO / "service" / "assets" / "demo_bundle"
SAMPLES = REPO / "service" / "assets" / "samples"


def _iou(a: tuple, b: tuple) -> float:
    x1, y1, x2, y2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory: pytest.TempPathFactory):
    onnx = pytest.importorskip("onnx")
    from exporter.quantize import quantize_bundle

    out = tmp_path_factory.mktemp("int8") / "bundle"
    return quantize_bundle(DEMO, out, SAMPLES, count=6), onnx


def test_an_int8_bundle_is_a_bundle_with_int8_models_and_its_parent_named(int8_bundle) -> None:
    bundle, onnx = int8_bundle
    demo = load_bundle(DEMO)
    assert bundle.id != demo.id and bundle.lineage["parent_bundle"] == demo.id
    assert "int8" in bundle.lineage["notes"][-1] and "6 images" in bundle.lineage["notes"][-1]
    assert bundle.thresholds == demo.thresholds and set(bundle.models) == set(demo.models)
    for role in bundle.models:
        model = onnx.load(str(bundle.model_path(role)))
        ops = [n.op_type for n in model.graph.node]
        assert ops.count("QuantizeLinear") > 20 and ops.count("DequantizeLinear") > 40, role
        weights = {i.name: i.data_type for i in model.graph.initializer}
        made_by = {o: n.op_type for n in model.graph.node for o in n.output}
        convs = [n for n in model.graph.node if n.op_type == "Conv"]
        int8_convs = [n for n in convs if made_by.get(n.input[1]) == "DequantizeLinear"]
        float_convs = [n for n in convs if weights.get(n.input[1]) == onnx.TensorProto.FLOAT]
        assert len(int8_convs) > len(float_convs) > 0, role
        head = max(int(n.name.split("/")[1].split(".")[1]) for n in convs if n.name.startswith("/model."))
        # the final prediction convolutions (no activation after them) and, in the pose
        # models, the whole key-point branch stay float32
        finals = [n.name for n in convs if n.name.startswith(f"/model.{head}/") and n.name.endswith(".2/Conv")]
        assert finals and set(finals) <= {n.name for n in float_convs}, role
        if role != "head":
            assert all(n in float_convs for n in convs if f"/model.{head}/cv4" in n.name), role
        # the ultralytics metadata the engine reads (stride, kpt_shape, imgsz) came along
        assert {p.key for p in model.metadata_props} >= {"stride", "imgsz"}, role


def test_the_int8_bundle_labels_the_samples_as_the_float32_one_does(int8_bundle) -> None:
    bundle, _ = int8_bundle
    images = [read_image(p) for p in sorted(SAMPLES.glob("*.jpg"))]
    ref, got = Engine(load_bundle(DEMO)).predict(images), Engine(bundle).predict(images)
    pairs, near, same = 0, [], []
    for a, b in zip(ref, got):
        assert abs(len(a.persons) - len(b.persons)) <= 1
        for pa in a.persons:
            best = max(b.persons, key=lambda pb: _iou(pa.box, pb.box), default=None)
            if best is None or _iou(pa.box, best.box) < 0.7:
                continue
            pairs += 1
            near += [np.hypot(ka.x - kb.x, ka.y - kb.y) for ka, kb in zip(pa.keypoints, best.keypoints)]
            same += [ka.visibility == kb.visibility for ka, kb in zip(pa.keypoints, best.keypoints)]
    # measured: 37 of 37 persons matched, key points 1.7 px apart (median; 5 px at the 90th
    # percentile) on these 640 x 480 images, 97 % of the visibilities unchanged
    assert pairs >= sum(len(a.persons) for a in ref) - 2
    assert float(np.median(near)) < 3.0 and float(np.percentile(near, 90)) < 10.0
    assert float(np.mean(same)) >= 0.9


def test_quantize_command_says_what_to_fix(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    empty = tmp_path / "no-images"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    (empty / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    for images, words in ((tmp_path / "missing", "not a folder"), (empty, "no image")):
        res = subprocess.run([sys.executable, "-m", "service.cli", "quantize", str(DEMO), str(tmp_path / "out"),
                              "--images", str(images)], cwd=REPO, env=command_env(), capture_output=True, text=True)
        assert res.returncode == 2 and words in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


def test_a_bundle_with_a_fixed_batch_is_calibrated_at_that_batch(tmp_path: Path) -> None:
    """Models exported with a fixed batch (the GPU's padded batches) take the calibration images
    as that many copies; the int8 copy keeps the batch and runs in the engine."""
    import dataclasses

    onnx = pytest.importorskip("onnx")
    from exporter.quantize import quantize_bundle
    from service.bundle import write_bundle

    demo = load_bundle(DEMO)
    fixed = tmp_path / "fixed"
    fixed.mkdir()
    for role, entry in demo.models.items():
        model = onnx.load(str(demo.model_path(role)))
        dim = model.graph.input[0].type.tensor_type.shape.dim[0]
        dim.ClearField("dim_param")
        dim.dim_value = 2
        onnx.save(model, str(fixed / entry.file))
    write_bundle(dataclasses.replace(demo, path=fixed))
    int8 = quantize_bundle(fixed, tmp_path / "int8", SAMPLES, count=2)
    engine = Engine(int8)
    assert {m.fixed_batch for m in engine.models.values()} == {2}
    images = [read_image(p) for p in sorted(SAMPLES.glob("*.jpg"))[:3]]
    assert [len(p.persons) > 0 for p in engine.predict(images)] == [True] * 3


def test_a_failed_quantize_leaves_the_bundle_at_dst_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DST may be what a daemon runs (an earlier int8 copy): it is replaced only by a copy that
    loads, and a failure half-way (here the second model) leaves it whole and no debris beside."""
    import shutil

    pytest.importorskip("onnx")
    import exporter.quantize as quantize

    dst = tmp_path / "int8"
    shutil.copytree(DEMO, dst)
    before = load_bundle(dst).id
    real, calls = quantize.quantize_model, []

    def second_fails(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(args[0])
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(quantize, "quantize_model", second_fails)
    with pytest.raises(RuntimeError, match="killed"):
        quantize.quantize_bundle(DEMO, dst, SAMPLES, count=2)
    assert load_bundle(dst).id == before and sorted(p.name for p in tmp_path.iterdir()) == ["int8"]
    monkeypatch.setattr(quantize, "quantize_model", real)
    assert quantize.quantize_bundle(DEMO, dst, SAMPLES, count=2).id != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8"]


def test_train_int8_publishes_the_int8_copy_with_the_training_checkpoints(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """``annotator train --int8``: the loop keeps int8 bundles. OUT stays the float32 bundle,
    OUT.int8 is its int8 copy (the checkpoints in weights/ came along, so that ``--init current``
    goes on from them) and the registry gets the int8 copy. Training itself is replaced by a copy
    of the demo bundle: what is tested is what happens after it."""
    import dataclasses
    import shutil

    pytest.importorskip("onnx")
    import exporter.train
    from service.bundle import write_bundle
    from service.cli import build_parser

    def trained(cfg):  # type: ignore[no-untyped-def]
        shutil.copytree(DEMO, cfg.out)
        (cfg.out / "weights").mkdir()
        (cfg.out / "weights" / "pose_main.pt").write_bytes(b"checkpoint")
        demo = load_bundle(cfg.out)
        write_bundle(dataclasses.replace(demo, lineage={**demo.lineage, "dataset": {"version": 7}}))
        return load_bundle(cfg.out)

    monkeypatch.setattr(exporter.train, "train_bundle", trained)
    parser = build_parser()
    out, registry = tmp_path / "b", tmp_path / "registry"
    registry.mkdir()
    args = parser.parse_args(["train", str(SAMPLES / "annotations.json"), str(out), "--images", str(SAMPLES),
                              "--int8", "--publish", str(registry)])
    assert args.func(args) == 0
    trained_id, int8 = load_bundle(out).id, load_bundle(Path(f"{out}.int8"))
    assert int8.lineage["parent_bundle"] == trained_id and int8.lineage["dataset"] == {"version": 7}
    assert (int8.path / "weights" / "pose_main.pt").read_bytes() == b"checkpoint"
    assert sorted(p.name for p in (registry / "bundles").iterdir()) == [int8.id]
