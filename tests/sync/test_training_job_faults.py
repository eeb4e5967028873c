"""The training-job task through crashes, lost answers and bad artifacts, against moto's
SageMaker and S3 in server mode (moto completes a job at once and never runs the container;
the tests put whatever artifact they need where SageMaker would).

- A kill -9 or a timeout around ``create_training_job`` must not start a second, paid-for job:
  the job is saved (``Starting``) before the call and looked up by name afterwards.
- An artifact that is not a usable bundle is refused (``ArtifactRefused``) and the agent goes
  on; credentials rejected still stop the agent and leave the job to be followed again.
- A power loss right after the create call must not bring back the state before ``Starting``
  (its folder is fsynced), and the temporary folders a kill -9 left are removed at the restart.
"""
from __future__ import annotations

import io
import json
import random
import shutil
import tarfile
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest
from botocore.exceptions import ClientError

from s3servers import S3Server
from sync.agent import Agent
from sync.errors import PermanentError, RetryableError
from sync.objectstore import LocalFolderStore
from sync.registry import BundleRegistry
from sync.training_job import CloudTrainer, TrainingJobTask, build_training_task
from sync.training_settings import TrainingSettings

from procs import trace_disk

T0 = 1_900_000_000.0


class Killed(BaseException):
    """Stands for kill -9: nothing after the point where it is raised runs, no handler sees it."""


def _settings(server: S3Server, bucket: str, prefix: str) -> TrainingSettings:
    return TrainingSettings(
        role_arn="arn:aws:iam::123456789012:role/annotator-training", appliance_id="box-1",
        image_uri="123456789012.dkr.ecr.us-east-1.amazonaws.com/annotator:train",
        input_s3=f"s3://{bucket}/datasets", output_s3=f"s3://{bucket}/jobs", min_new_reviewed=1, poll_interval=0,
        region="us-east-1", endpoint_url=server.endpoint_url, instance_type="ml.m5.large", job_prefix=prefix)


def _export(out: Path) -> tuple[str, int]:
    out.mkdir(parents=True)
    (out / "annotations.json").write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    return "v-faults-1", 5


@pytest.fixture
def make_task(moto_server: S3Server, s3_env: None, tmp_path: Path) -> Callable[..., TrainingJobTask]:
    """``make_task(clock)``: the task as the agent builds it, a fresh process each call (same
    state folder, bucket, registry and job prefix)."""
    bucket = moto_server.new_bucket()
    settings = _settings(moto_server, bucket, f"t-{uuid.uuid4().hex[:10]}")
    registry = LocalFolderStore(tmp_path / "registry")

    def make(clock: Callable[[], float] = lambda: T0) -> TrainingJobTask:
        task = build_training_task(settings, registry, tmp_path, _export)
        task.clock = clock
        return task

    make.bucket = bucket  # type: ignore[attr-defined]
    make.registry = registry  # type: ignore[attr-defined]
    return make


def _jobs(task: TrainingJobTask) -> list[str]:
    prefix = task.trainer.settings.job_prefix
    found = task.trainer.sagemaker.list_training_jobs(NameContains=prefix, MaxResults=100)
    return sorted(j["TrainingJobName"] for j in found["TrainingJobSummaries"])


def test_a_kill_after_sagemaker_accepted_the_job_starts_no_second_job(make_task: Any) -> None:
    first = make_task(lambda: T0)
    real_start = first.trainer.start

    def start_then_die(*args: Any) -> str:
        real_start(*args)
        raise Killed  # the process dies before it could write down the job

    first.trainer.start = start_then_die  # type: ignore[method-assign]
    with pytest.raises(Killed):
        first.run_once()
    (started,) = _jobs(first)

    restarted = make_task(lambda: T0 + 120)  # systemd restarts the agent two minutes later
    assert restarted.run_once() is True
    assert _jobs(restarted) == [started]  # followed, not started again
    state = restarted.state()
    assert state["job"] == started and state["status"] == "InProgress"
    assert state["arn"].endswith(f"training-job/{started}") and state["dataset_version"] == "v-faults-1"
    assert state["input"].endswith(f"/datasets/{started}/")


def test_a_read_timeout_after_sagemaker_accepted_the_job_starts_no_second_job(make_task: Any) -> None:
    ticks = iter(range(100))
    task = make_task(lambda: T0 + 60 * next(ticks))  # each pass a minute later: a new job would get a new name
    real_start = task.trainer.start
    calls = []

    def start_then_time_out(*args: Any) -> str:
        calls.append(args)
        real_start(*args)
        if len(calls) == 1:  # the answer is lost; botocore's read timeout is sorted as retryable
            raise RetryableError("create_training_job: Read timeout on endpoint URL")
        return "unused"

    task.trainer.start = start_then_time_out  # type: ignore[method-assign]
    agent = Agent([task], poll_interval=0.0)
    agent.run_pass()
    assert isinstance(agent.last_error, RetryableError)
    agent.run_pass()
    agent.run_pass()
    assert len(_jobs(task)) == 1 and len(calls) == 1
    assert task.state()["status"] == "InProgress" and task.state()["job"] == _jobs(task)[0]


def test_a_kill_before_the_create_call_creates_the_saved_job_under_its_name(make_task: Any) -> None:
    first = make_task(lambda: T0)

    def die(*args: Any) -> str:
        raise Killed

    first.trainer.start = die  # type: ignore[method-assign]
    with pytest.raises(Killed):
        first.run_once()
    saved = first.state()
    assert saved["status"] == "Starting" and _jobs(first) == []

    restarted = make_task(lambda: T0 + 120)
    assert restarted.run_once() is True
    assert _jobs(restarted) == [saved["job"]]
    state = restarted.state()
    assert state["status"] == "InProgress" and state["job"] == saved["job"] and state["input"] == saved["input"]
    job = restarted.trainer.describe(saved["job"])
    assert job["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"] == saved["input"]


def test_resource_in_use_on_create_means_already_started(tmp_path: Path) -> None:
    """Real AWS wording (moto overwrites a job of the same name instead): describe says
    "Requested resource not found", the create then says ResourceInUse (an earlier create,
    whose answer was lost, landed in between): the job is followed."""
    import boto3
    from botocore.stub import ANY, Stubber

    sagemaker = boto3.session.Session().client("sagemaker", region_name="us-east-1", aws_access_key_id="x",
                                               aws_secret_access_key="y")
    settings = TrainingSettings(role_arn="arn:aws:iam::123456789012:role/r", image_uri="img", input_s3="s3://b/in",
                                output_s3="s3://b/out", min_new_reviewed=1, poll_interval=0)
    task = TrainingJobTask(CloudTrainer(settings, sagemaker, None, lambda uri: None), None, tmp_path, _export)
    (tmp_path / "training-job.json").write_text(json.dumps(
        {"job": "annotator-20300101-000000", "status": "Starting", "dataset_version": "v-1",
         "input": "s3://b/in/annotator-20300101-000000/", "init": None}))
    arn = "arn:aws:sagemaker:us-east-1:123456789012:training-job/annotator-20300101-000000"
    with Stubber(sagemaker) as stub:
        stub.add_client_error("describe_training_job", "ValidationException", "Requested resource not found.", 400)
        stub.add_client_error("create_training_job", "ResourceInUse",
                              "Training job names must be unique within an AWS account and region", 400,
                              expected_params={"TrainingJobName": "annotator-20300101-000000", **{k: ANY for k in (
                                  "AlgorithmSpecification", "RoleArn", "HyperParameters", "InputDataConfig",
                                  "OutputDataConfig", "ResourceConfig", "StoppingCondition", "Tags")}})
        stub.add_response("describe_training_job", {
            "TrainingJobName": "annotator-20300101-000000", "TrainingJobArn": arn, "ModelArtifacts": {
                "S3ModelArtifacts": ""}, "TrainingJobStatus": "InProgress", "SecondaryStatus": "Starting",
            "AlgorithmSpecification": {"TrainingInputMode": "File"}, "ResourceConfig": {"VolumeSizeInGB": 30},
            "StoppingCondition": {}, "CreationTime": 0})
        assert task.run_once() is True
        stub.assert_no_pending_responses()
    assert task.state()["status"] == "InProgress" and task.state()["arn"] == arn


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _corrupt_bundle_tar(request: pytest.FixtureRequest, tmp_path: Path) -> bytes:
    """A real bundle whose ONNX file no longer matches its sha256 in bundle.json."""
    bundle = request.getfixturevalue("pose_bundle")
    folder = tmp_path / "corrupt"
    shutil.copytree(bundle.path, folder)
    onnx = folder / bundle.models["pose_main"].file
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    return _tar({p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()})


ARTIFACTS: dict[str, tuple[Callable[..., bytes], str]] = {
    "garbage": (lambda r, t: b"this is not a tar.gz " * 50, "not a readable tar.gz"),
    "truncated": (lambda r, t: _tar({"bundle.json": random.Random(7).randbytes(100_000)})[:20_000],
                  "not a readable tar.gz"),
    "no-manifest": (lambda r, t: _tar({"README.txt": b"where is the bundle?"}), "holds no bundle.json"),
    "corrupt-bundle": (_corrupt_bundle_tar, "checksum mismatch"),
}


class Upload:
    """Stands for the upload task beside the training task."""

    name = "upload"

    def __init__(self) -> None:
        self.calls = 0

    def run_once(self) -> bool:
        self.calls += 1
        return False


@pytest.mark.parametrize("kind", sorted(ARTIFACTS))
def test_a_bad_artifact_is_refused_and_the_agent_goes_on(make_task: Any, moto_server: S3Server, kind: str,
                                                          request: pytest.FixtureRequest, tmp_path: Path) -> None:
    task = make_task()
    assert task.run_once() is True  # export, upload, create; moto completes the job at once
    state = task.state()
    artifact = task.trainer.describe(state["job"])["ModelArtifacts"]["S3ModelArtifacts"]
    make_bytes, message = ARTIFACTS[kind]
    moto_server.client().put_object(Bucket=make_task.bucket, Key=artifact[len(f"s3://{make_task.bucket}/"):],
                                    Body=make_bytes(request, tmp_path))

    for _ in range(2):  # and after a restart, nothing stops the agent either
        upload = Upload()
        Agent([upload, make_task()], poll_interval=0.0).run(once=True)
        assert upload.calls >= 1
    refused = make_task().state()
    assert refused["status"] == "ArtifactRefused" and refused["job"] == state["job"]
    assert message in refused["failure"] and refused["artifact"] == artifact
    assert BundleRegistry(make_task.registry).bundle_ids() == []  # nothing published
    assert make_task().run_once() is False  # same dataset version: no new job for it
    assert _jobs(task) == [state["job"]]


def test_no_artifact_address_is_refused(make_task: Any) -> None:
    task = make_task()
    assert task.run_once() is True
    task.trainer.describe = lambda job: {"TrainingJobStatus": "Completed", "ModelArtifacts": {}}  # type: ignore
    assert task.run_once() is True
    assert task.state()["status"] == "ArtifactRefused" and "artifact address" in task.state()["failure"]


def test_rejected_credentials_on_the_artifact_stop_the_agent_and_keep_the_job(make_task: Any,
                                                                              moto_server: S3Server) -> None:
    task = make_task()
    assert task.run_once() is True
    job = task.state()["job"]
    real_s3 = task.trainer.s3

    class ExpiredS3:
        def download_file(self, bucket: str, key: str, filename: str) -> None:
            raise ClientError({"Error": {"Code": "ExpiredToken", "Message": "The provided token has expired."},
                               "ResponseMetadata": {"HTTPStatusCode": 400}}, "GetObject")

    task.trainer.s3 = ExpiredS3()
    with pytest.raises(PermanentError, match=r"credentials rejected: the session token expired \(ExpiredToken"):
        Agent([Upload(), task], poll_interval=0.0).run(once=True)
    assert task.state()["status"] == "InProgress"  # nothing refused: followed again once fixed

    task.trainer.s3 = real_s3  # credentials renewed; the artifact is still missing, then garbage
    with pytest.raises(RetryableError, match="not there"):
        task.run_once()
    artifact = task.trainer.describe(job)["ModelArtifacts"]["S3ModelArtifacts"]
    moto_server.client().put_object(Bucket=make_task.bucket, Key=artifact[len(f"s3://{make_task.bucket}/"):],
                                    Body=b"junk")
    assert task.run_once() is True and task.state()["status"] == "ArtifactRefused"


# -- power loss and kill -9 leftovers (no moto: a trainer that only records) --

class RecordingTrainer:
    """``CloudTrainer``'s calls as the task makes them; ``start`` notes itself in ``events``."""

    def __init__(self, events: list[tuple[str, Any]], min_new_reviewed: int = 1) -> None:
        self.settings = TrainingSettings(role_arn="arn:aws:iam::123456789012:role/r", image_uri="img",
                                         input_s3="s3://b/in", output_s3="s3://b/out",
                                         min_new_reviewed=min_new_reviewed, poll_interval=0)
        self.events = events

    def upload_folder(self, folder: Path, name: str) -> str:
        return f"s3://b/in/{name}/"

    def find(self, job: str) -> None:
        return None

    def start(self, job: str, input_uri: str, init_uri: str | None = None) -> str:
        self.events.append(("create", job))
        return f"arn:aws:sagemaker:us-east-1:123456789012:training-job/{job}"


def test_the_starting_state_is_on_disk_before_the_create_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rename of training-job.json survives a power loss only once its folder is fsynced:
    rolled back to the old state after the create call, the next pass would start a second,
    paid-for job under a new name."""
    events: list[tuple[str, Any]] = []
    trace_disk(monkeypatch, events)
    task = TrainingJobTask(RecordingTrainer(events), None, tmp_path, _export, clock=lambda: T0)
    assert task.run_once() is True and task.state()["status"] == "InProgress"
    created = next(i for i, e in enumerate(events) if e[0] == "create")
    saved = max(i for i, e in enumerate(events[:created]) if e == ("replace", tmp_path / "training-job.json"))
    assert ("fsync", tmp_path.stat().st_ino) in events[saved:created]
    assert events[-1] == ("fsync", tmp_path.stat().st_ino)  # InProgress too


def test_temporary_folders_a_killed_run_left_are_removed(tmp_path: Path) -> None:
    """A kill -9 inside the export or the artifact's unpacking leaves its ``TemporaryDirectory``
    in the state folder (a dataset export is as large as the reviewed images); only those
    names go."""
    stale = [tmp_path / "training-export-k2_x9abc", tmp_path / "training-artifact-0a1b2c3d"]
    for folder in stale:
        (folder / "dataset" / "images").mkdir(parents=True)
        (folder / "dataset" / "images" / "a.jpg").write_bytes(b"\xff\xd8" * 1000)
    kept = ["training-export-short", "training-export-k2_x9abc.d", "training-exporter-12345678", "store.sqlite3",
            "training-job.json"]
    for name in kept[:3]:
        (tmp_path / name).mkdir()
    (tmp_path / "store.sqlite3").write_bytes(b"SQLite format 3\x00")
    (tmp_path / "training-job.json").write_text(json.dumps({"job": "annotator-old", "status": "Completed",
                                                            "dataset_version": "v-faults-1"}))
    task = TrainingJobTask(RecordingTrainer([], min_new_reviewed=1000), None, tmp_path, _export, clock=lambda: T0)
    assert all(p.is_dir() for p in stale)  # building the task removes nothing
    assert task.run_once() is False  # too few new images: no job
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
