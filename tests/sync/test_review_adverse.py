"""What Ground Truth sends back, through a loopback S3 bucket (moto), ``collect`` and the merge.

The store's images go out with the real uploader (images + input manifest in the bucket); the
output manifests are what Ground Truth writes after the real consolidation Lambda
(``gtworker``), then bent the ways a failed job, a truncated write, a careless worker or another
tool leave them. Each bad line must be refused with its reason (``rejected`` or the merge
report) while every other review of the same batch merges, exactly once, and the merge task
must never fail for good.
"""
from __future__ import annotations

import datetime as dt
import json
import uuid
from pathlib import Path
from typing import Any, Iterator, Sequence

import pytest

from gtworker import answer, output_line
from reviewdata import fill_store
from s3servers import S3Server
from service.keypoints import CABIN19_NAMES
from service.store import REVIEWED, UPLOADED
from sync.agent import Agent
from sync.dataset import Dataset
from sync.groundtruth import OUTPUT_MANIFEST, GroundTruthBackend
from sync.merge import MergeReport, Merger, MergeTask
from sync.review import ReviewedKeypoint, ReviewedPerson
from sync.s3store import S3Store
from sync.uploader import Uploader, UploadSettings

WIDTH, HEIGHT = 64, 48  # reviewdata's images


def person(x: float = 10.0, visibility: str = "visible", box: Sequence[float] = (5.0, 5.0, 60.0, 45.0)
           ) -> ReviewedPerson:
    points = tuple(ReviewedKeypoint(x, 10.0, visibility) for _ in CABIN19_NAMES)
    return ReviewedPerson(tuple(box), points)  # type: ignore[arg-type]


class World:
    """A store, its review batch uploaded to a moto bucket, the Ground Truth backend on that bucket."""

    def __init__(self, s3: S3Server, tmp_path: Path, images: int) -> None:
        self.store, self.ids, _ = fill_store(tmp_path / "store", review=images)
        self.bucket = S3Store(s3.new_bucket(), "edge", client=s3.client())
        uploader = Uploader(self.store, self.bucket, UploadSettings("box-1", batch_size=images))
        while uploader.run_once():
            pass
        uploader.close()
        (key,) = self.bucket.list("manifests/")
        self.lines = {(line := json.loads(t))["image-id"]: line for t in self.bucket.get(key).decode().splitlines()}
        self.backend = GroundTruthBackend(self.bucket, appliance_id="box-1")
        self.dataset = Dataset(tmp_path / "dataset")
        self.reports: list[MergeReport] = []
        self.task = MergeTask(Merger(self.store, self.dataset), self.backend.collect, on_report=self.report)
        self.agent = Agent([self.task], fault_base=0.0)

    def report(self, report: MergeReport) -> None:
        """As the agent wires it (``sync.agent._merge_task``): the backend hears what was merged."""
        self.reports.append(report)
        self.backend.merged(report)

    def out(self, image_id: str, heads: Sequence[Sequence[float]] = ((10.0, 5.0, 30.0, 25.0),),
            persons: Sequence[ReviewedPerson] | None = None, job: str = "job-a", when: str | None = None
            ) -> dict[str, Any]:
        line = output_line(self.lines[image_id], answer(heads, [person()] if persons is None else persons,
                                                        CABIN19_NAMES, (WIDTH, HEIGHT)), job)
        if when is not None:
            line["reviewed-metadata"]["creation_date"] = when
        return line

    def write(self, job: str, lines: Sequence[dict[str, Any] | bytes]) -> str:
        key = f"groundtruth/output/{job}/{OUTPUT_MANIFEST}"
        self.bucket.put(key, b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines))
        return key

    def state(self, image_id: str) -> str:
        row = self.store.get(image_id)
        assert row is not None
        return row.state

    def close(self) -> None:
        self.dataset.close()
        self.store.close()


@pytest.fixture
def world(moto_server: S3Server, tmp_path: Path) -> Iterator[World]:
    w = World(moto_server, tmp_path, images=4)
    yield w
    w.close()


def test_lines_that_are_not_utf8_json_objects_or_numbers_refuse_only_themselves(world: World) -> None:
    """One bad byte, a ``null``, a huge integer or a value of another shape made ``collect``
    raise (UnicodeDecodeError, AttributeError, OverflowError, IndexError): the merge task
    failed on every pass and no review of any manifest merged."""
    w = world
    a, b, c, d = w.ids
    huge = json.dumps(w.out(c)).replace('"x": 10.0', '"x": 1' + "0" * 400, 1).encode()
    shape = w.out(d)
    shape["reviewed"]["persons"] = "not a list"
    key = w.write("job-a", [w.out(a), b'{"source-ref": "s3://b/\xff\xfe.jpg"}', b"null", b"[1, 2]",
                            b'{"source-ref": "s3://b/x.jpg", "image-id": "x", "rev', huge, shape, w.out(b)])
    builtin = {"source-ref": "s3://b/y.jpg", "image-id": "y", "box": {"image_size": [], "annotations": []},
               "box-metadata": {"type": "groundtruth/object-detection", "human-annotated": "yes", "job-name": "j"}}
    w.write("job-b", [builtin])
    assert w.agent.run_pass() and w.agent.last_error is None
    assert [w.state(i) for i in w.ids] == [REVIEWED, REVIEWED, UPLOADED, UPLOADED]
    assert sorted(w.backend.rejected) == sorted([f"{key}:{n}" for n in range(2, 8)]
                                                + [f"groundtruth/output/job-b/{OUTPUT_MANIFEST}:1"])
    assert "utf-8" in w.backend.rejected[f"{key}:2"] and "JSON object" in w.backend.rejected[f"{key}:3"]
    assert c in w.backend.rejected[f"{key}:6"] and "OverflowError" in w.backend.rejected[f"{key}:6"]
    assert not w.agent.run_pass() and w.agent.last_error is None  # the same again: no work, no fault


def test_a_manifest_deleted_between_listing_and_reading_is_left_for_the_next_pass(world: World) -> None:
    """ObjectNotFound is a PermanentError: out of ``collect`` it stopped the agent for good."""
    w = world
    a, b, _, _ = w.ids
    gone = w.write("job-a", [w.out(a)])
    w.write("job-b", [w.out(b, job="job-b")])
    listing = w.bucket.folders

    def list_then_delete(prefix: str) -> list[str]:
        jobs = listing(prefix)
        w.bucket.client.delete_object(Bucket=w.bucket.bucket, Key=f"edge/{gone}")  # another hand cleans up
        return jobs

    w.bucket.folders = list_then_delete  # type: ignore[method-assign]
    assert w.agent.run_pass() and w.agent.last_error is None
    assert (w.state(a), w.state(b)) == (UPLOADED, REVIEWED)


def test_points_and_boxes_off_the_image_or_without_area_are_refused_not_merged(world: World) -> None:
    """A visible point at x = 500 in a 64 px image, a head box at negative coordinates, 1e30,
    or of no area merged as they were: wrong labels in the training set."""
    w = world
    off, negative, far, flat = w.ids
    w.write("job-a", [w.out(off, persons=[person(x=500.0)]),
                      w.out(negative, heads=[(-40.0, -30.0, -10.0, -5.0)]),
                      w.out(far, persons=[person(x=1e30, visibility="occluded")]),
                      w.out(flat, heads=[(20.0, 10.0, 20.0, 30.0)])])
    assert not w.agent.run_pass() and w.agent.last_error is None
    assert [w.state(i) for i in w.ids] == [UPLOADED] * 4 and not w.dataset.entries(origin="reviewed")
    skipped = w.reports[-1].skipped
    assert "'nose' at (500.0, 10.0) is marked visible but lies outside the 64x48 image" in skipped[off]
    assert "outside the 64x48 image" in skipped[negative] and "marked occluded" in skipped[far]
    assert "no area" in skipped[flat]
    assert set(w.reports[-1].refused) == {off, negative, far, flat}
    # a point placed outside the image and marked outside claims no location: merged; a worker
    # who deleted every box and point: an empty label, merged as the reviewer's answer
    w.write("job-b", [w.out(off, persons=[person(x=10.0), person(x=1e30, visibility="outside")], job="job-b"),
                      w.out(negative, heads=[], persons=[], job="job-b")])
    assert w.agent.run_pass() and (w.state(off), w.state(negative)) == (REVIEWED, REVIEWED)
    empty = w.dataset.get(negative)
    assert empty is not None and empty.label["heads"] == [] and empty.label["persons"] == []
    assert empty.provenance["adjusted"] is True


def test_a_key_point_label_outside_the_schema_is_refused_not_dropped(world: World) -> None:
    """A point labelled "Nose" (renamed on the cloud side) was dropped: the nose merged as outside."""
    w = world
    renamed, good, twice, _ = w.ids
    line = w.out(renamed)
    line["reviewed"]["persons"][0]["keypoints"][0]["label"] = "Nose"
    doubled = w.out(twice)
    doubled["reviewed"]["persons"][0]["keypoints"].append(dict(doubled["reviewed"]["persons"][0]["keypoints"][0],
                                                               x=40.0))
    key = w.write("job-a", [line, w.out(good), doubled])
    assert w.agent.run_pass()
    assert [w.state(i) for i in (renamed, good, twice)] == [UPLOADED, REVIEWED, UPLOADED]
    assert "'Nose' is not one of the schema's names" in w.backend.rejected[f"{key}:1"]
    assert "given twice" in w.backend.rejected[f"{key}:3"]


def test_the_same_image_in_two_lines_or_jobs_merges_once(world: World) -> None:
    """The newest review wins and merges once. Two different reviews of the same time were
    taken in turn: the dataset changed on every pass and the agent never slept."""
    w = world
    twice, tied, alone, _ = w.ids
    old = "2026-01-01T10:00:00.000000"
    new = "2026-01-02T10:00:00.000000"
    w.write("job-a", [w.out(twice, persons=[person(x=20.0)], when=old),
                      w.out(tied, persons=[person(x=20.0)], when=old),
                      w.out(tied, persons=[person(x=30.0)], when=old),
                      w.out(alone)])
    # another job for the same image, in flight when the first finished, and a job of another
    # appliance (images never sent from here) in the same prefix
    w.write("job-b", [w.out(twice, persons=[person(x=40.0)], job="job-b", when=new)])
    foreign = dict(w.out(alone, job="job-c"), **{"image-id": uuid.uuid4().hex * 2})
    w.write("job-c", [foreign])
    assert w.agent.run_pass()
    assert w.reports[-1].merged.count(twice) == 1 and tied in w.reports[-1].skipped
    assert "2 different reviews of the same time" in w.reports[-1].skipped[tied]
    assert foreign["image-id"] in w.reports[-1].skipped
    assert set(w.reports[-1].refused) == {tied}  # another appliance's image is not refused, only not ours
    entry = w.dataset.get(twice)
    assert entry is not None and entry.provenance["job"] == "job-b"
    assert entry.label["persons"][0]["keypoints"][0][:2] == [40.0, 10.0]
    assert (w.state(tied), w.state(alone)) == (UPLOADED, REVIEWED)
    assert not w.agent.run_pass() and not w.agent.run_pass()  # nothing changes any more


def test_objects_a_failed_or_stopped_job_gave_up_on_are_reported(world: World) -> None:
    """A line with ``<attribute>-metadata.failure-reason`` and no label was ignored without a word."""
    w = world
    failed, good, _, _ = w.ids
    line = dict(w.lines[failed], **{"reviewed-metadata": {
        "failure-reason": "ClientError: The task expired before a worker submitted it",
        "job_name": "labeling-job/job-a", "type": "groundTruth/custom", "human-annotated": "yes",
        "creation_date": dt.datetime(2026, 1, 1).isoformat()}})
    stopped = dict(w.lines[good])  # a stopped job writes the objects nobody labelled as they came in
    key = w.write("job-a", [line, stopped, w.out(good)])
    assert w.agent.run_pass() and (w.state(failed), w.state(good)) == (UPLOADED, REVIEWED)
    assert list(w.backend.rejected) == [f"{key}:1"]
    assert "task expired" in w.backend.rejected[f"{key}:1"] and failed in w.backend.rejected[f"{key}:1"]


def test_the_agents_metrics_count_the_refused_reviews(world: World, tmp_path: Path) -> None:
    """Refusals were only in the log: ``annotator_reviews_refused`` counts those of the last pass
    (the backend's unparsable lines and the merge's refusals), not another appliance's images."""
    from types import SimpleNamespace

    from service.metrics import MetricsRecorder
    from sync.agent import _merge_task

    w = world
    bad, good, _, _ = w.ids
    w.write("job-a", [w.out(bad, persons=[person(x=500.0)]), w.out(good), b"{truncated",
                      dict(w.out(good, job="job-c"), **{"image-id": uuid.uuid4().hex * 2})])
    metrics, closers = MetricsRecorder(), []
    task = _merge_task(w.store, SimpleNamespace(dataset_root=tmp_path / "dataset2", holdout_fraction=0.1),
                       w.backend, metrics, closers)
    try:
        assert task.run_once()
        assert metrics.registry.get_sample_value("annotator_reviews_refused") == 2  # the point off, the truncated line
        assert metrics.registry.get_sample_value("annotator_reviews_merged_total") == 1
    finally:
        for close in closers:
            close()


def test_a_pass_reads_only_the_job_folders_and_the_manifests_not_settled(world: World) -> None:
    """Each pass listed every object under the output prefix (every worker response of every
    job ever run) and read every output manifest ever written: after a year of jobs, minutes
    of S3 calls a minute. Now one delimiter listing finds the jobs, and a manifest whose labels
    were all settled is not read again (a restarted agent reads each once)."""
    w = world
    a, b, c, _ = w.ids
    w.write("job-a", [w.out(a)])
    w.write("job-b", [w.out(b, job="job-b"), b"{truncated"])
    for job in ("job-a", "job-b"):  # what Ground Truth leaves beside the manifests
        for n in range(5):
            w.bucket.put(f"groundtruth/output/{job}/annotations/worker-response/iteration-1/{n}/r.json", b"{}")
    gets: list[str] = []
    get, listing = w.bucket.get, w.bucket.list
    w.bucket.get = lambda key, *a, **k: gets.append(key) or get(key, *a, **k)  # type: ignore[method-assign]
    w.bucket.list = lambda *a, **k: pytest.fail("the whole output prefix listed")  # type: ignore[method-assign]
    assert w.agent.run_pass() and (w.state(a), w.state(b)) == (REVIEWED, REVIEWED)
    assert len(gets) == 2
    gets.clear()
    assert not w.agent.run_pass() and gets == []  # settled: not read again
    w.write("job-c", [w.out(c, job="job-c")])
    assert w.agent.run_pass() and w.state(c) == REVIEWED
    assert gets == [f"groundtruth/output/job-c/{OUTPUT_MANIFEST}"]
    w.bucket.list = listing  # type: ignore[method-assign]
    restarted = GroundTruthBackend(w.bucket, appliance_id="box-1")
    again = MergeTask(Merger(w.store, w.dataset), restarted.collect, on_report=restarted.merged)
    gets.clear()
    assert not again.run_once() and len(gets) == 3  # each read once, nothing merged twice
    gets.clear()
    assert not again.run_once() and gets == []
