"""A model pull's switch and an operator's rollback while images stream in, real processes:
``annotator serve`` on ``models/current``, ``annotator sync`` pulling from a folder registry,
``annotator models rollback``, images arriving through the drop folder and a gRPC stream; and
the agent killed with SIGKILL while the daemon reloads for its switch.

Pins (the audit found no bug here): no request fails, every image is annotated once and
recorded (row, record, sidecar, the answer its client got) under the bundle that made it, the
daemon runs what ``current`` names afterwards, and a bundle rolled back from is refused for
good, so the agent does not pull it again.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from procs import annotated_once, command_env, demo_bundle_copy, free_port, sample_images, serve_toml, wait_for
from sync.models import ModelPuller, ModelSlots

pytestmark = pytest.mark.slow

DONE = ("auto_accepted", "review_pending", "uploaded")  # the agent uploads review images

HOOK = '''
import os, sys, time
from pathlib import Path
import service.daemon as d
real = d.Daemon._follow_input_size
def follow(self, *a, **k):  # right after the swap, before ReloadModels answers
    out = real(self, *a, **k)
    Path(os.environ["HOOK_MARK"]).write_text("swap")
    time.sleep(float(os.environ["HOOK_SLEEP"]))
    return out
d.Daemon._follow_input_size = follow
from service.cli import main
sys.exit(main(sys.argv[1:]))
'''


def _box(tmp_path: Path) -> tuple[Path, ModelSlots, int]:
    """bundle-a adopted, bundle-b (newer) in the registry; the appliance's TOML file."""
    port = free_port()
    slots = ModelSlots(tmp_path / "models")
    ModelPuller(slots, None, None, lambda p: None).adopt(  # type: ignore[arg-type]
        demo_bundle_copy(tmp_path / "src" / "bundle-a", "bundle-a", "2026-01-01T00:00:00Z"))
    demo_bundle_copy(tmp_path / "registry" / "bundles" / "bundle-b", "bundle-b", "2026-02-01T00:00:00Z")
    for sub in ("drop", "sidecars"):
        (tmp_path / sub).mkdir()
    config = tmp_path / "annotator.toml"
    config.write_text(serve_toml(tmp_path, slots.root / "current", f"127.0.0.1:{port}", lease_seconds=3.0) + f"""
[sync]
poll_interval = 0.5
[sync.target]
kind = "local"
root = "{tmp_path / 'outbox'}"
[sync.models]
root = "{slots.root}"
poll_interval = 0.5
min_holdout = 1000
[sync.models.registry]
kind = "local"
root = "{tmp_path / 'registry'}"
""")
    (tmp_path / "hook.py").write_text(HOOK)
    return config, slots, port


def _run(config: Path, log: Path, *argv: str, hook_sleep: float | None = None) -> subprocess.Popen[bytes]:
    env = command_env(extra={"YOLO_OFFLINE": "1"})
    cmd = [sys.executable, "-m", "service.cli", *argv, "--config", str(config)]
    if hook_sleep is not None:
        env.update(HOOK_MARK=str(config.parent / "mark"), HOOK_SLEEP=str(hook_sleep))
        cmd[1:3] = [str(config.parent / "hook.py")]
    with open(log, "ab") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=config.parent, env=env)


class _Load:
    """Images through the drop folder and one gRPC stream, one every ``interval`` seconds each."""

    def __init__(self, root: Path, port: int, n: int, interval: float = 0.15) -> None:
        self.root, self.port, self.interval = root, port, interval
        self.dropped, self.streamed = sample_images(n, "drop"), sample_images(n, "stream")
        self.answers: dict[str, Any] = {}
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._drop), threading.Thread(target=self._stream)]
        for t in self.threads:
            t.start()

    def _drop(self) -> None:
        for i, data in enumerate(self.dropped):
            part = self.root / "drop" / f".f{i}.part"
            part.write_bytes(data)
            os.replace(part, self.root / "drop" / f"f{i:03d}.jpg")
            time.sleep(self.interval)

    def _stream(self) -> None:
        from service.client import AnnotatorClient, ImageMeta, annotate_request

        def requests() -> Any:
            for i, data in enumerate(self.streamed):
                yield annotate_request(data, ImageMeta(request_id=f"r{i}"))
                time.sleep(self.interval)

        try:
            with AnnotatorClient(f"127.0.0.1:{self.port}", timeout=60) as client:
                for resp in client.annotate_stream(requests()):
                    self.answers[resp.request_id] = resp
        except Exception as exc:  # the test asserts there was none
            self.errors.append(repr(exc))

    def join(self) -> None:
        for t in self.threads:
            t.join(120)

    def images(self) -> list[bytes]:
        return self.dropped + self.streamed


def _check(root: Path, load: _Load) -> dict[str, int]:
    """Each image annotated once, under one bundle everywhere; images per bundle."""
    from service.store import Store

    assert load.errors == [] and len(load.answers) == len(load.streamed)
    store = Store(root / "store")
    try:
        for resp in load.answers.values():
            assert resp.WhichOneof("result") == "annotation", resp
            assert store.get(resp.annotation.image_id).bundle_id == resp.annotation.bundle_id
    finally:
        store.close()
    return annotated_once(root, load.images(), DONE)


def _all_done(root: Path, n: int) -> bool:
    from service.store import Store

    store = Store(root / "store")
    try:
        counts = store.counts()
        return sum(counts.get(s, 0) for s in DONE) == n
    finally:
        store.close()


def _stop(*procs: subprocess.Popen[bytes]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def test_a_pull_switch_then_a_rollback_under_load(tmp_path: Path) -> None:
    from service.client import AnnotatorClient

    config, slots, port = _box(tmp_path)
    slog, alog = tmp_path / "serve.log", tmp_path / "agent.log"
    serve = _run(config, slog, "serve")
    agent = None
    try:
        wait_for(lambda: "serving on port" in slog.read_text(), serve, slog)
        load = _Load(tmp_path, port, 30)
        time.sleep(1.0)
        agent = _run(config, alog, "sync")
        wait_for(lambda: "switched to bundle bundle-b" in alog.read_text(), agent, alog)
        time.sleep(1.0)
        for _ in range(20):  # the agent's pass may hold models/.lock for a moment: the CLI says so, exit 1
            rollback = subprocess.run([sys.executable, "-m", "service.cli", "models", "rollback", "--config",
                                       str(config)], cwd=tmp_path, env=command_env(extra={"YOLO_OFFLINE": "1"}),
                                      capture_output=True, text=True, timeout=120)
            if "another process" not in rollback.stderr + rollback.stdout:
                break
            time.sleep(0.3)
        assert rollback.returncode == 0 and "rolled back to bundle-a" in rollback.stdout, rollback.stderr
        load.join()
        wait_for(lambda: _all_done(tmp_path, len(load.images())), serve, slog)
        passes = alog.read_text().count("sync.registry")
        time.sleep(2.0)  # a few more passes of the agent (poll 0.5 s)
        with AnnotatorClient(f"127.0.0.1:{port}", timeout=30) as client:
            assert client.status().bundle_id == "bundle-a" == slots.current_path().name
        assert "rolled back" in slots.refused()["bundle-b"] and slots.previous_path() is None
        assert alog.read_text().count("sync.registry") == passes  # bundle-b is not downloaded again
        assert alog.read_text().count("switched to bundle") == 1
        per = _check(tmp_path, load)
        assert set(per) <= {"bundle-a", "bundle-b"} and sum(per.values()) == len(load.images())
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(60) == 0
    finally:
        _stop(*(p for p in (serve, agent) if p is not None))


def test_the_agent_killed_while_the_daemon_reloads_for_its_switch(tmp_path: Path) -> None:
    """SIGKILL of the agent while its ReloadModels runs (the daemon swapped, not answered yet):
    ``switching.json`` stays; the restarted agent's first pass finishes the switch."""
    from service.client import AnnotatorClient

    config, slots, port = _box(tmp_path)
    slog, alog = tmp_path / "serve.log", tmp_path / "agent.log"
    serve = _run(config, slog, "serve", hook_sleep=3.0)
    agent = None
    try:
        wait_for(lambda: "serving on port" in slog.read_text(), serve, slog)
        load = _Load(tmp_path, port, 20)
        agent = _run(config, alog, "sync")
        wait_for(lambda: (tmp_path / "mark").exists(), agent, alog)
        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
        assert (slots.root / "switching.json").exists() and slots.current_path().name == "bundle-b"
        agent = _run(config, alog, "sync")
        wait_for(lambda: "interrupted switch completed" in alog.read_text(), agent, alog)
        load.join()
        wait_for(lambda: _all_done(tmp_path, len(load.images())), serve, slog)
        with AnnotatorClient(f"127.0.0.1:{port}", timeout=30) as client:
            assert client.status().bundle_id == "bundle-b" == slots.current_path().name
        assert slots.previous_path().name == "bundle-a" and not (slots.root / "switching.json").exists()
        assert slots.refused() == {}
        per = _check(tmp_path, load)
        assert sum(per.values()) == len(load.images())
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(60) == 0
    finally:
        _stop(*(p for p in (serve, agent) if p is not None))
