"""Review backends: where doubtful images go to be checked by a person, and what comes back.

A :class:`ReviewBackend` takes batches of :class:`ReviewItem` (an image chosen by the judge,
with the engine's pre-annotation and its provenance) and later yields :class:`ReviewedLabel`
objects: the labels a reviewer submitted, in pixels of the original image. Two backends
implement it: Ground Truth over S3 (``sync.groundtruth``) and a self-hosted Label Studio
server (``sync.labelstudio``); ``InMemoryReviewBackend`` is the reference used in tests.

Contract shared by every backend (``tests/sync/test_review_backends.py`` checks it):

- ``submit`` is idempotent per image: submitting the same batch (or an image already sent)
  again creates no second task or manifest line.
- ``collect`` yields each finished review the backend holds. It may yield a review again
  after a restart, so consumers merge by image id and ignore repeats. Reviews that fail our
  validation are logged, kept in ``rejected`` and not yielded.
- Key points come back in schema order, one per name; a point the reviewer did not place, or
  marked ``outside``, is ``outside`` (with 0, 0 when no location was given).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol, Sequence, runtime_checkable

from service.keypoints import CABIN19_NAMES, OUTSIDE
from service.record import VISIBILITIES

log = logging.getLogger(__name__)

Box = tuple[float, float, float, float]
HEADS, PERSONS = "heads", "persons"


def _box(value: Sequence[float], what: str) -> Box:
    box = tuple(float(v) for v in value)
    if len(box) != 4 or not all(math.isfinite(v) for v in box):
        raise ValueError(f"{what}: expected 4 finite numbers (x1, y1, x2, y2), got {value!r}")
    if box[2] < box[0] or box[3] < box[1]:
        raise ValueError(f"{what}: expected x2 >= x1 and y2 >= y1, got {value!r}")
    return box  # type: ignore[return-value]


@dataclass(frozen=True)
class ReviewItem:
    """One image sent for review.

    ``image_uri`` is where a remote reviewer reads it (``s3://...``); ``local_path`` is the file
    on this machine (Label Studio serves it from its document root). At least one is set.
    ``record`` is the pre-annotation, ``service.record.Prediction.to_json()`` (pixels).
    """

    image_id: str
    width: int
    height: int
    record: Mapping[str, Any]
    bundle_id: str
    image_uri: str | None = None
    local_path: Path | None = None
    score: float | None = None
    reasons: tuple[str, ...] = ()
    audit: bool = False

    def __post_init__(self) -> None:
        if not self.image_id:
            raise ValueError("ReviewItem.image_id: expected a non-empty id, got ''")
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"ReviewItem {self.image_id}: expected a positive size, got {self.width}x{self.height}")
        if self.image_uri is None and self.local_path is None:
            raise ValueError(f"ReviewItem {self.image_id}: expected image_uri or local_path, got neither")
        object.__setattr__(self, "reasons", tuple(self.reasons))


@dataclass(frozen=True)
class ReviewedKeypoint:
    """A reviewed point in original-image pixels; ``visibility`` is visible/occluded/outside."""

    x: float
    y: float
    visibility: str

    def __post_init__(self) -> None:
        if self.visibility not in VISIBILITIES:
            raise ValueError(f"ReviewedKeypoint.visibility: expected one of {VISIBILITIES}, got {self.visibility!r}")
        if not (math.isfinite(self.x) and math.isfinite(self.y)):
            raise ValueError(f"ReviewedKeypoint: expected finite x, y, got {self.x!r}, {self.y!r}")


MISSING_POINT = ReviewedKeypoint(0.0, 0.0, OUTSIDE)


@dataclass(frozen=True)
class ReviewedPerson:
    """A person's box (x1, y1, x2, y2 pixels) and one key point per schema name, in order."""

    box: Box
    keypoints: tuple[ReviewedKeypoint, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "box", _box(self.box, "ReviewedPerson.box"))
        object.__setattr__(self, "keypoints", tuple(self.keypoints))


@dataclass(frozen=True)
class ReviewedLabel:
    """What a reviewer submitted for one image, with where and when it was reviewed.

    ``reviewed_at`` is seconds since the epoch (UTC). ``adjusted`` says whether the reviewer
    changed the pre-annotation (None when the backend cannot tell). ``parts`` names what was
    reviewed: a built-in Ground Truth bounding-box job reviews ``heads`` only, and the
    persons of such a label must not replace the automatic ones.
    """

    image_id: str
    width: int
    height: int
    heads: tuple[Box, ...]
    persons: tuple[ReviewedPerson, ...]
    backend: str
    job: str
    reviewed_at: float
    reviewer: str | None = None
    adjusted: bool | None = None
    keypoint_names: tuple[str, ...] = CABIN19_NAMES
    parts: tuple[str, ...] = (HEADS, PERSONS)

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", tuple(_box(h, f"ReviewedLabel {self.image_id} head") for h in self.heads))
        object.__setattr__(self, "persons", tuple(self.persons))
        for p in self.persons:
            if len(p.keypoints) != len(self.keypoint_names):
                raise ValueError(f"ReviewedLabel {self.image_id}: expected {len(self.keypoint_names)} key points "
                                 f"per person, got {len(p.keypoints)}")
        if not set(self.parts) <= {HEADS, PERSONS}:
            raise ValueError(f"ReviewedLabel.parts: expected a subset of ('heads', 'persons'), got {self.parts!r}")

    def to_json(self) -> dict[str, Any]:
        """Plain JSON: boxes as lists, points as ``[x, y, visibility]``."""
        return {
            "image_id": self.image_id, "width": self.width, "height": self.height,
            "heads": [list(h) for h in self.heads],
            "persons": [{"box": list(p.box), "keypoints": [[k.x, k.y, k.visibility] for k in p.keypoints]}
                        for p in self.persons],
            "backend": self.backend, "job": self.job, "reviewed_at": self.reviewed_at,
            "reviewer": self.reviewer, "adjusted": self.adjusted,
            "keypoint_names": list(self.keypoint_names), "parts": list(self.parts),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "ReviewedLabel":
        return cls(
            image_id=str(d["image_id"]), width=int(d["width"]), height=int(d["height"]),
            heads=tuple(tuple(h) for h in d["heads"]),  # type: ignore[misc]
            persons=tuple(ReviewedPerson(tuple(p["box"]),  # type: ignore[arg-type]
                                         tuple(ReviewedKeypoint(float(k[0]), float(k[1]), str(k[2]))
                                               for k in p["keypoints"])) for p in d["persons"]),
            backend=str(d["backend"]), job=str(d["job"]), reviewed_at=float(d["reviewed_at"]),
            reviewer=d.get("reviewer"), adjusted=d.get("adjusted"),
            keypoint_names=tuple(d.get("keypoint_names", CABIN19_NAMES)),
            parts=tuple(d.get("parts", (HEADS, PERSONS))),
        )


@runtime_checkable
class ReviewBackend(Protocol):
    """A place where people review images; see the module docstring for the contract."""

    name: str

    def submit(self, batch_id: str, items: Sequence[ReviewItem]) -> None:
        """Send these images with their pre-annotations; idempotent per image."""
        ...

    def collect(self) -> Iterator[ReviewedLabel]:
        """Yield the finished reviews the backend holds (in pixels); may repeat after restarts."""
        ...


def persons_from_record(record: Mapping[str, Any], names: Sequence[str] | None = None
                        ) -> tuple[tuple[Box, ...], tuple[ReviewedPerson, ...]]:
    """Heads and persons of a pre-annotation record (``Prediction.to_json()``), as review types.

    With ``names``, each person must carry exactly one point per name (ValueError otherwise).
    """
    heads = tuple(_box(h["box"], "record head") for h in record.get("heads", []))
    persons = []
    for p in record.get("persons", []):
        kps = tuple(ReviewedKeypoint(float(k["x"]), float(k["y"]), str(k["visibility"])) for k in p["keypoints"])
        if names is not None and len(kps) != len(names):
            raise ValueError(f"record person: expected {len(names)} key points, got {len(kps)}")
        persons.append(ReviewedPerson(_box(p["box"], "record person"), kps))
    return heads, tuple(persons)


def labels_differ(heads: Sequence[Box], persons: Sequence[ReviewedPerson], ref_heads: Sequence[Box],
                  ref_persons: Sequence[ReviewedPerson], tolerance_px: float = 1.0) -> bool:
    """Whether two labels differ (order-sensitive, coordinates within ``tolerance_px``).

    A point ``outside`` on both sides counts as equal wherever its location lies.
    """
    if len(heads) != len(ref_heads) or len(persons) != len(ref_persons):
        return True

    def close(a: Sequence[float], b: Sequence[float]) -> bool:
        return all(abs(x - y) <= tolerance_px for x, y in zip(a, b))

    if not all(close(a, b) for a, b in zip(heads, ref_heads)):
        return True
    for mine, ref in zip(persons, ref_persons):
        if not close(mine.box, ref.box) or len(mine.keypoints) != len(ref.keypoints):
            return True
        for k, r in zip(mine.keypoints, ref.keypoints):
            if k.visibility != r.visibility:
                return True
            if k.visibility != OUTSIDE and not close((k.x, k.y), (r.x, r.y)):
                return True
    return False


def differs(heads: Sequence[Box], persons: Sequence[ReviewedPerson], record: Mapping[str, Any],
            tolerance_px: float = 1.0) -> bool:
    """Whether reviewed heads/persons differ from a pre-annotation record's (see ``labels_differ``)."""
    ref_heads, ref_persons = persons_from_record(record)
    return labels_differ(heads, persons, ref_heads, ref_persons, tolerance_px)


@dataclass
class InMemoryReviewBackend:
    """Reference backend kept in memory: ``review()`` plays the reviewer. For tests and dry runs."""

    name: str = "memory"
    items: dict[str, ReviewItem] = field(default_factory=dict)
    batches: dict[str, str] = field(default_factory=dict)
    answers: dict[str, ReviewedLabel] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)

    def submit(self, batch_id: str, items: Sequence[ReviewItem]) -> None:
        for item in items:
            if item.image_id not in self.items:
                self.items[item.image_id] = item
                self.batches[item.image_id] = batch_id

    def review(self, image_id: str, heads: Sequence[Box], persons: Sequence[ReviewedPerson],
               reviewer: str | None = None, at: float = 0.0) -> None:
        """Record a reviewer's answer for a submitted image (KeyError when it was never sent)."""
        item = self.items[image_id]
        self.answers[image_id] = ReviewedLabel(
            image_id, item.width, item.height, tuple(heads), tuple(persons), self.name,
            self.batches[image_id], at, reviewer, differs(heads, persons, item.record))

    def collect(self) -> Iterator[ReviewedLabel]:
        yield from list(self.answers.values())
