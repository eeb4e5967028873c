"""The visibility rule and person matching, as tables."""
from __future__ import annotations

import numpy as np
import pytest

from service.visibility import decide_visibility, decide_visibility_main_only, match_persons


@pytest.mark.parametrize(
    "main,vis,scores,thr,expected",
    [
        ([], [], None, 0.5, []),
        ([[0, 0, 10, 10]], [], None, 0.5, [None]),
        ([], [[0, 0, 10, 10]], None, 0.5, []),
        ([[0, 0, 10, 10], [20, 0, 30, 10]], [[21, 0, 31, 10], [0, 0, 10, 9]], None, 0.5, [1, 0]),
        ([[0, 0, 10, 10]], [[5, 0, 15, 10]], None, 0.5, [None]),  # IoU 1/3 is too low
        ([[0, 0, 10, 10]], [[5, 0, 15, 10]], None, 0.3, [0]),
        # both main persons want the same box; the more confident one (index 1) gets it
        ([[0, 0, 10, 10], [0, 0, 10, 11]], [[0, 0, 10, 10.5]], [0.4, 0.9], 0.5, [None, 0]),
        ([[0, 0, 10, 10], [0, 0, 10, 11]], [[0, 0, 10, 10.5]], None, 0.5, [0, None]),
    ],
)
def test_match_persons(main, vis, scores, thr, expected) -> None:
    assert match_persons(np.array(main), np.array(vis), thr, None if scores is None else np.array(scores)) == expected


@pytest.mark.parametrize(
    "main,vis,main_thr,vis_thr,expected",
    [
        (np.zeros((0, 3)), np.zeros((0, 3)), 0.6, 0.6, np.zeros((0, 3))),
        ([[0.9, 0.9, 0.5, 0.6]], [[0.9, 0.1, 0.9, 0.9]], 0.6, 0.6, [[2, 1, 0, 0]]),
        ([[0.9, 0.9, 0.9, 0.9]], [[0.6, 0.61, 0.0, 1.0]], 0.6, 0.6, [[1, 2, 1, 2]]),  # thresholds are strict
        # per-key-point thresholds
        ([[0.7, 0.7], [0.7, 0.7]], [[0.7, 0.7], [0.0, 0.0]], [0.5, 0.8], [0.6, 0.6], [[2, 0], [1, 0]]),
    ],
)
def test_decide_visibility(main, vis, main_thr, vis_thr, expected) -> None:
    flags = decide_visibility(np.array(main), np.array(vis), main_thr, vis_thr)
    assert flags.dtype == np.int8
    np.testing.assert_array_equal(flags, np.array(expected).reshape(flags.shape))


def test_decide_visibility_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="one shape"):
        decide_visibility(np.zeros((1, 3)), np.zeros((1, 4)), 0.5, 0.5)
    with pytest.raises(ValueError, match="1 or 3"):
        decide_visibility(np.zeros((1, 3)), np.zeros((1, 3)), [0.5, 0.5], 0.5)


@pytest.mark.parametrize(
    "main,thr,expected",
    [
        (np.zeros((0, 2)), 0.6, np.zeros((0, 2))),
        ([[0.9, 0.6, 0.1]], 0.6, [[2, 0, 0]]),
        ([[0.9, 0.6, 0.1]], [0.95, 0.5, 0.0], [[0, 2, 2]]),
    ],
)
def test_main_only_never_occluded(main, thr, expected) -> None:
    flags = decide_visibility_main_only(np.array(main), thr)
    np.testing.assert_array_equal(flags, np.array(expected).reshape(flags.shape))
    assert not (flags == 1).any()
