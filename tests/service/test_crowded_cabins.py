"""Crowded cabins: whose points are whose, whatever the camera's resolution.

A person leaning in from outside the frame, or a back-row passenger cut by it, has points the
pose model places just beyond the image's edge. Whether such a point is ``outside`` must not
depend on how many pixels the camera has: the same picture at 1x and at 4x (or decoded at a
quarter) gives the network the same tensor, so it must give the same labels.
"""
from __future__ import annotations

import numpy as np
import pytest

from service.geometry import letterbox
from service.postprocess import decode_poses


def _pose_output(net_points: list[tuple[float, float]]) -> np.ndarray:
    """One confident person (box inside the picture) with these key points, network pixels."""
    k = len(net_points)
    out = np.zeros((4 + 1 + 3 * k, 4), np.float32)
    out[:5, 0] = [100, 140, 80, 120, 0.9]
    for i, (x, y) in enumerate(net_points):
        out[5 + 3 * i:8 + 3 * i, 0] = [x, y, 0.95]
    return out


@pytest.mark.parametrize("beyond", [0.6, 1.5, 3.0])  # network pixels beyond the left edge
def test_off_image_is_decided_in_network_pixels(beyond: float) -> None:
    """One network output read for a 640 x 480 frame, the same frame at 2560 x 1920 decoded in
    full, and at 2560 x 1920 decoded at a quarter: the point beyond the left edge is outside
    in all three or in none (HEAD: 0.6 network pixels were 1.2 original pixels at 640, kept,
    and 4.8 at 2560, outside)."""
    small = letterbox(np.zeros((480, 640, 3), np.uint8), (320, 320))[1]
    large = letterbox(np.zeros((1920, 2560, 3), np.uint8), (320, 320))[1]
    out = _pose_output([(small.pad_x - beyond, 140.0), (100.0, 140.0)])
    views = {
        "640 x 480": decode_poses(out, (2, 3), small, 1.0, 640, 480, conf=0.25, iou=0.7),
        "2560 x 1920": decode_poses(out, (2, 3), large, 1.0, 2560, 1920, conf=0.25, iou=0.7),
        "2560 x 1920 decoded at 1/4": decode_poses(out, (2, 3), small, 0.25, 2560, 1920, conf=0.25, iou=0.7),
    }
    flags = {name: d.off_image.tolist() for name, d in views.items()}  # type: ignore[union-attr]
    assert len({str(f) for f in flags.values()}) == 1, f"outside depends on the resolution: {flags}"
    assert flags["640 x 480"] == [[beyond > 1.0, False]]



@pytest.fixture(scope="module")
def engine():
    from service.bundle import load_bundle
    from service.cli_daemon import DEMO_BUNDLE
    from service.engine import Engine

    return Engine(load_bundle(DEMO_BUNDLE), providers=["CPUExecutionProvider"])


def test_a_persons_twin_goes_and_a_neighbour_stays(engine) -> None:
    """The engine's decoding of three pose instances on a 320 x 320 frame (no letterbox): person
    A (0.9), A's twin whose box reaches down over the lap of the person in front (0.8; box IoU
    with A 0.64, under nms_iou 0.7) and A's neighbour B (0.85, box IoU with the twin 0.24).
    The twin repeats A's points: it is A twice (HEAD: three persons, A reported twice, one of
    them without a visible-only partner). B's points lie a body apart and stay."""
    from service.imageio import DecodedImage

    m = engine.models["pose_main"]
    k = m.kpt_shape[0]
    rng = np.random.default_rng(0)
    a_points = np.column_stack([rng.uniform(75, 125, k), rng.uniform(75, 185, k)])
    b_points = a_points + [60.0, 0.0]
    out = np.zeros((4 + 1 + 3 * k, 5), np.float32)
    for col, (box, points) in enumerate([((100, 130, 60, 120, 0.9), a_points),
                                         ((105, 150, 70, 160, 0.8), a_points),
                                         ((140, 130, 60, 120, 0.85), b_points)]):
        out[:5, col] = box
        out[5:, col] = np.column_stack([points, np.full(k, 0.95)]).ravel()
    im = DecodedImage.from_array(np.zeros((320, 320, 3), np.uint8))
    lb = letterbox(im.pixels, m.size)[1]
    d = engine._decode(m, out, lb, im)
    np.testing.assert_allclose(d.scores, [0.9, 0.85], atol=1e-6)
    assert d.keypoints is not None
    np.testing.assert_allclose(d.keypoints[:, :, :2], [a_points, b_points], atol=1e-3)
