"""Decoding raw outputs with known geometry: thresholds, NMS, mapping, clipping."""
from __future__ import annotations

import numpy as np
import pytest

from service.geometry import Letterbox
from service.postprocess import decode_detections, decode_poses

# 640x480 original decoded at half size (320x240), letterboxed into 320x320: gain 1, pad_y 40.
LB = Letterbox(scale=1.0, pad_x=0.0, pad_y=40.0)
SCALE = 0.5


def _detect_output(rows: list[tuple[float, ...]], anchors: int = 10, classes: int = 1) -> np.ndarray:
    out = np.zeros((4 + classes, anchors), np.float32)
    for a, row in enumerate(rows):
        out[:, a] = row
    return out


@pytest.mark.parametrize(
    "rows,expected_boxes,expected_scores",
    [
        ([], np.zeros((0, 4)), []),
        ([(50, 60, 20, 40, 0.2)], np.zeros((0, 4)), []),  # below det_conf 0.25
        ([(50, 60, 20, 40, 0.9)], [[80, 0, 120, 80]], [0.9]),  # cy 60 - pad 40 = 20 decoded = 40 original
        ([(50, 60, 20, 40, 0.5), (51, 60, 20, 40, 0.9), (200, 200, 10, 10, 0.3)],  # NMS keeps the better twin
         [[82, 0, 122, 80], [390, 310, 410, 330]], [0.9, 0.3]),
        ([(5, 45, 30, 30, 0.8)], [[0, 0, 40, 40]], [0.8]),  # clipped at the image border
    ],
)
def test_decode_detections(rows, expected_boxes, expected_scores) -> None:
    d = decode_detections(_detect_output(rows), LB, SCALE, 640, 480, 1, conf=0.25, iou=0.7)
    np.testing.assert_allclose(d.boxes, np.array(expected_boxes).reshape(-1, 4), atol=1e-4)
    np.testing.assert_allclose(d.scores, expected_scores, atol=1e-6)
    assert d.keypoints is None and len(d) == len(expected_scores)


def test_decode_detections_multi_class_and_max_det() -> None:
    rows = [(10 + 30 * i, 100, 10, 10, 0.1 * (i % 3), 0.3 + 0.05 * i) for i in range(8)]
    d = decode_detections(_detect_output(rows, anchors=8, classes=2), LB, 1.0, 320, 240, 2,
                          conf=0.25, iou=0.5, max_det=3)
    assert len(d) == 3 and d.class_ids.tolist() == [1, 1, 1]
    np.testing.assert_allclose(d.scores, [0.65, 0.6, 0.55], atol=1e-6)


def test_decode_poses_maps_points() -> None:
    k = 2
    out = np.zeros((4 + 1 + 3 * k, 6), np.float32)
    out[:, 0] = [50, 60, 20, 40, 0.9, 45, 50, 0.8, 400, 30, 0.1]  # second point lies outside
    d = decode_poses(out, (k, 3), LB, SCALE, 640, 480, conf=0.25, iou=0.7)
    assert d.keypoints is not None and d.keypoints.shape == (1, 2, 3)
    np.testing.assert_allclose(d.keypoints[0], [[90, 20, 0.8], [640, 0, 0.1]], atol=1e-4)
    assert d.off_image is not None and d.off_image.tolist() == [[False, True]]  # clipped, and marked
    np.testing.assert_allclose(d.boxes, [[80, 0, 120, 80]], atol=1e-4)
    empty = decode_poses(np.zeros((4 + 1 + 3 * k, 6), np.float32), (k, 3), LB, SCALE, 640, 480, 0.25, 0.7)
    assert empty.keypoints is not None and empty.keypoints.shape == (0, 2, 3)


def test_decode_poses_without_confidences() -> None:
    out = np.zeros((4 + 1 + 2 * 2, 3), np.float32)
    out[:, 0] = [50, 60, 20, 40, 0.9, 45, 50, 46, 52]
    d = decode_poses(out, (2, 2), LB, 1.0, 320, 240, conf=0.25, iou=0.7)
    np.testing.assert_allclose(d.keypoints[0, :, 2], [1.0, 1.0])


def test_decode_poses_rejects_wrong_layout() -> None:
    with pytest.raises(ValueError, match=r"expected \[56, A\] for kpt_shape \[17, 3\]"):
        decode_poses(np.zeros((62, 10), np.float32), (17, 3), LB, 1.0, 320, 240, 0.25, 0.7)
