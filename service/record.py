"""Annotation records: what the engine predicts for one image, in original-image pixels.

Coordinates are pixels of the original image after EXIF orientation; boxes are
``(x1, y1, x2, y2)``. Records are frozen and validated at construction.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .keypoints import OCCLUDED, OUTSIDE, VISIBILITY_FLAG, VISIBLE

VISIBILITIES = (VISIBLE, OCCLUDED, OUTSIDE)


def _check_box(box: tuple[float, float, float, float], what: str) -> None:
    if len(box) != 4 or not all(math.isfinite(v) for v in box):
        raise ValueError(f"{what}: expected 4 finite numbers (x1, y1, x2, y2), got {box!r}")
    if box[2] < box[0] or box[3] < box[1]:
        raise ValueError(f"{what}: expected x2 >= x1 and y2 >= y1, got {box!r}")


@dataclass(frozen=True)
class Keypoint:
    """One body point, in original-image pixels.

    ``x, y`` always hold the main model's location estimate, also for ``outside`` points, so
    that localisation (OKS) and visibility can be measured apart. An ``outside`` point claims
    no location: exports (COCO, YOLO, review tasks) write it as 0, 0 with flag 0.
    """

    x: float
    y: float
    main_conf: float
    visible_conf: float
    visibility: str

    def __post_init__(self) -> None:
        if self.visibility not in VISIBILITIES:
            raise ValueError(f"Keypoint.visibility: expected one of {VISIBILITIES}, got {self.visibility!r}")

    @property
    def flag(self) -> int:
        return VISIBILITY_FLAG[self.visibility]

    def to_json(self) -> dict[str, Any]:
        return {"x": round(self.x, 2), "y": round(self.y, 2), "main_conf": round(self.main_conf, 4),
                "visible_conf": round(self.visible_conf, 4), "visibility": self.visibility}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Keypoint":
        return cls(float(d["x"]), float(d["y"]), float(d["main_conf"]), float(d["visible_conf"]), str(d["visibility"]))


@dataclass(frozen=True)
class Head:
    box: tuple[float, float, float, float]
    conf: float

    def __post_init__(self) -> None:
        _check_box(self.box, "Head.box")

    def to_json(self) -> dict[str, Any]:
        return {"box": [round(v, 2) for v in self.box], "conf": round(self.conf, 4)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Head":
        return cls(tuple(float(v) for v in d["box"]), float(d["conf"]))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Person:
    box: tuple[float, float, float, float]
    conf: float
    keypoints: tuple[Keypoint, ...]
    # Confidence of the matched visible-only person (0 when none matched or no such model).
    visible_match_conf: float = 0.0

    def __post_init__(self) -> None:
        _check_box(self.box, "Person.box")

    def to_json(self) -> dict[str, Any]:
        return {"box": [round(v, 2) for v in self.box], "conf": round(self.conf, 4),
                "visible_match_conf": round(self.visible_match_conf, 4),
                "keypoints": [k.to_json() for k in self.keypoints]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Person":
        return cls(tuple(float(v) for v in d["box"]), float(d["conf"]),  # type: ignore[arg-type]
                   tuple(Keypoint.from_json(k) for k in d["keypoints"]),
                   float(d.get("visible_match_conf", 0.0)))


@dataclass(frozen=True)
class Prediction:
    """Everything the engine says about one image."""

    width: int
    height: int
    heads: tuple[Head, ...] = field(default_factory=tuple)
    persons: tuple[Person, ...] = field(default_factory=tuple)
    # How unlike the bundle's training images the image looks (``service.novelty``: about 1 or
    # less for familiar images); None when the bundle has no appearance profile.
    novelty: float | None = None

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"Prediction: image size must be positive, got {self.width}x{self.height}")

    def to_json(self) -> dict[str, Any]:
        return {"width": self.width, "height": self.height,
                "heads": [h.to_json() for h in self.heads],
                "persons": [p.to_json() for p in self.persons],
                **({"novelty": round(self.novelty, 4)} if self.novelty is not None else {})}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Prediction":
        return cls(int(d["width"]), int(d["height"]),
                   tuple(Head.from_json(h) for h in d.get("heads", [])),
                   tuple(Person.from_json(p) for p in d.get("persons", [])),
                   float(d["novelty"]) if d.get("novelty") is not None else None)
