"""service.draw: filled vs hollow marks, outside not drawn, side colours, scaling, contact sheet."""
from __future__ import annotations

import numpy as np
import pytest

from service.draw import (CENTRE_COLOUR, HEAD_COLOUR, LEFT_COLOUR, RIGHT_COLOUR, contact_sheet,
                          draw_prediction, marker_sizes)
from service.keypoints import KeypointSchema
from service.record import Head, Keypoint, Person, Prediction

SCHEMA = KeypointSchema(("nose", "left_eye", "right_eye", "left_ear"), (0.03,) * 4, ((0, 1),))


def _person(points: list[tuple[float, float, str]]) -> Person:
    kps = tuple(Keypoint(x, y, 0.9, 0.9, vis) for x, y, vis in points)
    return Person((10.0, 10.0, 190.0, 190.0), 0.9, kps)


def _pixel(img: np.ndarray, x: int, y: int) -> tuple[int, int, int]:
    return tuple(int(c) for c in img[y, x])


def test_visible_filled_occluded_hollow_outside_absent() -> None:
    image = np.zeros((200, 200, 3), np.uint8)
    pred = Prediction(200, 200, persons=(_person([
        (40, 40, "visible"), (100, 100, "occluded"), (160, 40, "visible"), (160, 160, "outside")]),))
    out = draw_prediction(image, pred, SCHEMA, draw_boxes=False, draw_skeleton=False)
    radius, _ = marker_sizes(200, 200)
    assert image.sum() == 0, "the input must not be modified"
    assert _pixel(out, 40, 40) == CENTRE_COLOUR  # nose: filled, centre colour
    assert _pixel(out, 160, 40) == RIGHT_COLOUR  # right_eye: filled, right colour
    assert _pixel(out, 100, 100) == (0, 0, 0), "an occluded point is a hollow ring"
    assert _pixel(out, 100 + radius, 100) == LEFT_COLOUR  # left_eye ring
    assert out[150:171, 150:171].sum() == 0, "outside points are not drawn"


def test_skeleton_edges_skip_outside_points() -> None:
    image = np.zeros((200, 200, 3), np.uint8)
    both = Prediction(200, 200, persons=(_person([(40, 100, "visible"), (160, 100, "visible"),
                                                  (0, 0, "outside"), (0, 0, "outside")]),))
    one_out = Prediction(200, 200, persons=(_person([(40, 100, "visible"), (160, 100, "outside"),
                                                     (0, 0, "outside"), (0, 0, "outside")]),))
    assert draw_prediction(image, both, SCHEMA, draw_boxes=False)[100, 100].any()
    assert not draw_prediction(image, one_out, SCHEMA, draw_boxes=False)[100, 100].any()


def test_head_box_and_coordinates_scale_to_image() -> None:
    image = np.zeros((100, 100, 3), np.uint8)  # prediction made on a 200x200 original
    pred = Prediction(200, 200, heads=(Head((20.0, 20.0, 180.0, 180.0), 0.8),),
                      persons=(_person([(100, 100, "visible"), (0, 0, "outside"), (0, 0, "outside"),
                                        (0, 0, "outside")]),))
    out = draw_prediction(image, pred, SCHEMA, show_conf=False)
    assert _pixel(out, 50, 50) == CENTRE_COLOUR
    assert _pixel(out, 50, 10) == HEAD_COLOUR


def test_sizes_grow_with_image() -> None:
    small, large = marker_sizes(320, 240), marker_sizes(1920, 1080)
    assert small[0] >= 3 and large[0] > small[0] and large[1] > small[1]


def test_wrong_point_count_is_refused() -> None:
    pred = Prediction(50, 50, persons=(_person([(1, 1, "visible")]),))
    with pytest.raises(ValueError, match="key points"):
        draw_prediction(np.zeros((50, 50, 3), np.uint8), pred, SCHEMA)


@pytest.mark.parametrize("count, cols, shape", [
    (0, 4, (100, 100, 3)), (1, 4, (100, 100, 3)), (5, 4, (200, 400, 3)), (4, 2, (200, 200, 3)),
])
def test_contact_sheet_layout(count: int, cols: int, shape: tuple[int, int, int]) -> None:
    images = [np.full((60 + 10 * i, 90, 3), 200, np.uint8) for i in range(count)]
    sheet = contact_sheet(images, cols=cols, tile_size=(100, 80), captions=[f"im{i}" for i in range(count)])
    assert sheet.shape == shape and sheet.dtype == np.uint8


def test_contact_sheet_rejects_mismatched_captions() -> None:
    with pytest.raises(ValueError, match="captions"):
        contact_sheet([np.zeros((10, 10, 3), np.uint8)], captions=["a", "b"])
