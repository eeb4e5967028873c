"""Helpers for tests that run the product's commands as real processes on loopback.

Importable by every test module (``tests/`` is on ``sys.path`` through the root conftest):

- ``free_port``: a TCP port on 127.0.0.1 that nothing listens on right now;
- ``command_env``: the environment for ``python -m service.cli ...`` run from the repository:
  ``PYTHONPATH`` set to it, no ``ANNOTATOR_CONFIG`` inherited, and optionally the credentials of
  a loopback S3 server (with every other AWS source switched off);
- ``start_serve``: ``annotator serve --config F`` with its output appended to a log file;
- ``wait_for``: poll a condition while the process lives, failing with the log's tail;
- ``FakeClock``: a clock (store, drop folder, agent) that moves only when the test moves it;
- ``demo_bundle_copy``: the shipped demo bundle copied under another id (a second bundle to swap);
- ``two_bundles_adopted``: a models folder with two such copies adopted (current, previous);
- ``serve_toml``: the daemon's sections of an appliance's TOML file (drop folder, bundle, store);
- ``sample_images``: distinct images made from the shipped samples;
- ``annotated_once``: every image annotated once, row, record and sidecar naming one bundle.
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


def demo_bundle_copy(folder: Path, bid: str, created: str | None = None) -> Path:
    """The demo bundle copied to ``folder`` as bundle ``bid`` (unsigned; ``created`` when given)."""
    import dataclasses
    import shutil

    from service.bundle import load_bundle, write_bundle
    from service.cli_daemon import DEMO_BUNDLE

    base = load_bundle(DEMO_BUNDLE)
    shutil.copytree(DEMO_BUNDLE, folder)
    (folder / "bundle.sig").unlink(missing_ok=True)
    changes: dict[str, Any] = {"path": folder, "id": bid}
    if created is not None:
        changes["created"] = created
    write_bundle(dataclasses.replace(base, **changes))
    return folder


def two_bundles_adopted(tmp_path: Path) -> Any:
    """``tmp_path / "models"`` (``sync.models.ModelSlots``) with copies of the demo bundle
    adopted as bundle-a then bundle-b: current -> bundle-b, previous -> bundle-a."""
    from sync.models import ModelPuller, ModelSlots

    slots = ModelSlots(tmp_path / "models")
    puller = ModelPuller(slots, None, None, lambda p: None)  # type: ignore[arg-type]
    for bid, created in (("bundle-a", "2026-01-01T00:00:00Z"), ("bundle-b", "2026-02-01T00:00:00Z")):
        puller.adopt(demo_bundle_copy(tmp_path / "src" / bid, bid, created))
    return slots


def serve_toml(tmp_path: Path, bundle: Path, listen: str = "127.0.0.1:0", lease_seconds: float = 2.0,
               sidecars: bool = True) -> str:
    """``[server]``, ``[store]``, ``[drop]``, ``[engine]`` (and ``[outputs]``) of a small appliance
    under ``tmp_path``: drop folder ``drop/``, store ``store/``, batches of 2 on one thread."""
    outputs = f"[outputs]\nsidecar_dir = \"{tmp_path / 'sidecars'}\"\n" if sidecars else ""
    return f"""
[server]
listen = "{listen}"
[store]
root = "{tmp_path / 'store'}"
lease_seconds = {lease_seconds}
min_free_mb = 0
[drop]
folder = "{tmp_path / 'drop'}"
stable_seconds = 0.0
poll_interval = 0.1
[engine]
bundle = "{bundle}"
batch_size = 2
threads = 1
{outputs}"""


def sample_images(n: int, tag: str) -> list[bytes]:
    """``n`` distinct JPEGs: the shipped samples with ``tag-i`` after the JPEG's end."""
    raw = [p.read_bytes() for p in sorted((REPO / "service" / "assets" / "samples").glob("*.jpg"))]
    return [raw[i % len(raw)] + f"{tag}-{i}".encode() for i in range(n)]


def annotated_once(root: Path, images: list[bytes], done: tuple[str, ...]) -> dict[str, int]:
    """Each of ``images`` is in a state of ``done`` under ``root / "store"``, annotated once in
    its history, its sidecar (``root / "sidecars"``), row and record naming one bundle; returns
    the number of images per bundle."""
    import hashlib
    import json

    from service.store import Store

    store = Store(root / "store")
    try:
        per: dict[str, int] = {}
        for data in images:
            iid = hashlib.sha256(data).hexdigest()
            row = store.get(iid)
            assert row.state in done, (iid, row.state, row.error)
            assert [h[1] for h in store.history(iid)].count("annotated") == 1, iid
            sidecar = json.loads((root / "sidecars" / f"{iid}.json").read_text())
            assert sidecar["bundle_id"] == row.bundle_id == row.record["bundle_id"], iid
            per[row.bundle_id] = per.get(row.bundle_id, 0) + 1
        return per
    finally:
        store.close()


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
