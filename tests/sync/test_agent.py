"""The agent loop, the [sync] configuration, and ``sync`` run as a real process (SIGKILL, SIGTERM)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.store import Store
from sync.agent import Agent
from sync.config import load_sync_config, sync_config_from_dict
from sync.errors import PermanentError, RetryableError, SyncConfigError

from procs import command_env
from reviewdata import fill_store
from s3servers import ACCESS_KEY, SECRET_KEY, S3Server

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
])
def test_config_errors_name_the_key(tmp_path: Path, doc: dict, words: str) -> None:
    with pytest.raises(SyncConfigError, match=words):
        sync_config_from_dict(doc, tmp_path)


def test_config_defaults(tmp_path: Path) -> None:
    cfg = sync_config_from_dict({}, tmp_path)
    assert cfg.target.kind == "local" and cfg.target.root == tmp_path / "annotator-data" / "outbox"


# -- the real process ----------------------------------------------------------------------
def _config(tmp_path: Path, server: S3Server, bucket: str, batch_size: int = 3) -> Path:
    path = tmp_path / "annotator.toml"
    path.write_text(f"""
[store]
root = "store"
[sync]
appliance_id = "box-1"
batch_size = {batch_size}
poll_interval = 0.2
retry_base = 0.05
retry_cap = 0.5
[sync.target]
kind = "s3"
bucket = "{bucket}"
prefix = "edge"
endpoint_url = "{server.endpoint_url}"
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
