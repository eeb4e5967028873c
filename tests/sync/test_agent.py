"""The agent loop, the [sync] configuration, and ``sync`` run as a real process (SIGKILL, SIGTERM)."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from service.store import Store
from sync.agent import Agent
from sync.backoff import RetryPolicy
from sync.config import load_sync_config, sync_config_from_dict
from sync.errors import PermanentError, RetryableError, Stopped, SyncConfigError, SyncError
from sync.objectstore import LocalFolderStore
from sync.uploader import Uploader, UploadSettings

from procs import FakeClock, command_env
from reviewdata import fill_store
from s3servers import ACCESS_KEY, SECRET_KEY, S3Server, free_port

REPO = Path(__file__).resolve().parents[2]


class Steps:
    """A task with ``work`` steps to do; raises ``error`` on the first call when given."""

    name = "steps"

    def __init__(self, work: int, error: Exception | None = None) -> None:
        self.work, self.error, self.calls = work, error, 0

    def run_once(self) -> bool:
        self.calls += 1
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        if self.work:
            self.work -= 1
            return True
        return False


def test_agent_runs_tasks_until_no_work() -> None:
    a, b = Steps(3), Steps(0, RetryableError("server down"))
    Agent([a, b], poll_interval=0).run(once=True)
    assert a.work == 0 and b.calls >= 2  # a retryable failure does not stop the others


def test_agent_stops_on_permanent_error_and_on_stop() -> None:
    with pytest.raises(PermanentError):
        Agent([Steps(5, PermanentError("credentials rejected"))]).run()
    agent = Agent([Steps(10**9)])
    agent.stop.set()
    agent.run()  # returns at once


def test_config_full_example(tmp_path: Path) -> None:
    path = tmp_path / "annotator.toml"
    path.write_text("""
[store]
root = "data"
[sync]
appliance_id = "lab-01"
batch_size = 7
max_side = 1280
poll_interval = 2
[sync.target]
kind = "s3"
bucket = "edge-review"
prefix = "edge"
endpoint_url = "http://127.0.0.1:9000"
sse = "aws:kms"
kms_key_id = "alias/edge"
[sync.review]
backend = "labelstudio"
""")
    cfg = load_sync_config(path)
    assert (cfg.store_root, cfg.appliance_id, cfg.batch_size, cfg.max_side, cfg.poll_interval) == (
        tmp_path / "data", "lab-01", 7, 1280, 2.0)
    assert (cfg.target.kind, cfg.target.bucket, cfg.target.sse, cfg.target.kms_key_id) == (
        "s3", "edge-review", "aws:kms", "alias/edge")
    assert cfg.tables["review"] == {"backend": "labelstudio"}


@pytest.mark.parametrize("doc, words", [
    ({"sync": {"batchsize": 3}}, "sync.batchsize: unknown key"),
    ({"sync": {"batch_size": "3"}}, "sync.batch_size: expected"),
    ({"sync": {"batch_size": 0}}, "sync.batch_size: expected >= 1"),
    ({"sync": {"appliance_id": "a b"}}, "sync.appliance_id"),
    ({"sync": {"target": {"kind": "ftp"}}}, "sync.target.kind"),
    ({"sync": {"target": {"kind": "s3"}}}, "sync.target.bucket: required"),
    ({"sync": {"target": {"kind": "s3", "bucket": "b", "sse": "rot13"}}}, "sync.target.sse"),
    # A misspelt task table would leave its task on defaults (or off) without a word.
    ({"sync": {"model": {"registry": "s3://b/models"}}}, r"\[sync.model\]: unknown table .*\[sync.models\]"),
    ({"sync": {"trainig": {"role_arn": "x"}}}, r"\[sync.trainig\]: unknown table"),
])
def test_config_errors_name_the_key(tmp_path: Path, doc: dict, words: str) -> None:
    with pytest.raises(SyncConfigError, match=words):
        sync_config_from_dict(doc, tmp_path)


def test_config_defaults(tmp_path: Path) -> None:
    cfg = sync_config_from_dict({}, tmp_path)
    assert cfg.target.kind == "local" and cfg.target.root == tmp_path / "annotator-data" / "outbox"


# -- the real process ----------------------------------------------------------------------
FAST_RETRIES = "poll_interval = 0.2\nretry_base = 0.05\nretry_cap = 0.5"


def _config(tmp_path: Path, server: S3Server | None, bucket: str, batch_size: int = 3,
            endpoint: str | None = None, retries: str = FAST_RETRIES) -> Path:
    """The agent's TOML for the bucket at ``server`` (or at ``endpoint``, e.g. a refused port)."""
    path = tmp_path / "annotator.toml"
    path.write_text(f"""
[store]
root = "store"
[sync]
appliance_id = "box-1"
batch_size = {batch_size}
{retries}
[sync.target]
kind = "s3"
bucket = "{bucket}"
prefix = "edge"
endpoint_url = "{endpoint or server.endpoint_url}"
region = "us-east-1"
""")
    return path


def _start(config: Path, *extra: str, env_secret: str = SECRET_KEY) -> subprocess.Popen:
    env = command_env(ACCESS_KEY, env_secret)
    return subprocess.Popen([sys.executable, "-m", "sync.cli", "sync", "--config", str(config), *extra],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _keys(server: S3Server, bucket: str) -> list[str]:
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [o["Key"] for p in pages for o in p.get("Contents", [])]


def test_sigkill_mid_run_then_restart_finishes_without_duplicates(moto_server: S3Server, tmp_path: Path) -> None:
    store, review, _ = fill_store(tmp_path / "store", review=12, auto=2)
    bucket = moto_server.new_bucket()
    config = _config(tmp_path, moto_server, bucket)
    kills, seen = 0, 0
    for _ in range(3):  # kill it three times, each time right after new objects appear
        proc = _start(config, "--once")
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            now = len(_keys(moto_server, bucket))
            if now > seen:
                seen = now
                proc.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.01)
        proc.wait(timeout=30)
    assert kills >= 1
    proc = _start(config, "--once")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    keys = _keys(moto_server, bucket)
    lines = [json.loads(t) for k in keys if k.endswith(".manifest")
             for t in moto_server.client().get_object(Bucket=bucket, Key=k)["Body"].read().decode().splitlines()]
    assert sorted(line["image-id"] for line in lines) == sorted(review)  # every image once, no duplicate lines
    assert sum(k.startswith("edge/images/") for k in keys) == 12
    assert sum(k.startswith("edge/preannotations/box-1/") for k in keys) == 12
    assert Store(tmp_path / "store").counts()["uploaded"] == 12


def test_sigterm_stops_the_agent_cleanly(moto_server: S3Server, tmp_path: Path) -> None:
    store, review, _ = fill_store(tmp_path / "store", review=2)
    proc = _start(_config(tmp_path, moto_server, moto_server.new_bucket()))
    deadline = time.monotonic() + 30
    while store.counts()["uploaded"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert store.counts()["uploaded"] == 2


def test_missing_bucket_exits_2_with_one_line(moto_server: S3Server, tmp_path: Path) -> None:
    store, _, _ = fill_store(tmp_path / "store", review=1)
    proc = _start(_config(tmp_path, moto_server, "edge-never-created"), "--once")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "annotator sync: bucket edge-never-created does not exist" in err.splitlines()[-1]
    assert store.counts()["uploaded"] == 0


# -- a stop during a retry wait, faults of one task, the watchdog ---------------------------
class Broken:
    """A task with a bug: every call raises ``error``."""

    name = "broken"

    def __init__(self, error: Exception) -> None:
        self.error, self.calls = error, 0

    def run_once(self) -> bool:
        self.calls += 1
        raise self.error


def test_a_stop_during_the_first_reachability_check_ends_the_agent_cleanly(tmp_path: Path) -> None:
    """SIGTERM while the target is still unreachable at start-up: ``Stopped`` from the check's
    retry wait escaped ``Agent.run`` (``annotator sync`` exited 2, systemd marked the unit failed)."""
    stop = threading.Event()

    class Down(LocalFolderStore):
        def check(self) -> None:
            stop.set()  # what the SIGTERM handler does, while the check waits to retry
            raise RetryableError("endpoint unreachable")

    store = Store(tmp_path / "store")
    settings = UploadSettings("box-1", retry=RetryPolicy(1.0, 5.0, 8))
    uploader = Uploader(store, Down(tmp_path / "out"), settings, stop=stop)
    later = Steps(5)
    agent = Agent([uploader, later], 1.0, stop, closers=[uploader.close, store.close])
    agent.run()  # returns, nothing raised
    assert later.calls == 0 and agent.closers == []


def test_stopped_from_any_task_ends_the_run_cleanly() -> None:
    """Wherever a task waits to retry (any ``retry_call``), a stop there ends the agent as a stop."""

    class Waiting:
        name = "models"

        def run_once(self) -> bool:
            raise Stopped("get bundles/b1/head.onnx: stopped while waiting to retry")

    later = Steps(3)
    agent = Agent([Waiting(), later], poll_interval=0)
    agent.run()
    assert agent.stop.is_set() and later.calls == 0


def test_an_unexpected_error_skips_only_that_task_for_a_growing_backoff(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock(1000.0)
    broken, other = Broken(TypeError("'NoneType' object is not subscriptable")), Steps(100)
    agent = Agent([broken, other], poll_interval=10, clock=clock, fault_base=30, fault_cap=100)
    with caplog.at_level(logging.ERROR, logger="sync.agent"):
        assert agent.run_pass()  # the other task still ran, and had work
    assert (broken.calls, other.calls) == (1, 1)
    assert "broken: unexpected TypeError" in str(agent.last_error)
    assert [r for r in caplog.records if r.exc_info and r.exc_info[1] is broken.error]  # logged with its traceback
    calls = []
    for step in (29, 1, 59, 1, 99, 1, 99, 1):  # due after 30, 60, then the cap (100) twice
        clock.t += step
        agent.run_pass()
        calls.append(broken.calls)
        assert agent.last_error is not None  # its work is still left: `--once` exits 1, STATUS says why
    assert calls == [1, 2, 2, 3, 3, 4, 4, 5]
    assert other.calls == 9


def test_a_task_that_works_again_is_called_every_pass_again() -> None:
    clock = FakeClock(1000.0)
    flaky = Steps(5, KeyError("width"))
    agent = Agent([flaky], poll_interval=10, clock=clock, fault_base=30)
    assert not agent.run_pass() and flaky.calls == 1
    clock.t += 30
    assert agent.run_pass() and agent.last_error is None
    assert agent.run_pass() and flaky.calls == 3  # no backoff left from the earlier fault


def test_once_ends_with_work_left_after_an_unexpected_error_and_permanent_errors_still_stop() -> None:
    other = Steps(3)
    agent = Agent([Broken(ValueError("bad data")), other], poll_interval=0)
    agent.run(once=True)
    assert other.work == 0 and agent.last_error is not None
    with pytest.raises(PermanentError, match="credentials"):
        Agent([Broken(PermanentError("credentials rejected")), Steps(3)], poll_interval=0).run()
    with pytest.raises(SyncConfigError):
        Agent([Broken(SyncConfigError("sync.x: bad")), Steps(3)], poll_interval=0).run()


def test_progress_keeps_the_watchdog_fed_and_a_task_without_progress_fails_it() -> None:
    """A 50-image batch on a slow uplink outlasted the 900 s limit with the heartbeat moving only
    between tasks: systemd killed a healthy agent mid-batch, over and over."""
    clock = FakeClock(1000.0)
    seen: list[bool] = []

    class SlowUpload:
        name = "upload"

        def run_once(self) -> bool:
            for _ in range(4):  # four objects of 600 s each: 40 minutes in one call
                clock.t += 600
                seen.append(agent.healthy())
                agent.beat()  # what the uploader's progress hook does per object
            clock.t += 899
            seen.append(agent.healthy())
            clock.t += 2  # 901 s without progress
            seen.append(agent.healthy())
            return False

    agent = Agent([SlowUpload()], poll_interval=10, clock=clock, stall_limit=900)
    agent.run_pass()
    assert seen == [True] * 5 + [False]
    assert agent.healthy()  # the pass ended: the loop is alive


@pytest.mark.parametrize("code, status, kind", [
    ("InternalFailure", 500, RetryableError),
    ("ServiceUnavailable", 503, RetryableError),
    ("ThrottlingException", 400, RetryableError),
    ("TooManyRequestsException", 429, RetryableError),
    ("ValidationException", 400, PermanentError),
    ("AccessDeniedException", 400, PermanentError),
])
def test_sagemaker_errors_are_sorted_by_http_status(code: str, status: int, kind: type) -> None:
    """A SageMaker 5xx other than ServiceUnavailable (InternalFailure) stopped the agent."""
    boto3 = pytest.importorskip("boto3")
    from botocore.stub import Stubber

    from sync.groundtruth import LabelingJobSpec, create_labeling_job

    spec = LabelingJobSpec(role_arn="arn:aws:iam::123456789012:role/gt",
                           workteam_arn="arn:aws:sagemaker:eu-west-1:123456789012:workteam/private-crowd/edge",
                           ui_template_s3_uri="s3://bkt/edge/t.liquid.html", output_s3_path="s3://bkt/edge/out")
    client = boto3.client("sagemaker", region_name="eu-west-1", aws_access_key_id="test", aws_secret_access_key="test")
    with Stubber(client) as stub:
        stub.add_client_error("create_labeling_job", code, "said the service", http_status_code=status)
        with pytest.raises(SyncError, match=code) as info:
            create_labeling_job(client, "edge-review-b7", "s3://bkt/edge/m.manifest", spec)
    assert type(info.value) is kind


def test_sigterm_while_the_target_is_unreachable_exits_0(tmp_path: Path) -> None:
    """The real process: the first reachability check retries a refused endpoint when SIGTERM comes."""
    store, _, _ = fill_store(tmp_path / "store", review=1)
    store.close()
    config = _config(tmp_path, None, "edge", endpoint=f"http://127.0.0.1:{free_port()}",
                     retries="poll_interval = 5\nretry_base = 2\nretry_cap = 5\nretry_attempts = 100")
    proc = _start(config)
    assert proc.stderr is not None
    guard = threading.Timer(60, proc.kill)  # a hang fails the test instead of blocking it
    guard.start()
    for line in proc.stderr:  # wait until the check waits to retry
        if "failed (attempt 1), retrying" in line:
            break
    guard.cancel()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
