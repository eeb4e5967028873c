"""The review contract on the in-memory reference backend, and the review records themselves.

The Ground Truth and Label Studio backends run the same ``ReviewBackendContract`` in
``test_groundtruth.py`` and ``test_labelstudio.py``.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import pytest

from review_contract import ReviewBackendContract, expected, image_id, record
from service.keypoints import CABIN19_NAMES
from sync.review import (InMemoryReviewBackend, ReviewedKeypoint, ReviewedLabel, ReviewedPerson, ReviewItem,
                         differs)


class MemoryHarness:
    reviewer_id = "alice"
    tolerance = 0.02

    def __init__(self) -> None:
        self.backend = InMemoryReviewBackend()

    def item(self, n: int, rec: dict[str, Any]) -> ReviewItem:
        return ReviewItem(image_id(n), rec["width"], rec["height"], rec, rec["bundle_id"],
                          local_path=Path(f"/images/{n}.jpg"), score=0.4, reasons=("kpt_near_threshold",))

    def review(self, item: ReviewItem, heads: Sequence[Sequence[float]], persons: Sequence[ReviewedPerson]) -> None:
        self.backend.review(item.image_id, heads, persons, self.reviewer_id, at=time.time())  # type: ignore[arg-type]

    def accept(self, item: ReviewItem) -> None:
        heads, persons = expected(dict(item.record))
        self.review(item, heads, persons)


class TestInMemoryBackend(ReviewBackendContract):
    @pytest.fixture
    def harness(self) -> MemoryHarness:
        return MemoryHarness()


@pytest.mark.parametrize("kwargs, message", [
    ({"width": 0}, "positive size"),
    ({"image_uri": None, "local_path": None}, "image_uri or local_path"),
    ({"image_id": ""}, "non-empty id"),
])
def test_review_item_refuses_bad_values(kwargs: dict[str, Any], message: str) -> None:
    base: dict[str, Any] = {"image_id": "a" * 64, "width": 10, "height": 10, "record": {}, "bundle_id": "b",
                            "image_uri": "s3://bkt/a.jpg"}
    with pytest.raises(ValueError, match=message):
        ReviewItem(**{**base, **kwargs})


def test_reviewed_label_checks_and_round_trips_json() -> None:
    person = ReviewedPerson((1, 2, 30, 40), tuple(ReviewedKeypoint(5, 6, "visible") for _ in CABIN19_NAMES))
    label = ReviewedLabel("x", 64, 48, ((1, 2, 3, 4),), (person,), "memory", "job-1", 1.8e9, None, True)
    assert ReviewedLabel.from_json(label.to_json()) == label
    with pytest.raises(ValueError, match="expected 19 key points"):
        ReviewedLabel("x", 64, 48, (), (ReviewedPerson((1, 2, 3, 4), ()),), "memory", "j", 0.0)
    with pytest.raises(ValueError, match="x2 >= x1"):
        ReviewedPerson((5, 2, 3, 4), ())
    with pytest.raises(ValueError, match="visibility"):
        ReviewedKeypoint(1, 2, "hidden")
    with pytest.raises(ValueError, match="parts"):
        ReviewedLabel("x", 64, 48, (), (), "memory", "j", 0.0, parts=("faces",))


def test_differs_ignores_where_outside_points_lie() -> None:
    rec = record()
    heads, persons = expected(rec)
    assert not differs(heads, persons, rec)
    moved = [ReviewedPerson(persons[0].box, tuple(
        ReviewedKeypoint(k.x + 50, k.y, k.visibility) if k.visibility == "outside" else k for k in persons[0].keypoints))]
    assert not differs(heads, moved, rec)
    assert differs(heads, [], rec)
    assert differs([], persons, rec)
