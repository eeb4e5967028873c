"""Bundle loading refuses tampered, mismatched, incomplete and unknown-format bundles."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from service.bundle import load_bundle
from service.errors import BundleError
from service.keypoints import CABIN19, COCO17, KeypointSchema


@pytest.fixture
def bundle_copy(pose_bundle, tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(pose_bundle.path, target)
    return target


def _edit_manifest(path: Path, change) -> None:
    manifest = path / "bundle.json"
    data = json.loads(manifest.read_text())
    change(data)
    manifest.write_text(json.dumps(data))


def test_good_bundle_loads(bundle_copy: Path, pose_keypoints: KeypointSchema) -> None:
    b = load_bundle(bundle_copy)
    n = pose_keypoints.count  # 17 (COCO-17) or 19 (the demo's cabin-19 network)
    assert set(b.models) == {"pose_main"} and b.visibility_mode == "main_only"
    assert b.models["pose_main"].kpt_shape == (n, 3) and b.keypoints.count == n
    assert b.keypoints.names == pose_keypoints.names


def test_tampered_onnx_is_refused(bundle_copy: Path) -> None:
    onnx = bundle_copy / "pose_main.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum mismatch for pose_main.onnx"):
        load_bundle(bundle_copy)


def test_output_layout_mismatch_is_refused(bundle_copy: Path, pose_keypoints: KeypointSchema) -> None:
    # Declare the other schema (19 cabin points for a 17-point network, or 17 COCO points for a
    # 19-point one): checksums still match, the output's channels do not.
    other = CABIN19 if pose_keypoints.count == 17 else COCO17

    def declare_other(d: dict) -> None:
        d["models"]["pose_main"]["kpt_shape"] = [other.count, 3]
        d["keypoints"] = other.to_json()

    _edit_manifest(bundle_copy, declare_other)
    channels = 5 + 3 * other.count  # 62 for cabin-19, 56 for COCO-17
    with pytest.raises(BundleError, match=rf"output shape .* does not match the declared layout \[N, {channels}, A\]"):
        load_bundle(bundle_copy)


def test_task_mismatch_is_refused(bundle_copy: Path) -> None:
    # A pose network declared as a one-class detector: [N, 5, A] expected, [N, 56, A] (or 62) found.
    _edit_manifest(bundle_copy, lambda d: d["models"]["pose_main"].update(task="detect", kpt_shape=None))
    with pytest.raises(BundleError, match=r"does not match the declared layout \[N, 5, A\]"):
        load_bundle(bundle_copy)


def test_missing_file_is_refused(bundle_copy: Path) -> None:
    (bundle_copy / "pose_main.onnx").unlink()
    with pytest.raises(BundleError, match="pose_main.onnx is missing"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize("fmt", [0, 2, "1", None])
def test_unknown_format_is_refused(bundle_copy: Path, fmt) -> None:
    _edit_manifest(bundle_copy, lambda d: d.update(format=fmt))
    with pytest.raises(BundleError, match="format .* is not supported"):
        load_bundle(bundle_copy)


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no bundle.json"):
        load_bundle(tmp_path)


def _set_first_model(d: dict, value) -> None:
    d["models"][next(iter(d["models"]))] = value


@pytest.mark.parametrize("edit", [
    lambda d: d.update(thresholds=[0.5]),
    lambda d: d.update(thresholds={"det_conf": "high"}),
    lambda d: d.update(thresholds={"det_conf": [0.3]}),
    lambda d: d.update(models=[1, 2]),
    lambda d: _set_first_model(d, "pose_main.onnx"),
    lambda d: d["models"]["pose_main"].update(kpt_shape=[19]),
    lambda d: d.update(judgement=[1]),
    lambda d: d.update(metrics="x"),
    lambda d: d.update(appearance=[1]),
    lambda d: d.update(head_from_face="false"),
], ids=["thresholds-list", "det_conf-text", "det_conf-list", "models-list", "model-entry-text", "kpt_shape-1d",
        "judgement-list", "metrics-text", "appearance-list", "head_from_face-text"])
def test_a_malformed_manifest_value_is_a_bundle_error(bundle_copy: Path, edit) -> None:
    """The daemon's reload answers a BundleError with FAILED_PRECONDITION and the model pull
    refuses the bundle; any other exception stopped the pull and read as a server fault."""
    _edit_manifest(bundle_copy, edit)
    with pytest.raises(BundleError, match="bundle.json is malformed|kpt_shape|head_from_face|malformed entry|appearance"):
        load_bundle(bundle_copy)


def test_a_manifest_that_is_not_an_object_is_a_bundle_error(bundle_copy: Path) -> None:
    (bundle_copy / "bundle.json").write_text("[]")
    with pytest.raises(BundleError, match="must hold a JSON object"):
        load_bundle(bundle_copy)


def test_an_unreadable_bundle_is_a_bundle_error(tmp_path: Path) -> None:
    """A path the system refuses (a name too long; a folder the service cannot read goes the same
    way): a BundleError saying so (gRPC FAILED_PRECONDITION), not an OSError that ReloadModels
    answered as INTERNAL with the whole name in its log."""
    with pytest.raises(BundleError, match="cannot read the bundle") as info:
        load_bundle(tmp_path / ("z" * 3000))
    assert "File name too long" in str(info.value) and len(str(info.value)) < 400


def test_a_passing_read_error_is_not_a_bundle_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Too many open files (or an I/O error) while a good bundle is verified is this machine's
    trouble, not the bundle's: it stays an OSError, which the model pull retries, where a
    BundleError would refuse the bundle for good."""
    import errno

    import service.bundle as bundle_module

    def no_files(path: object) -> str:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(bundle_module, "sha256_file", no_files)
    with pytest.raises(OSError) as info:
        load_bundle(Path(__file__).resolve().parents[2] / "service" / "assets" / "demo_bundle")
    assert not isinstance(info.value, BundleError) and info.value.errno == errno.EMFILE
