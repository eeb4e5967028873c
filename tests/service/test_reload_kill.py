"""A daemon whose ``engine.bundle`` is the models folder's ``current`` link, started (a restart
after kill -9, systemd's restart) or reloaded while a switch or a rollback moves that link.

Bugs found by the reload/kill audit:

- the bundle was read through the link file by file: ``bundle.json`` (id, thresholds) from one
  bundle and the ONNX files from the other when the link moved during the load, so images were
  annotated by one bundle's models and recorded under the other's id (or the start failed on a
  checksum mismatch);
- a rollback (or an agent's switch) that met the starting daemon before it listened ("connection
  refused": the link moves and the daemon loads it "at its next start") was lost when the daemon
  had read the link already: it then served the rolled-back bundle for good, ``current`` naming
  the other one.

Plus the good behaviour of ``annotator serve`` killed with SIGKILL or stopped with SIGTERM in the
middle of a reload (real processes): nothing in flight is lost or annotated twice, each image is
recorded under the bundle that made it, the restarted daemon runs what ``current`` names.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest

from procs import (annotated_once, command_env, demo_bundle_copy, free_port, sample_images, serve_toml,
                   two_bundles_adopted, wait_for)
from service.config import load_config
from sync.models import ModelPuller, ModelSlots

DONE = ("auto_accepted", "review_pending")


_models = two_bundles_adopted


def _config(tmp_path: Path, slots: ModelSlots, **more: Any) -> Any:
    return load_config(None, env={}, overrides={
        "store.root": str(tmp_path / "store"), "store.min_free_mb": 0, "engine.threads": 1,
        "engine.bundle": str(slots.root / "current"), **more})


def test_a_bundle_is_loaded_from_one_folder_while_current_moves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``current`` moves (a rollback) after the daemon read bundle.json: the models it runs are
    those of the bundle whose id it records, not the other bundle's files behind the link."""
    import service.bundle as bundle_mod
    import service.engine as engine_mod
    from service.daemon import Daemon

    slots = _models(tmp_path)
    opened: list[str] = []
    real_open, real_layout = engine_mod.open_session, bundle_mod.verify_onnx_layout

    def open_session(path: str, *a: Any, **k: Any) -> Any:
        opened.append(Path(path).resolve().parent.name)  # the bundle folder the file really is in
        return real_open(path, *a, **k)

    def layout(entry: Any, path: Path) -> None:
        real_layout(entry, path)
        if slots.current_path().name == "bundle-b":  # the link moves once, mid-load
            slots.switch(slots.root / "bundles" / "bundle-a")

    monkeypatch.setattr(engine_mod, "open_session", open_session)
    monkeypatch.setattr(bundle_mod, "verify_onnx_layout", layout)
    daemon = Daemon(_config(tmp_path, slots), workers=1)
    try:
        assert opened and set(opened) == {daemon.bundle.id}, (daemon.bundle.id, opened)
        assert daemon.status().bundle_path == str(slots.root / "current")  # what it was told to load
    finally:
        daemon.close()


def test_a_rollback_that_meets_the_starting_daemon_is_not_lost(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`annotator models rollback` while `annotator serve` starts (systemctl restart, then the
    rollback): the daemon read ``current`` (bundle-b) and does not listen yet, so the rollback's
    ReloadModels is refused and the rollback says the bundle "becomes active at its next start".
    The daemon must not then serve the rolled-back bundle-b while ``current`` names bundle-a."""
    from service.client import AnnotatorClient
    from service.daemon import Daemon
    from service.server import serve
    from sync.models import grpc_reload_fn
    from sync.models_cli import _unless_down

    slots = _models(tmp_path)
    port = free_port()
    target = f"127.0.0.1:{port}"
    rolled: list[str] = []
    real_load = Daemon._load

    def load(self: Daemon, path: str) -> Any:
        loaded = real_load(self, path)
        if not rolled:  # the operator's rollback, between the daemon's load and its listen
            puller = ModelPuller(ModelSlots(slots.root), None, None, _unless_down(grpc_reload_fn(target), target))  # type: ignore[arg-type]
            rolled.append(puller.rollback())
        return loaded

    monkeypatch.setattr(Daemon, "_load", load)
    config = _config(tmp_path, slots, **{"server.listen": target})
    ready, stop = threading.Event(), threading.Event()
    thread = threading.Thread(target=serve, args=(config, ready, stop), daemon=True)
    thread.start()
    try:
        assert ready.wait(60), "serve did not start"
        assert rolled == ["bundle-a"] and slots.current_path().name == "bundle-a"
        with AnnotatorClient(target, timeout=30) as client:
            assert client.status().bundle_id == "bundle-a"
            ann = client.annotate(sample_images(1, "rollback")[0])
            assert ann.bundle_id == "bundle-a"
    finally:
        stop.set()
        thread.join(60)


# -- real processes: kill -9 and SIGTERM in the middle of a reload (pins: no bug found) ---------

HOOK = '''
import os, sys, time
from pathlib import Path
import service.daemon as d
from service.engine import Engine
point, mark = os.environ["HOOK_POINT"], Path(os.environ["HOOK_MARK"])
reloading = []
real_reload, real_init, real_follow = d.Daemon.reload, Engine.__init__, d.Daemon._follow_input_size
def pause(name):
    mark.write_text(name)
    time.sleep(float(os.environ.get("HOOK_SLEEP", "60")))
def reload(self, *a, **k):
    reloading.append(1)
    return real_reload(self, *a, **k)
def init(self, *a, **k):
    if point == "load" and reloading:
        pause("load")  # the new bundle's sessions are being made
    return real_init(self, *a, **k)
def follow(self, *a, **k):
    out = real_follow(self, *a, **k)
    if point == "swap":
        pause("swap")  # swapped in, the RPC not answered yet
    return out
d.Daemon.reload, Engine.__init__, d.Daemon._follow_input_size = reload, init, follow
from service.cli import main
sys.exit(main(sys.argv[1:]))
'''


def _appliance(tmp_path: Path, port: int) -> tuple[Path, ModelSlots]:
    slots = ModelSlots(tmp_path / "models")
    ModelPuller(slots, None, None, lambda p: None).adopt(  # type: ignore[arg-type]
        demo_bundle_copy(tmp_path / "src" / "bundle-a", "bundle-a", "2026-01-01T00:00:00Z"))
    demo_bundle_copy(tmp_path / "models" / "bundles" / "bundle-b", "bundle-b", "2026-02-01T00:00:00Z")
    for sub in ("drop", "sidecars"):
        (tmp_path / sub).mkdir()
    config = tmp_path / "annotator.toml"
    config.write_text(serve_toml(tmp_path, slots.root / "current", f"127.0.0.1:{port}"))
    (tmp_path / "hook.py").write_text(HOOK)
    return config, slots


def _serve(config: Path, log: Path, point: str | None = None, sleep: float = 60.0) -> subprocess.Popen[bytes]:
    env = command_env(extra={"YOLO_OFFLINE": "1"})
    argv = [sys.executable, "-m", "service.cli", "serve", "--config", str(config)]
    if point is not None:
        env.update(HOOK_POINT=point, HOOK_MARK=str(config.parent / "mark"), HOOK_SLEEP=str(sleep))
        argv[1:3] = [str(config.parent / "hook.py")]
    with open(log, "ab") as f:
        return subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=config.parent, env=env)


def _check_each_once(root: Path, images: list[bytes]) -> dict[str, int]:
    return annotated_once(root, images, DONE)


def _annotated(root: Path) -> int:
    from service.store import Store

    store = Store(root / "store")
    try:
        counts = store.counts()
        return sum(counts[s] for s in DONE)
    finally:
        store.close()


def _reload_in_background(port: int, bundle: Path) -> tuple[threading.Thread, dict[str, Any]]:
    """A ReloadModels of ``bundle`` on a thread (started); its answer lands in the dict
    (``ok``: the reply, ``code``: the gRPC status code of a failure)."""
    from service.client import AnnotatorClient

    answer: dict[str, Any] = {}

    def reload() -> None:
        try:
            with AnnotatorClient(f"127.0.0.1:{port}", retries=0) as client:
                answer["ok"] = client.reload(str(bundle), timeout=60)
        except grpc.RpcError as exc:
            answer["code"] = exc.code()

    caller = threading.Thread(target=reload)
    caller.start()
    return caller, answer


@pytest.mark.slow
@pytest.mark.parametrize("point", ["load", "swap"])
def test_serve_killed_in_the_middle_of_a_reload(tmp_path: Path, point: str) -> None:
    """SIGKILL while the new bundle's sessions are made, or right after the swap before the
    ReloadModels answer: the caller gets UNAVAILABLE; nothing in flight is lost or annotated
    twice; the restarted daemon runs what ``current`` names (here: still bundle-a)."""
    from service.client import AnnotatorClient

    port = free_port()
    config, slots = _appliance(tmp_path, port)
    log = tmp_path / "serve.log"
    proc = _serve(config, log, point)
    try:
        wait_for(lambda: "serving on port" in log.read_text(), proc, log)
        drop = sample_images(12, "drop")
        for i, data in enumerate(drop):
            (tmp_path / "drop" / f".f{i}").write_bytes(data)
            os.replace(tmp_path / "drop" / f".f{i}", tmp_path / "drop" / f"f{i:02d}.jpg")
        caller, answer = _reload_in_background(port, slots.root / "bundles" / "bundle-b")
        wait_for(lambda: (tmp_path / "mark").exists(), proc, log)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        caller.join(60)
        assert answer == {"code": grpc.StatusCode.UNAVAILABLE}

        proc = _serve(config, log)
        wait_for(lambda: log.read_text().count("annotator serving on port") == 2, proc, log)
        late = sample_images(4, "late")
        with AnnotatorClient(f"127.0.0.1:{port}", timeout=60) as client:
            assert all(client.annotate(data).bundle_id == "bundle-a" for data in late)
            wait_for(lambda: _annotated(tmp_path) == len(drop) + len(late), proc, log)
            assert client.status().bundle_id == "bundle-a" == slots.current_path().name
        per = _check_each_once(tmp_path, drop + late)
        assert sum(per.values()) == len(drop) + len(late)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.slow
def test_serve_stopped_with_sigterm_in_the_middle_of_a_reload(tmp_path: Path) -> None:
    """SIGTERM while a reload loads its bundle: exit code 0 once the load is over, the caller
    gets UNAVAILABLE (no bundle swapped), the images taken are all annotated once."""
    from service.client import AnnotatorClient

    port = free_port()
    config, slots = _appliance(tmp_path, port)
    log = tmp_path / "serve.log"
    proc = _serve(config, log, "load", sleep=3.0)
    try:
        wait_for(lambda: "serving on port" in log.read_text(), proc, log)
        images = sample_images(8, "term")
        with AnnotatorClient(f"127.0.0.1:{port}", timeout=60) as client:
            assert all(client.annotate(data).bundle_id == "bundle-a" for data in images[:4])
        caller, answer = _reload_in_background(port, slots.root / "bundles" / "bundle-b")
        wait_for(lambda: (tmp_path / "mark").exists(), proc, log)
        for i, data in enumerate(images[4:]):
            (tmp_path / "drop" / f".f{i}").write_bytes(data)
            os.replace(tmp_path / "drop" / f".f{i}", tmp_path / "drop" / f"f{i:02d}.jpg")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        caller.join(60)
        assert answer == {"code": grpc.StatusCode.UNAVAILABLE}
        assert "reloaded models" not in log.read_text()

        proc = _serve(config, log)
        wait_for(lambda: _annotated(tmp_path) == len(images), proc, log)
        assert _check_each_once(tmp_path, images) == {"bundle-a": len(images)}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
