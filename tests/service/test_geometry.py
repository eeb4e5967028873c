"""Letterbox and coordinate mapping against known geometry and against ultralytics itself."""
from __future__ import annotations

import numpy as np
import pytest

from service.geometry import (
    Letterbox, box_iou, boxes_to_original, clip_boxes, cxcywh_to_xyxy, letterbox, nms,
    points_to_network, points_to_original, to_tensor, xyxy_to_xywh,
)

# (image height, width, channels or None for gray), network (height, width)
SHAPES = [
    ((480, 640, 3), (320, 320)),   # landscape, downscale
    ((640, 480, 3), (320, 320)),   # portrait
    ((333, 517, None), (320, 320)),  # odd sizes, gray
    ((100, 60, 3), (640, 640)),    # upscale
    ((320, 320, 3), (320, 320)),   # identity
    ((1, 3000, 3), (320, 320)),    # very thin
    ((427, 640, 1), (384, 640)),   # non-square network input, HxWx1
]


def _image(shape: tuple[int, int, int | None], seed: int = 0) -> np.ndarray:
    h, w, c = shape
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w) if c is None else (h, w, c), dtype=np.uint8)


def test_letterbox_known_geometry() -> None:
    out, lb = letterbox(np.zeros((480, 640, 3), np.uint8), (320, 320))
    assert out.shape == (320, 320, 3)
    assert (lb.scale, lb.pad_x, lb.pad_y) == (0.5, 0.0, 40.0)
    assert (out[:40] == 114).all() and (out[280:] == 114).all() and (out[40:280] == 0).all()
    net = points_to_network(np.array([[100.0, 200.0]]), lb)
    np.testing.assert_allclose(net, [[50.0, 140.0]])
    np.testing.assert_allclose(points_to_original(net, lb), [[100.0, 200.0]])


@pytest.mark.parametrize("shape,size", SHAPES)
def test_point_round_trip(shape, size) -> None:
    img = _image(shape)
    out, lb = letterbox(img, size)
    assert out.shape == (*size, 3) and out.dtype == np.uint8
    h, w = shape[:2]
    pts = np.array([[0.0, 0.0], [w, h], [w / 3, h / 7], [w - 1, 0.5]], np.float32)
    for pixel_scale in (1.0, 0.25, (0.5, 0.25)):
        back = points_to_original(points_to_network(pts, lb, pixel_scale), lb, pixel_scale)
        np.testing.assert_allclose(back, pts, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("shape,size", SHAPES)
def test_letterbox_matches_ultralytics(shape, size) -> None:
    pytest.importorskip("ultralytics", reason="compares with ultralytics' LetterBox")
    from ultralytics.data.augment import LetterBox
    from ultralytics.utils import ops

    img = _image(shape)
    ours, lb = letterbox(img, size)
    ref_in = img if img.ndim == 3 and img.shape[2] == 3 else np.repeat(img.reshape(*img.shape[:2], 1), 3, axis=2)
    ref = LetterBox(size, auto=False, scale_fill=False, scaleup=True, center=True)(image=ref_in)
    np.testing.assert_array_equal(ours, ref)
    pts = np.array([[[5.0, 7.0, 1.0], [size[1] / 2, size[0] / 3, 1.0], [size[1] - 3.0, size[0] - 2.0, 1.0]]],
                   np.float32)
    import torch

    ref_pts = ops.scale_coords(size, torch.from_numpy(pts.copy()), img.shape[:2]).numpy()
    h, w = img.shape[:2]
    mine = points_to_original(pts, lb)
    mine[..., 0] = mine[..., 0].clip(0, w)
    mine[..., 1] = mine[..., 1].clip(0, h)
    np.testing.assert_allclose(mine[..., :2], ref_pts[..., :2], atol=1e-3)


@pytest.mark.parametrize("count", [0, 1, 3])
def test_to_tensor(count: int) -> None:
    imgs = [np.full((4, 6, 3), (10 * i, 20, 255), np.uint8) for i in range(count)]
    t = to_tensor(imgs)
    assert t.dtype == np.float32
    if count == 0:
        assert t.shape == (0, 3, 0, 0)
        return
    assert t.shape == (count, 3, 4, 6)
    np.testing.assert_allclose(t[:, 0], 1.0)  # R came from BGR's last channel
    np.testing.assert_allclose(t[:, 1], 20 / 255)
    np.testing.assert_allclose(t[-1, 2], 10 * (count - 1) / 255)


@pytest.mark.parametrize(
    "cxcywh,xyxy,xywh",
    [
        (np.zeros((0, 4)), np.zeros((0, 4)), np.zeros((0, 4))),
        ([[10, 20, 4, 6]], [[8, 17, 12, 23]], [[8, 17, 4, 6]]),
        ([[0, 0, 0, 0], [5, 5, 10, 2]], [[0, 0, 0, 0], [0, 4, 10, 6]], [[0, 0, 0, 0], [0, 4, 10, 2]]),
    ],
)
def test_box_format_conversions(cxcywh, xyxy, xywh) -> None:
    np.testing.assert_allclose(cxcywh_to_xyxy(np.array(cxcywh)), np.array(xyxy).reshape(-1, 4))
    np.testing.assert_allclose(xyxy_to_xywh(np.array(xyxy)), np.array(xywh).reshape(-1, 4))


def test_boxes_to_original_and_clip() -> None:
    lb = Letterbox(scale=0.5, pad_x=0.0, pad_y=40.0)
    boxes = boxes_to_original(np.array([[0, 40, 160, 160], [-10, 0, 400, 400]]), lb, pixel_scale=0.5)
    np.testing.assert_allclose(boxes[0], [0, 0, 640, 480])
    clipped = clip_boxes(boxes, 1280, 960)
    np.testing.assert_allclose(clipped[1], [0, 0, 1280, 960])
    assert boxes_to_original(np.zeros((0, 4)), lb).shape == (0, 4)


@pytest.mark.parametrize(
    "a,b,expected",
    [
        (np.zeros((0, 4)), [[0, 0, 1, 1]], np.zeros((0, 1))),
        ([[0, 0, 10, 10]], [[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 0, 0]],
         [[1.0, 50 / 150, 0.0, 0.0]]),
    ],
)
def test_box_iou(a, b, expected) -> None:
    np.testing.assert_allclose(box_iou(np.array(a), np.array(b)), np.array(expected), atol=1e-6)


@pytest.mark.parametrize(
    "boxes,scores,iou,max_det,kept",
    [
        (np.zeros((0, 4)), np.zeros(0), 0.5, 0, []),
        ([[0, 0, 10, 10], [1, 1, 10, 10], [50, 50, 55, 55]], [0.8, 0.9, 0.3], 0.5, 0, [1, 2]),
        ([[0, 0, 10, 10], [1, 1, 10, 10], [50, 50, 55, 55]], [0.8, 0.9, 0.3], 0.9, 0, [1, 0, 2]),
        ([[0, 0, 10, 10], [1, 1, 10, 10], [50, 50, 55, 55]], [0.8, 0.9, 0.3], 0.9, 2, [1, 0]),
    ],
)
def test_nms(boxes, scores, iou, max_det, kept) -> None:
    assert nms(np.array(boxes, float), np.array(scores), iou, max_det).tolist() == kept


def test_nms_suppresses_among_every_candidate_before_the_cap() -> None:
    """300 near-identical boxes of one confident person and a second person scored lower:
    cv2's top_k kept the best 300 candidates *before* suppressing, and the second person was
    lost; the cap applies to what survives suppression, as in ultralytics."""
    rng = np.random.default_rng(0)
    boxes = np.concatenate([np.array([[10, 10, 100, 200]] * 300, float) + rng.normal(0, 1, (300, 4)),
                            np.array([[300, 10, 400, 200]] * 20, float) + rng.normal(0, 1, (20, 4))])
    scores = np.concatenate([np.linspace(0.95, 0.80, 300), np.linspace(0.7, 0.5, 20)])
    assert nms(boxes, scores, 0.7, 300).tolist() == [0, 300]
    assert nms(boxes, scores, 0.7, 1).tolist() == [0]
