"""The one test suite every ReviewBackend passes (huey's StorageTests pattern).

A test module subclasses ``ReviewBackendContract`` and provides a ``harness`` fixture: an
object with ``backend``, ``item(n, record)`` (a ReviewItem the backend can take) and
``review(item, heads, persons, reviewer)`` / ``accept(item, reviewer)``, a simulated
reviewer that answers through the backend's real channel.
"""
from __future__ import annotations

import hashlib
from typing import Any, Protocol, Sequence

import pytest

from service.keypoints import CABIN19_NAMES, OUTSIDE
from service.record import Head, Keypoint, Person, Prediction
from sync.review import ReviewBackend, ReviewedKeypoint, ReviewedLabel, ReviewedPerson, ReviewItem

WIDTH, HEIGHT = 320, 240
VIS = ("visible", "occluded", "outside")


def image_id(n: int) -> str:
    return hashlib.sha256(f"image-{n}".encode()).hexdigest()


def record(persons: int = 1, heads: int = 1, names: Sequence[str] = CABIN19_NAMES) -> dict[str, Any]:
    """A pre-annotation record (pixels) with every visibility state; outside points keep a location."""
    people = tuple(Person((20.0 + 150 * p, 10.0, 150.0 + 150 * p, 230.0), 0.9, tuple(
        Keypoint(30.0 + 150 * p + 5 * k, 20.0 + 10 * k + 0.25, 0.8, 0.5, VIS[k % 3]) for k in range(len(names))))
        for p in range(persons))
    hs = tuple(Head((40.0 + 150 * h, 12.5, 90.0 + 150 * h, 60.0), 0.8) for h in range(heads))
    return {**Prediction(WIDTH, HEIGHT, hs, people).to_json(), "keypoint_names": list(names),
            "bundle_id": "bundle-7", "annotated_at": 1_800_000_000.0}


def expected(rec: dict[str, Any], names: Sequence[str] = CABIN19_NAMES
             ) -> tuple[list[tuple[float, ...]], list[ReviewedPerson]]:
    """The label an unchanged review gives back: heads, persons in ``names`` order."""
    persons = []
    for p in rec["persons"]:
        by_name = dict(zip(rec["keypoint_names"], p["keypoints"]))
        persons.append(ReviewedPerson(tuple(p["box"]), tuple(  # type: ignore[arg-type]
            ReviewedKeypoint(by_name[n]["x"], by_name[n]["y"], by_name[n]["visibility"]) if n in by_name
            else ReviewedKeypoint(0.0, 0.0, OUTSIDE) for n in names)))
    return [tuple(h["box"]) for h in rec["heads"]], persons


def assert_label(got: ReviewedLabel, heads: Sequence[Sequence[float]], persons: Sequence[ReviewedPerson],
                 tol: float = 0.02) -> None:
    """Same heads and persons (pixels within ``tol``); outside points are compared by state only."""
    assert (got.width, got.height) == (WIDTH, HEIGHT)
    assert len(got.heads) == len(heads), (got.heads, heads)
    for a, b in zip(got.heads, heads):
        assert a == pytest.approx(tuple(b), abs=tol)
    assert len(got.persons) == len(persons)
    for gp, ep in zip(got.persons, persons):
        assert gp.box == pytest.approx(ep.box, abs=tol)
        assert [k.visibility for k in gp.keypoints] == [k.visibility for k in ep.keypoints]
        for gk, ek in zip(gp.keypoints, ep.keypoints):
            if ek.visibility != OUTSIDE:
                assert (gk.x, gk.y) == pytest.approx((ek.x, ek.y), abs=tol)


class Harness(Protocol):
    backend: ReviewBackend
    reviewer_id: str | None
    tolerance: float  # pixels; a backend whose UI works in whole pixels needs more than 0.02

    def item(self, n: int, rec: dict[str, Any]) -> ReviewItem: ...

    def review(self, item: ReviewItem, heads: Sequence[Sequence[float]], persons: Sequence[ReviewedPerson]) -> None: ...

    def accept(self, item: ReviewItem) -> None: ...


def collect(backend: ReviewBackend) -> dict[str, ReviewedLabel]:
    out: dict[str, ReviewedLabel] = {}
    for label in backend.collect():
        assert label.image_id not in out, f"{label.image_id} yielded twice in one collect()"
        out[label.image_id] = label
    return out


class ReviewBackendContract:
    """Subclass as ``TestXxx`` and provide the ``harness`` fixture."""

    def test_is_a_review_backend(self, harness: Harness) -> None:
        assert isinstance(harness.backend, ReviewBackend)
        assert harness.backend.name

    def test_empty_batch_and_nothing_reviewed(self, harness: Harness) -> None:
        harness.backend.submit("b0", [])
        harness.backend.submit("b1", [harness.item(1, record()), harness.item(2, record(persons=2))])
        assert collect(harness.backend) == {}

    def test_unchanged_review_round_trips(self, harness: Harness) -> None:
        rec = record(persons=2, heads=2)
        item = harness.item(3, rec)
        harness.backend.submit("b1", [item])
        harness.accept(item)
        got = collect(harness.backend)
        assert list(got) == [item.image_id]
        label = got[item.image_id]
        heads, persons = expected(rec)
        assert_label(label, heads, persons, harness.tolerance)
        assert label.adjusted is False
        assert label.keypoint_names == CABIN19_NAMES

    def test_corrections_come_back_in_pixels(self, harness: Harness) -> None:
        rec = record()
        item = harness.item(4, rec)
        harness.backend.submit("b2", [item])
        heads, (person,) = expected(rec)
        kps = list(person.keypoints)
        kps[0] = ReviewedKeypoint(101.5, 77.25, "occluded")   # moved, visible -> occluded
        kps[1] = ReviewedKeypoint(kps[1].x, kps[1].y, "visible")  # occluded -> visible
        kps[3] = ReviewedKeypoint(kps[3].x, kps[3].y, OUTSIDE)  # visible -> outside
        kps[2] = ReviewedKeypoint(55.0, 66.0, "visible")       # was outside: now placed
        new_person = ReviewedPerson((21.0, 11.0, 160.0, 229.0), tuple(kps))
        new_heads = [heads[0], (200.0, 20.0, 250.0, 80.0)]
        harness.review(item, new_heads, [new_person])
        label = collect(harness.backend)[item.image_id]
        assert_label(label, new_heads, [new_person], harness.tolerance)
        assert label.adjusted is True
        assert label.reviewer == harness.reviewer_id

    def test_empty_image_gets_a_head(self, harness: Harness) -> None:
        item = harness.item(5, record(persons=0, heads=0))
        harness.backend.submit("b3", [item])
        harness.review(item, [(10.0, 20.0, 50.0, 70.0)], [])
        label = collect(harness.backend)[item.image_id]
        assert_label(label, [(10.0, 20.0, 50.0, 70.0)], [], harness.tolerance)
        assert label.adjusted is True

    def test_resubmission_is_idempotent_and_provenance_is_kept(self, harness: Harness) -> None:
        items = [harness.item(6, record()), harness.item(7, record(persons=0))]
        harness.backend.submit("b4", items)
        harness.backend.submit("b4", items)
        for item in items:
            harness.accept(item)
        got = collect(harness.backend)
        assert sorted(got) == sorted(i.image_id for i in items)
        for label in got.values():
            assert label.backend == harness.backend.name
            assert label.job
            assert label.reviewed_at > 1_600_000_000
            assert label.reviewer == harness.reviewer_id
        assert collect(harness.backend).keys() == got.keys()  # polling again: the same, once each
