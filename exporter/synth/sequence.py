"""Capture sequences: several frames of one scene, as a lab capture tool records them.

A capture tool writes video frames: the same cabin, camera and occupants, each frame with the
occupants moved a little, the light a little different and fresh sensor noise. The renderer
draws everything from one ``numpy`` generator, so a frame is rendered from a generator that
replays the scene's draws (``SequenceRng``): every discrete choice (camera, who sits where,
pose class, clothing colours) is the scene's; every continuous parameter (positions, angles,
sizes, light) is the scene's value moved by ``motion`` times its spread; large arrays (sensor
noise) are drawn fresh. Frame 0 is the scene itself (no motion).
"""
from __future__ import annotations

import bisect
import math
from typing import Any, Sequence

import numpy as np

# An array draw with more elements than this is noise (drawn fresh per frame); smaller ones are
# parameters (a point's jitter, the white balance) and move with the frame.
NOISE_SIZE = 16


def _size(size: Any) -> int:
    return 1 if size is None else int(np.prod(size))


class SequenceRng:
    """A ``numpy.random.Generator`` look-alike for frame ``k`` of a scene.

    ``base`` is the scene's generator (the same seed for every frame, so each frame makes the
    same calls in the same order and reads the same stream); ``frame`` draws the motion and the
    fresh noise. ``motion`` is the standard deviation of a parameter's change, as a share of its
    spread (the range of a uniform draw, the scale of a normal one).
    """

    def __init__(self, base: np.random.Generator, frame: np.random.Generator, motion: float) -> None:
        self.base, self.frame, self.motion = base, frame, float(motion)

    def uniform(self, low: Any = 0.0, high: Any = 1.0, size: Any = None) -> Any:
        value = self.base.uniform(low, high, size)
        if _size(size) > NOISE_SIZE:
            return self.frame.uniform(low, high, size)
        spread = np.abs(np.asarray(high, float) - np.asarray(low, float))
        moved = np.clip(value + self.frame.normal(0.0, 1.0, np.shape(value)) * self.motion * spread,
                        np.minimum(low, high), np.maximum(low, high))
        return float(moved) if np.ndim(value) == 0 else moved

    def normal(self, loc: Any = 0.0, scale: Any = 1.0, size: Any = None) -> Any:
        value = self.base.normal(loc, scale, size)
        if _size(size) > NOISE_SIZE:
            return self.frame.normal(loc, scale, size)
        moved = value + self.frame.normal(0.0, 1.0, np.shape(value)) * self.motion * np.asarray(scale, float)
        return float(moved) if np.ndim(value) == 0 else moved

    # Discrete draws and anything else: the scene's.
    def __getattr__(self, name: str) -> Any:
        return getattr(self.base, name)


def frame_rng(seed: int, scene: int, frame: int, motion: float) -> np.random.Generator | SequenceRng:
    """The generator for ``frame`` of ``scene``: the scene's own for frame 0, else a moved replay."""
    base = np.random.default_rng([seed, scene])
    if frame == 0:
        return base
    return SequenceRng(base, np.random.default_rng([seed, scene, frame]), motion)


def varied_lengths(count: int, mean: int, seed: int) -> list[int]:
    """Capture sequences of uneven length, as a lab's recordings come: ``count`` frames cut into
    scenes whose lengths are drawn log-uniformly from 1 to ``4 * mean`` (a mean close to
    ``mean``: about 10.3 for 10), so most frames belong to a few long recordings and most scenes are
    short ones. Seeded by ``seed`` alone; the last scene is cut to make ``count``."""
    if count < 1 or mean < 1:
        raise ValueError(f"count and mean must be >= 1, got {count}, {mean}")
    rng = np.random.default_rng([seed, 0x5E9])
    top = math.log(4 * mean + 1)
    lengths: list[int] = []
    while sum(lengths) < count:
        lengths.append(max(1, int(math.exp(rng.uniform(0.0, top)))))
    lengths[-1] -= sum(lengths) - count
    return lengths


def scene_frame(index: int, lengths: Sequence[int]) -> tuple[int, int]:
    """(scene, frame) of image ``index`` when the scenes have these ``lengths`` in order."""
    ends = np.cumsum(lengths).tolist()
    if not 0 <= index < ends[-1]:
        raise ValueError(f"image {index} is past the {ends[-1]} frames of these sequences")
    scene = bisect.bisect_right(ends, index)
    return scene, index - (ends[scene - 1] if scene else 0)
