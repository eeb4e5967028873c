"""Helpers for tests that run the product's commands as real processes on loopback.

Importable by every test module (``tests/`` is on ``sys.path`` through the root conftest):

- ``free_port``: a TCP port on 127.0.0.1 that nothing listens on right now;
- ``command_env``: the environment for ``python -m service.cli ...`` run from the repository:
  ``PYTHONPATH`` set to it, no ``ANNOTATOR_CONFIG`` inherited, and optionally the credentials of
  a loopback S3 server (with every other AWS source switched off);
- ``start_serve``: ``annotator serve --config F`` with its output appended to a log file;
- ``wait_for``: poll a condition while the process lives, failing with the log's tail;
- ``FakeClock``: a clock (store, drop folder, agent) that moves only when the test moves it.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def command_env(access_key: str | None = None, secret_key: str | None = None,
                extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """``os.environ`` for a command run from ``REPO``; with keys, the AWS variables of a loopback S3."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if access_key is not None:
        env.update(AWS_ACCESS_KEY_ID=access_key, AWS_SECRET_ACCESS_KEY=secret_key or "",
                   AWS_DEFAULT_REGION="us-east-1", AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull,
                   AWS_EC2_METADATA_DISABLED="true")
    env.pop("ANNOTATOR_CONFIG", None)
    env.update(extra or {})
    return env


def start_serve(config: Path, log: Path, cwd: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``annotator serve --config CONFIG`` in ``cwd``, stdout and stderr appended to ``log``."""
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--config", str(config)],
                                stdout=f, stderr=subprocess.STDOUT, cwd=cwd, env=None if env is None else dict(env))


def wait_for(cond: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path, seconds: float = 90.0,
             poll: float = 0.1) -> None:
    """Return once ``cond()`` holds; fail with the log's tail if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + seconds
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"annotator serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        assert time.monotonic() < deadline, f"timed out; serve log:\n{log.read_text()[-3000:]}"
        time.sleep(poll)


class FakeClock:
    """A clock that moves only when the test moves it (``clock.t += seconds``); epoch seconds or
    monotonic ones, as the test starts it."""

    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def trace_disk(monkeypatch: Any, events: list[tuple[str, Any]] | None = None) -> list[tuple[str, Any]]:
    """Record, in order, ``("fsync", inode)`` and ``("replace", destination path)`` into
    ``events`` (a new list by default), for tests of what is on disk before a step. Inodes, not
    names: a file fsynced under one name may be the one renamed to another."""
    events = [] if events is None else events
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def replace(src: Any, dst: Any, **kw: Any) -> None:
        real_replace(src, dst, **kw)
        events.append(("replace", Path(dst)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events
