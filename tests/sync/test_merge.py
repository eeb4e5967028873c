"""Merge of reviewed labels into the dataset: provenance, store state, versions, mistakenness, export."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.keypoints import CABIN19, COCO17, COCO17_NAMES
from service.store import REVIEWED, REVIEW_PENDING, UPLOADED, Store
from sync.coco_export import export_dataset
from sync.dataset import Dataset
from sync.merge import Merger, auto_label
from sync.mistakenness import mistakenness
from sync.review import ReviewedKeypoint, ReviewedLabel, ReviewedPerson

BOX = [100.0, 50.0, 300.0, 450.0]


def _points(n: int = 17) -> list[dict]:
    return [{"x": 110.0 + 10 * i, "y": 60.0 + 20 * i, "main_conf": 0.9, "visible_conf": 0.8,
             "visibility": "visible" if i % 3 else "occluded"} for i in range(n)]


def _record(image_id: str) -> dict:
    return {"image_id": image_id, "width": 640, "height": 480, "keypoint_names": list(COCO17_NAMES),
            "heads": [{"box": [150.0, 50.0, 220.0, 120.0], "conf": 0.8}],
            "persons": [{"box": BOX, "conf": 0.9, "keypoints": _points()}], "bundle_id": "b-1"}


def _annotated(store: Store, data: bytes, decision: str, audit: bool = False) -> str:
    image_id, _ = store.ingest(data, "test")
    store.claim("w")
    store.complete(image_id, "w", _record(image_id), "b-1", decision, 0.3, ["low_conf"], audit)
    return image_id


def _reviewed(image_id: str, move: float = 0.0, flip: int = 0, reviewer: str | None = "ann") -> ReviewedLabel:
    pts = []
    for i, k in enumerate(_points()):
        vis = k["visibility"]
        if i < flip:
            vis = "occluded" if vis == "visible" else "visible"
        pts.append(ReviewedKeypoint(k["x"] + move, k["y"], vis))
    return ReviewedLabel(image_id, 640, 480, ((150.0, 50.0, 220.0, 120.0),), (ReviewedPerson(tuple(BOX), tuple(pts)),),
                         "labelstudio", "project-7", 1_790_000_000.0, reviewer, None, tuple(COCO17_NAMES))


@pytest.fixture
def world(tmp_path: Path):
    store = Store(tmp_path / "store")
    dataset = Dataset(tmp_path / "dataset")
    yield store, dataset, Merger(store, dataset)
    dataset.close()
    store.close()


def test_merge_keeps_provenance_marks_reviewed_and_bumps_version(world) -> None:
    store, dataset, merger = world
    auto_id = _annotated(store, b"auto image", "auto_accepted")
    rid = _annotated(store, b"review image", "review", audit=True)
    pending = _annotated(store, b"still pending", "review")
    assert store.set_state(rid, (REVIEW_PENDING,), UPLOADED)

    report = merger.merge([_reviewed(rid, move=5.0), _reviewed(pending)])
    assert report.merged == [rid] and pending in report.skipped and report.auto_added == 1
    assert store.get(rid).state == REVIEWED and store.get(pending).state == REVIEW_PENDING
    entry = dataset.get(rid)
    assert entry.origin == "reviewed" and entry.audit
    assert {k: entry.provenance[k] for k in ("origin", "backend", "job", "reviewer", "bundle_id", "adjusted")} == {
        "origin": "human", "backend": "labelstudio", "job": "project-7", "reviewer": "ann",
        "bundle_id": "b-1", "adjusted": True}
    assert entry.provenance["reviewed_at"].startswith("2026-")
    assert len(entry.label["persons"][0]["keypoints"]) == CABIN19.count  # mapped by name to 19 points
    assert entry.label["persons"][0]["keypoints"][17] == [0.0, 0.0, 0]  # mouth: not in the COCO-17 review
    assert entry.label["persons"][0]["keypoints"][0][0] == pytest.approx(115.0)
    assert dataset.get(auto_id).origin == "auto" and dataset.get(auto_id).provenance["bundle_id"] == "b-1"
    v1 = dataset.versions()
    assert len(v1) == 1 and v1[0].reviewed == 1 and v1[0].auto == 1 and v1[0].version == dataset.version()

    # The same review again changes nothing: no new version.
    again = merger.merge([_reviewed(rid, move=5.0)])
    assert again.unchanged == [rid] and again.version is None and len(dataset.versions()) == 1
    # A newer review replaces it and records a new version.
    newer = ReviewedLabel(**{**_reviewed(rid, move=9.0).__dict__, "reviewed_at": 1_790_000_100.0})
    assert merger.merge([newer]).merged == [rid]
    assert len(dataset.versions()) == 2 and dataset.versions()[1].version != v1[0].version


def test_crash_between_dataset_and_store_is_healed_by_the_next_merge(world) -> None:
    store, dataset, merger = world
    rid = _annotated(store, b"crash", "review")
    store.set_state(rid, (REVIEW_PENDING,), UPLOADED)
    merger.merge([_reviewed(rid, move=3.0)])
    assert store.set_state(rid, (REVIEWED,), UPLOADED)  # as if the store's commit had been lost
    report = merger.merge([_reviewed(rid, move=3.0)])
    assert report.unchanged == [rid] and report.version is None
    assert store.get(rid).state == REVIEWED and len(dataset.versions()) == 1


def test_an_image_accepted_after_a_later_arrival_still_joins_the_dataset(world) -> None:
    """Two workers: A arrives first but its worker is slow (or its lease expires), B arrives
    second and is accepted first. Paging by arrival moved its cursor past A for good."""
    store, dataset, merger = world
    a, _ = store.ingest(b"arrived first, accepted last", "test")
    b, _ = store.ingest(b"arrived second, accepted first", "test")
    assert [r.image_id for r in store.claim("slow", limit=1)] == [a]
    assert [r.image_id for r in store.claim("fast", limit=1)] == [b]
    store.complete(b, "fast", _record(b), "b-1", "auto_accepted", 0.9, [], False)
    assert merger.add_auto_accepted() == 1
    store.complete(a, "slow", _record(a), "b-1", "auto_accepted", 0.9, [], False)
    assert merger.add_auto_accepted() == 1 and dataset.get(a) is not None
    assert merger.add_auto_accepted() == 0  # nothing twice


def test_a_dataset_from_before_the_transition_cursor_is_swept_once(world) -> None:
    """A dataset written by the arrival-paging code (no ``auto_seq``) may lack images that code
    skipped: the first call sweeps every auto-accepted image, later calls read only new ones."""
    store, dataset, merger = world
    early = _annotated(store, b"skipped by the old cursor", "auto_accepted")
    dataset.meta("auto_cursor", "9e99|f")  # the old cursor, past every image
    assert merger.add_auto_accepted() == 1 and dataset.get(early) is not None
    late = _annotated(store, b"after the sweep", "auto_accepted")
    assert merger.add_auto_accepted() == 1 and dataset.get(late) is not None
    assert int(dataset.meta("auto_seq")) == store.last_transition()


def test_reviewed_label_replaces_auto_and_auto_never_replaces_reviewed(world) -> None:
    store, dataset, merger = world
    rid = _annotated(store, b"img", "review")
    store.set_state(rid, (REVIEW_PENDING,), UPLOADED)
    label = auto_label(_record(rid), dataset.schema.names)
    assert dataset.put_auto(rid, label, {"origin": "auto"})
    merger.merge([_reviewed(rid, flip=2)])
    assert dataset.get(rid).origin == "reviewed"
    assert not dataset.put_auto(rid, label, {"origin": "auto"})
    assert dataset.get(rid).origin == "reviewed"


def test_heads_only_review_keeps_auto_persons(world) -> None:
    store, dataset, merger = world
    rid = _annotated(store, b"heads only", "review")
    store.set_state(rid, (REVIEW_PENDING,), UPLOADED)
    lab = ReviewedLabel(rid, 640, 480, ((10.0, 10.0, 60.0, 60.0),), (), "groundtruth", "job-1", 1.0,
                        parts=("heads",))
    merger.merge([lab])
    entry = dataset.get(rid)
    assert entry.label["heads"] == [[10.0, 10.0, 60.0, 60.0]]
    assert len(entry.label["persons"]) == 1 and entry.provenance["parts"] == ["heads"]


SIG = COCO17.sigmas


def _canon(move: float = 0.0, flip: int = 0, box_shift: float = 0.0, persons: int = 1) -> dict:
    rid = "0" * 64
    label = _reviewed(rid, move, flip)
    rec = {"width": 640, "height": 480, "keypoint_names": list(COCO17_NAMES),
           "heads": [{"box": [150.0 + box_shift, 50.0, 220.0 + box_shift, 120.0]}],
           "persons": [{"box": BOX, "keypoints": [{"x": k.x, "y": k.y, "visibility": k.visibility}
                                                   for k in label.persons[0].keypoints]}] * persons}
    return auto_label(rec, COCO17_NAMES)


@pytest.mark.parametrize("changes, expect", [
    ({}, {"score": 0.0, "boxes": 0.0, "points": 0.0, "visibility": 0.0}),
    ({"flip": 17}, {"visibility": 1.0, "points": 0.0}),
    ({"flip": 4}, {"visibility": 4 / 17}),
    ({"box_shift": 35.0}, {"boxes": 1 / 3, "points": 0.0}),  # head IoU 1/3; the person box is unchanged
    ({"box_shift": 70.0}, {"boxes": 2 / 3}),  # heads no longer overlap: two unmatched slots of three
    ({"persons": 0}, {"visibility": 1.0, "points": 1.0}),
])
def test_mistakenness_table(changes: dict, expect: dict) -> None:
    auto = _canon()
    reviewed = _canon(**changes)
    m = mistakenness(auto, reviewed, SIG)
    for key, value in expect.items():
        assert getattr(m, key) == pytest.approx(value), (key, m)


def test_mistakenness_grows_with_moved_points_and_empty_labels() -> None:
    auto = _canon()
    scores = [mistakenness(auto, _canon(move=d), SIG).points for d in (0.0, 2.0, 8.0, 32.0, 128.0)]
    assert scores[0] == 0.0 and all(a < b for a, b in zip(scores, scores[1:])) and scores[-1] <= 1.0
    empty = {"width": 1, "height": 1, "heads": [], "persons": []}
    assert mistakenness(empty, empty, SIG).score == 0.0
    assert mistakenness(empty, auto, SIG).score == pytest.approx(1.0)


def test_summary_separates_audit_and_judge_picks(world) -> None:
    store, dataset, merger = world
    labels = []
    for n, (audit, move) in enumerate([(True, 0.0), (True, 0.0), (False, 20.0), (False, 40.0)]):
        rid = _annotated(store, f"pick {n}".encode(), "review", audit=audit)
        store.set_state(rid, (REVIEW_PENDING,), UPLOADED)
        labels.append(_reviewed(rid, move=move, flip=2 if not audit else 0))
    merger.merge(labels)
    s = dataset.mistakenness_summary()
    assert s["all"]["count"] == 4 and s["audit_picks"]["mean"] == 0.0 and s["audit_picks"]["adjusted"] == 0
    assert s["judge_picks"]["mean"] > 0.1 and s["judge_picks"]["adjusted"] == 2
    assert s["judge_picks"]["median"] == pytest.approx(sorted(
        e.mistakes["score"] for e in dataset.entries() if not e.audit)[0] / 2
        + sorted(e.mistakes["score"] for e in dataset.entries() if not e.audit)[1] / 2)


def test_export_writes_coco_with_provenance_and_leaves_out_holdout(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    dataset = Dataset(tmp_path / "dataset", holdout_fraction=0.5)
    merger = Merger(store, dataset)
    ids = []
    for n in range(8):
        rid = _annotated(store, b"\xff\xd8" + f"jpeg {n}".encode(), "review")
        store.set_state(rid, (REVIEW_PENDING,), UPLOADED)
        ids.append(rid)
    auto_id = _annotated(store, b"\x89PNG auto", "auto_accepted")
    merger.merge([_reviewed(i) for i in ids])
    held = {e.image_id for e in dataset.holdout()}
    assert 0 < len(held) < 8 and held == {i for i in ids if dataset.is_holdout(i)}

    res = export_dataset(dataset, store.image_path, tmp_path / "out")
    coco = json.loads(res.annotations.read_text())
    names = {im["sha256"]: im["file_name"] for im in coco["images"]}
    assert set(names) == (set(ids) - held) | {auto_id} and names[auto_id].endswith(".png")
    assert all((tmp_path / "out" / "images" / f).is_file() for f in names.values())
    person, head = coco["categories"]
    assert person["keypoints"] == list(CABIN19.names) and head["name"] == "head"
    anns = [a for a in coco["annotations"] if a["category_id"] == 1]
    assert {a["provenance"]["origin"] for a in anns} == {"human", "auto"}
    assert all(len(a["keypoints"]) == 19 * 3 and set(a["keypoints"][2::3]) <= {0, 1, 2} for a in anns)
    assert coco["info"]["dataset_version"] == dataset.version() and res.holdout_left_out == len(held)
    full = export_dataset(dataset, store.image_path, tmp_path / "all", include_holdout=True)
    assert full.images == 9
    store.close()
    dataset.close()


def test_dataset_cli_status_and_export(world, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from sync.dataset_cli import register

    store, dataset, merger = world
    rid = _annotated(store, b"cli review", "review", audit=True)
    store.set_state(rid, (REVIEW_PENDING,), UPLOADED)
    merger.merge([_reviewed(rid, flip=3)])
    _annotated(store, b"cli auto", "auto_accepted")  # added by the CLI's refresh
    parser = argparse.ArgumentParser(prog="annotator")
    register(parser.add_subparsers(dest="command", required=True))
    common = ["--store-root", str(tmp_path / "store"), "--dataset-root", str(tmp_path / "dataset")]

    args = parser.parse_args(["dataset", "status", "--json", *common])
    assert args.func(args) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["reviewed"] == 1 and status["auto"] == 1 and status["recorded_versions"] == 2
    assert status["mistakenness"]["audit_picks"]["count"] == 1
    args = parser.parse_args(["dataset", "export", str(tmp_path / "out"), "--include-holdout", *common])
    assert args.func(args) == 0
    assert "2 images (1 reviewed, 1 auto)" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "out" / "annotations.json").read_text())["images"]) == 2


def test_merge_task_with_the_in_memory_review_backend(world) -> None:
    from sync.merge import MergeTask
    from sync.review import InMemoryReviewBackend, ReviewItem, persons_from_record

    store, dataset, merger = world
    rid, _ = store.ingest(b"task image", "test")
    store.claim("w")
    record = {**_record(rid), "keypoint_names": list(CABIN19.names)}
    record["persons"] = [{**record["persons"][0], "keypoints": _points(19)}]
    store.complete(rid, "w", record, "b-1", "review", 0.3, [], False)
    store.set_state(rid, (REVIEW_PENDING,), UPLOADED)
    backend = InMemoryReviewBackend()
    backend.submit("batch-1", [ReviewItem(rid, 640, 480, record, "b-1", image_uri="file:///x")])
    task = MergeTask(merger, backend.collect)
    assert task.name == "merge" and task.run_once() is False  # nothing reviewed yet
    heads, persons = persons_from_record(record)
    backend.review(rid, heads, persons, reviewer="r-9", at=1_790_000_000.0)
    assert task.run_once() is True and task.run_once() is False
    entry = dataset.get(rid)
    assert entry.provenance["job"] == "batch-1" and entry.provenance["reviewer"] == "r-9"
    assert entry.provenance["adjusted"] is False and entry.mistakes["score"] == 0.0


def test_a_later_heads_only_review_keeps_the_reviewed_key_points(world) -> None:
    """A head-box adjustment job chained on a key-point job: its heads replace the reviewed
    heads, and the reviewed key points stay (they went back to the bundle's before)."""
    store, dataset, merger = world
    rid = _annotated(store, b"keypoints then heads", "review")
    store.set_state(rid, (REVIEW_PENDING,), UPLOADED)
    full = _reviewed(rid, move=25.0)
    merger.merge([full])
    assert dataset.get(rid).label["persons"][0]["keypoints"][0][0] == pytest.approx(135.0)
    heads = ReviewedLabel(rid, 640, 480, ((10.0, 10.0, 60.0, 60.0),), (), "groundtruth", "head-adjust",
                          full.reviewed_at + 3600, parts=("heads",))
    assert merger.merge([heads]).merged == [rid]
    label = dataset.get(rid).label
    assert label["heads"] == [[10.0, 10.0, 60.0, 60.0]]
    assert label["persons"][0]["keypoints"][0][0] == pytest.approx(135.0)  # the bundle said 110


def test_a_review_of_a_turned_image_is_refused_not_merged(world) -> None:
    """A Ground Truth worker shown an EXIF-turned JPEG as stored answers in that frame (its size
    turned): merging it as the record's frame put every box and point in the wrong place."""
    store, dataset, merger = world
    rid = _annotated(store, b"turned", "review")
    store.set_state(rid, (REVIEW_PENDING,), UPLOADED)
    turned = ReviewedLabel(**{**_reviewed(rid).__dict__, "width": 480, "height": 640})
    report = merger.merge([turned])
    assert report.merged == [] and "480x640" in report.skipped[rid] and "640x480" in report.skipped[rid]
    assert dataset.get(rid) is None and store.get(rid).state == UPLOADED
    assert merger.merge([_reviewed(rid)]).merged == [rid]  # the record's size merges


def test_a_merge_cut_off_before_its_version_records_it_on_the_next_run(world, monkeypatch) -> None:
    """put_reviewed and set_state commit per image; a kill before record_version left the new
    content without a version row, and the restart saw every label "unchanged" and recorded
    nothing, so a training job named a dataset version that ``versions`` never held."""
    store, dataset, merger = world
    assert merger.merge([]).version is None and dataset.versions() == []  # empty: nothing to record
    rid = _annotated(store, b"cut off", "review")
    store.set_state(rid, (REVIEW_PENDING,), UPLOADED)

    class Killed(BaseException):
        pass

    def killed(*args, **kwargs):
        raise Killed()

    with monkeypatch.context() as m:
        m.setattr(dataset, "record_version", killed)
        with pytest.raises(Killed):
            merger.merge([_reviewed(rid, move=4.0)])
    assert dataset.versions() == [] and store.get(rid).state == REVIEWED
    report = merger.merge([_reviewed(rid, move=4.0)])
    assert report.unchanged == [rid] and report.version is not None
    assert [v.version for v in dataset.versions()] == [dataset.version()]
    assert merger.merge([_reviewed(rid, move=4.0)]).version is None and len(dataset.versions()) == 1


def test_summary_counts_what_the_reviewer_adjusted_not_rounding(world) -> None:
    """Ground Truth boxes come back in whole pixels, so an unchanged review never scores exactly
    0: the summary counts the review's ``adjusted`` and falls back to the score without it."""
    store, dataset, merger = world
    labels = []
    for n, (move, adjusted) in enumerate([(0.4, False), (0.4, False), (20.0, True), (3.0, None)]):
        rid = _annotated(store, f"rounded {n}".encode(), "review")
        store.set_state(rid, (REVIEW_PENDING,), UPLOADED)
        labels.append(ReviewedLabel(**{**_reviewed(rid, move=move).__dict__, "adjusted": adjusted}))
    merger.merge(labels)
    s = dataset.mistakenness_summary()["all"]
    assert s["count"] == 4 and s["max"] > 0 and sorted(e.mistakes["score"] for e in dataset.entries())[0] > 0
    assert s["adjusted"] == 2  # the 20 px move and the 3 px one without a flag


def test_a_training_export_records_a_version_a_killed_merge_left_unrecorded(world, tmp_path: Path,
                                                                          monkeypatch) -> None:
    """The training job's export recorded a version only when it added auto-accepted images
    itself: after a merge killed before its record, the job's lineage named a dataset version
    that ``versions`` never held."""
    from sync.training_job import dataset_exporter

    store, dataset, merger = world
    rid = _annotated(store, b"cut off before the job", "review")
    store.set_state(rid, (REVIEW_PENDING,), UPLOADED)
    with monkeypatch.context() as m:
        m.setattr(dataset, "record_version", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            merger.merge([_reviewed(rid, move=4.0)])
    assert dataset.versions() == []
    dataset_exporter(store, dataset)(tmp_path / "export")
    assert [v.version for v in dataset.versions()] == [dataset.version()]


def test_images_whose_bytes_retention_removed_leave_the_dataset(world, tmp_path: Path) -> None:
    """``[retention] auto_image_days`` removed an image's bytes: its auto label leaves the training
    set (with a new version), and a dataset swept whole later never takes it in."""
    store, dataset, merger = world
    ids = [_annotated(store, b"\xff\xd8 auto %d" % n, "auto_accepted") for n in range(2)]
    merger.merge([])
    assert all(dataset.get(i) is not None for i in ids)
    before = dataset.version()
    [gone], _ = store.prune_auto_images(store.clock() + 1, limit=1)
    [kept] = [i for i in ids if i != gone]
    report = merger.merge([])
    assert report.auto_removed == 1 and dataset.get(gone) is None and dataset.get(kept) is not None
    assert report.version is not None and report.version.version == dataset.version() != before
    res = export_dataset(dataset, store.image_path, tmp_path / "out")
    assert res.missing_images == () and res.images == 1
    fresh = Dataset(tmp_path / "fresh")
    try:
        Merger(store, fresh).merge([])
        assert fresh.get(gone) is None and fresh.get(kept) is not None
    finally:
        fresh.close()


def test_a_version_is_recorded_for_the_labels_it_names(world, monkeypatch) -> None:
    """Another process (``annotator dataset export`` beside the agent) writing between the version's
    reading and the record's transaction made the record name labels the dataset did not hold."""
    store, dataset, merger = world
    first = _annotated(store, b"first", "auto_accepted")
    assert dataset.put_auto(first, auto_label(_record(first), dataset.schema.names), {"origin": "auto"})
    other = Dataset(dataset.root)
    other._db.execute("PRAGMA busy_timeout=200")
    second = _annotated(store, b"second", "auto_accepted")
    real = Dataset.version

    def version(self: Dataset) -> str:
        value = real(self)
        if self is dataset:
            try:  # another process's write once the version was read; refused while recording holds the write lock
                other.put_auto(second, auto_label(_record(second), dataset.schema.names), {"origin": "auto"})
            except Exception:  # noqa: BLE001  "database is locked"
                pass
        return value

    monkeypatch.setattr(Dataset, "version", version)
    recorded = dataset.record_version("test")
    monkeypatch.setattr(Dataset, "version", real)
    assert recorded is not None
    assert (recorded.version, recorded.images) == (dataset.version(), len(dataset.entries()))
    other.close()


def test_a_review_that_cannot_merge_is_said_once_while_the_backend_keeps_it(world, caplog) -> None:
    """A review server holds a review of an image this store does not have (another appliance's)
    and yields it at every collection: it was warned about at every pass, for good. Now once;
    said again if it comes back after it was gone."""
    import logging

    store, dataset, merger = world
    foreign = _reviewed("f" * 64)
    caplog.set_level(logging.INFO, logger="sync.merge")
    for labels in ([foreign], [foreign], [foreign], [], [foreign]):
        report = merger.merge(labels)
        assert list(report.skipped) == [foreign.image_id] * bool(labels)
    said = [r for r in caplog.records if "not merged" in r.getMessage()]
    assert len(said) == 2, [r.getMessage() for r in said]
