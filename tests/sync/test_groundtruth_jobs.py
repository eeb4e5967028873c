"""A labeling job's life over weeks: no image is lost from the review loop.

The store's review images go up with the real uploader to a loopback S3 bucket (moto); the real
``ReviewSubmitTask`` hands each batch to the Ground Truth backend, which starts a labeling job
through a SageMaker client double that checks every request against botocore's real service
model and answers as AWS does (ResourceInUse for a name in use, ResourceNotFound for a job it
does not know). The cloud side ends jobs the ways a console user, an expired task or a failure
leave them, writing output manifests through the real consolidation Lambda (``gtworker``);
the real merge task takes the reviews in.

What must hold: every uploaded image is reviewed and merged, or said to be stuck with a reason;
an image a Failed or Stopped job (or an expired task) did not label goes to review again, once,
in a job of its own, and it is said; nothing is sent twice without cause (a restart after
CreateLabelingJob succeeded starts no second job).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

import pytest

botocore = pytest.importorskip("botocore")
from botocore.exceptions import ClientError  # noqa: E402
from botocore.session import get_session  # noqa: E402
from botocore.validate import validate_parameters  # noqa: E402

from gtworker import answer, output_line  # noqa: E402
from reviewdata import fill_store  # noqa: E402
from s3servers import S3Server  # noqa: E402
from service.keypoints import CABIN19_NAMES  # noqa: E402
from service.store import REVIEWED, UPLOADED  # noqa: E402
from sync.agent import Agent  # noqa: E402
from sync.dataset import Dataset  # noqa: E402
from sync.groundtruth import OUTPUT_MANIFEST, GroundTruthBackend, LabelingJobSpec, job_name_for  # noqa: E402
from sync.merge import MergeReport, Merger, MergeTask  # noqa: E402
from sync.review import ReviewedKeypoint, ReviewedPerson  # noqa: E402
from sync.s3store import S3Store  # noqa: E402
from sync.submit import ReviewSubmitTask  # noqa: E402
from sync.uploader import Uploader, UploadSettings  # noqa: E402

WIDTH, HEIGHT = 64, 48  # reviewdata's images
PREFIX = "edge-review"
SPEC = LabelingJobSpec(role_arn="arn:aws:iam::123456789012:role/gt", workteam_arn=(
    "arn:aws:sagemaker:eu-west-1:123456789012:workteam/private-crowd/edge"),
    ui_template_s3_uri="s3://bkt/edge/groundtruth/keypoints.liquid.html",
    output_s3_path="s3://bkt/edge/groundtruth/output", job_prefix=PREFIX)


def person(x: float = 10.0) -> ReviewedPerson:
    return ReviewedPerson((5.0, 5.0, 60.0, 45.0), tuple(ReviewedKeypoint(x, 10.0, "visible") for _ in CABIN19_NAMES))


def _error(code: str, op: str, status: int = 400) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": f"{code} ({op})"},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, op)


class SageMaker:
    """CreateLabelingJob / DescribeLabelingJob as AWS answers them; requests are checked against
    the real service model (a request AWS would refuse fails the test)."""

    def __init__(self) -> None:
        self.model = get_session().get_service_model("sagemaker")
        self.jobs: dict[str, dict[str, Any]] = {}
        self.created: list[str] = []  # every CreateLabelingJob that started a job (a paid job)
        self.describe_error: ClientError | None = None
        self.describes = 0

    def _check(self, operation: str, params: dict[str, Any]) -> None:
        validate_parameters(params, self.model.operation_model(operation).input_shape)

    def create_labeling_job(self, **request: Any) -> dict[str, str]:
        self._check("CreateLabelingJob", request)
        name = request["LabelingJobName"]
        if name in self.jobs:
            raise _error("ResourceInUse", "CreateLabelingJob")
        self.jobs[name] = {"status": "InProgress", "request": request}
        self.created.append(name)
        return {"LabelingJobArn": f"arn:aws:sagemaker:eu-west-1:123456789012:labeling-job/{name}"}

    def describe_labeling_job(self, **request: Any) -> dict[str, Any]:
        self._check("DescribeLabelingJob", request)
        self.describes += 1
        if self.describe_error is not None:
            raise self.describe_error
        job = self.jobs.get(request["LabelingJobName"])
        if job is None:
            raise _error("ResourceNotFound", "DescribeLabelingJob")
        out = {"LabelingJobName": request["LabelingJobName"], "LabelingJobStatus": job["status"]}
        if job.get("failure"):
            out["FailureReason"] = job["failure"]
        return out


class World:
    """A store, its review batch uploaded to a moto bucket, submitted to Ground Truth by the agent."""

    def __init__(self, s3: S3Server, tmp_path: Path, images: int) -> None:
        self.tmp_path = tmp_path
        self.store, self.ids, _ = fill_store(tmp_path / "store", review=images)
        self.bucket = S3Store(s3.new_bucket(), "edge", client=s3.client())
        self.uploader = Uploader(self.store, self.bucket, UploadSettings("box-1", batch_size=images))
        while self.uploader.run_once():
            pass
        (self.batch,) = [b.batch_id for b in self.uploader.journal.batches()]
        self.sagemaker = SageMaker()
        self.dataset = Dataset(tmp_path / "dataset")
        self.reports: list[MergeReport] = []
        self.start()

    def start(self) -> None:
        """A fresh agent process on the same store, journal, bucket and account (a restart)."""
        # resubmit_stopped: these tests follow a Stopped job's retry (without the setting a Stopped
        # job's images are said, not sent again: test_reviewlife_groundtruth)
        self.backend = GroundTruthBackend(self.bucket, appliance_id="box-1", job=SPEC, sagemaker_client=self.sagemaker,
                                          resubmit_stopped=True)
        self.submit = ReviewSubmitTask(self.uploader.journal, self.store, self.bucket, self.backend,
                                       reconcile_interval=0.0)
        merge = MergeTask(Merger(self.store, self.dataset), self.backend.collect, on_report=self.report)
        self.agent = Agent([self.submit, merge], fault_base=0.0)

    def report(self, report: MergeReport) -> None:
        self.reports.append(report)
        self.backend.merged(report)

    def passes(self, n: int = 3) -> None:
        for _ in range(n):
            self.agent.run_pass()

    def input_lines(self, job: str) -> dict[str, dict[str, Any]]:
        uri = self.sagemaker.jobs[job]["request"]["InputConfig"]["DataSource"]["S3DataSource"]["ManifestS3Uri"]
        key = uri.removeprefix(f"s3://{self.bucket.bucket}/edge/")
        return {(line := json.loads(t))["image-id"]: line for t in self.bucket.get(key).decode().splitlines() if t}

    def end(self, job: str, status: str, labelled: Sequence[str] = (), expired: Sequence[str] = (),
            output: bool = True, failure: str | None = None, x: float = 10.0) -> None:
        """The cloud side ends ``job``: its output manifest holds the labelled images and a
        failure line for each expired one (the others are absent)."""
        self.sagemaker.jobs[job].update(status=status, failure=failure)
        if not output:
            return
        lines = self.input_lines(job)
        out = [output_line(lines[i], answer(((10.0, 5.0, 30.0, 25.0),), [person(x)], CABIN19_NAMES,
                                            (WIDTH, HEIGHT)), job) for i in labelled]
        for i in expired:
            out.append(dict(lines[i], **{"reviewed-metadata": {
                "failure-reason": "ClientError: The task expired before a worker submitted it",
                "job_name": f"labeling-job/{job}", "type": "groundTruth/custom", "human-annotated": "yes",
                "creation_date": "2026-12-01T10:00:00.000000"}}))
        self.bucket.put(f"groundtruth/output/{job}/{OUTPUT_MANIFEST}",
                        b"".join(json.dumps(line).encode() + b"\n" for line in out))

    def state(self, image_id: str) -> str:
        row = self.store.get(image_id)
        assert row is not None
        return row.state

    def close(self) -> None:
        self.uploader.close()
        self.dataset.close()
        self.store.close()


@pytest.fixture
def world(moto_server: S3Server, tmp_path: Path) -> Iterator[World]:
    w = World(moto_server, tmp_path, images=5)
    yield w
    w.close()


def test_a_restart_after_create_labeling_job_starts_no_second_job(world: World) -> None:
    """kill -9 between CreateLabelingJob and recording the submission: the restart asks again
    under the same name, AWS answers ResourceInUse, and the batch is recorded as submitted."""
    w = world
    job = job_name_for(PREFIX, w.batch)
    real = w.sagemaker.create_labeling_job

    def create_then_die(**request: Any) -> dict[str, str]:
        real(**request)
        raise SystemExit("killed after CreateLabelingJob")  # nothing after it ran

    w.sagemaker.create_labeling_job = create_then_die  # type: ignore[method-assign]
    with pytest.raises(SystemExit):
        w.submit.run_once()
    assert w.uploader.journal.submissions("groundtruth") == []
    w.sagemaker.create_labeling_job = real  # type: ignore[method-assign]
    w.start()
    w.passes()
    assert w.sagemaker.created == [job]
    assert w.uploader.journal.submissions("groundtruth") == [(w.batch, "groundtruth", 5)]


def test_images_a_stopped_job_did_not_label_are_reviewed_again_once_and_said(
        world: World, caplog: pytest.LogCaptureFixture) -> None:
    """A job stopped in the console part-way (one image labelled, one task expired, three never
    shown): the unlabelled images stayed ``uploaded`` for ever and nobody was told. Now they go
    to a job of their own, once; what that job does not label either is said, never sent a
    third time; a restart in between starts nothing twice."""
    w = world
    a, b, c, d, e = w.ids
    job = job_name_for(PREFIX, w.batch)
    w.passes()
    assert w.sagemaker.created == [job]
    w.end(job, "Stopped", labelled=[a], expired=[b])
    caplog.set_level(logging.WARNING)
    w.passes()
    retry = job_name_for(PREFIX, w.batch + "-retry")
    assert w.sagemaker.created == [job, retry]
    assert set(w.input_lines(retry)) == {b, c, d, e}
    assert any(job in r.getMessage() and retry in r.getMessage() and "Stopped" in r.getMessage()
               for r in caplog.records)
    assert w.state(a) == REVIEWED
    # a restart while the retry job runs starts nothing new
    w.start()
    w.passes()
    assert w.sagemaker.created == [job, retry]
    # the retry job labels three; one task expires again: said, and not sent a third time
    caplog.clear()
    w.end(retry, "Completed", labelled=[b, c, d], expired=[e])
    w.passes()
    assert [w.state(i) for i in (a, b, c, d, e)] == [REVIEWED] * 4 + [UPLOADED]
    assert w.backend.stuck.keys() == {e} and "expired" in w.backend.stuck[e]
    assert any(e[:12] in r.getMessage() and "expired" in r.getMessage() for r in caplog.records)
    w.start()
    w.passes()
    assert w.sagemaker.created == [job, retry]
    assert e in w.backend.stuck


def test_a_failed_job_with_no_output_is_reviewed_again_with_its_reason(
        world: World, caplog: pytest.LogCaptureFixture) -> None:
    """A job that Failed before writing any output (e.g. a Lambda the role may not call) left
    every image of the batch ``uploaded`` for ever."""
    w = world
    job = job_name_for(PREFIX, w.batch)
    w.passes()
    w.end(job, "Failed", output=False, failure="ClientError: the pre-annotation Lambda could not be invoked")
    caplog.set_level(logging.WARNING)
    w.passes()
    retry = job_name_for(PREFIX, w.batch + "-retry")
    assert w.sagemaker.created == [job, retry]
    assert set(w.input_lines(retry)) == set(w.ids)
    assert any("Lambda could not be invoked" in r.getMessage() for r in caplog.records)
    w.end(retry, "Completed", labelled=w.ids, x=20.0)
    w.passes()
    assert all(w.state(i) == REVIEWED for i in w.ids)
    entry = w.dataset.get(w.ids[0])
    assert entry is not None and entry.provenance["job"] == retry


def test_describe_refused_or_throttled_a_deleted_output_or_job_is_said_and_nothing_stops(
        world: World, caplog: pytest.LogCaptureFixture) -> None:
    """DescribeLabelingJob throttled or refused (AccessDenied) says so and the agent goes on;
    a Completed job whose output manifest was deleted, or a job DescribeLabelingJob does not
    know, is said and its images are not sent again (that would pay twice for reviews that may
    exist)."""
    w = world
    job = job_name_for(PREFIX, w.batch)
    w.passes()
    w.end(job, "Stopped", labelled=w.ids[:1])
    caplog.set_level(logging.WARNING)
    for error in (_error("ThrottlingException", "DescribeLabelingJob"),
                  _error("AccessDeniedException", "DescribeLabelingJob")):
        w.sagemaker.describe_error = error
        w.passes()  # no PermanentError: the agent goes on
        assert w.sagemaker.created == [job]
    assert any("sagemaker:DescribeLabelingJob" in r.getMessage() for r in caplog.records)
    assert w.state(w.ids[0]) == REVIEWED
    # a completed job whose output prefix was deleted
    w.sagemaker.describe_error = None
    w.sagemaker.jobs[job]["status"] = "Completed"
    w.bucket.delete(f"groundtruth/output/{job}/{OUTPUT_MANIFEST}")
    w.start()
    w.passes()
    assert w.sagemaker.created == [job]
    assert set(w.backend.stuck) == set(w.ids[1:]) and "gone" in w.backend.stuck[w.ids[1]]
    # a job the account does not know (another region, deleted)
    del w.sagemaker.jobs[job]
    w.start()
    w.passes()
    assert w.sagemaker.created == [job]
    assert "does not know" in w.backend.stuck[w.ids[1]]
    assert all(w.state(i) == UPLOADED for i in w.ids[1:])
