"""Hot swap at the edges of the daemon's life: a reload asked for while the daemon shuts down."""
from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import pytest

from service.cli_daemon import DEMO_BUNDLE
from procs import demo_bundle_copy
from service.config import load_config
from service.errors import ShuttingDown


def _bundles(root: Path) -> Path:
    for bid in ("bundle-a", "bundle-b"):
        demo_bundle_copy(root / "models" / bid, bid)
    return root / "models"


def test_reload_during_shutdown_is_unavailable_and_swaps_nothing(tmp_path: Path) -> None:
    from service.client import AnnotatorClient
    from service.daemon import Daemon
    from service.server import create_server

    models = _bundles(tmp_path)
    config = load_config(None, env={}, overrides={
        "server.listen": "127.0.0.1:0", "store.root": str(tmp_path / "store"), "store.min_free_mb": 0,
        "engine.bundle": str(models / "bundle-a"), "judge.review_share": 0.1})
    daemon = Daemon(config, workers=1)
    daemon.start()
    server, port = create_server(daemon.config, daemon)
    try:
        daemon.stop_intake()  # serve's first shutdown step (SIGTERM), before the server stops
        with AnnotatorClient(f"127.0.0.1:{port}", retries=0) as client:
            with pytest.raises(grpc.RpcError) as err:
                client.reload("bundle-b", timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        assert "shutting down" in err.value.details()
        assert daemon.bundle.id == "bundle-a"
    finally:
        server.stop(grace=1.0).wait(5)
        daemon.close()
    # after close (a reload whose RPC outlived the server's grace): ShuttingDown, not the closed store's INTERNAL
    with pytest.raises(ShuttingDown):
        daemon.reload(str(models / "bundle-b"))
    assert daemon.bundle.id == "bundle-a"


def test_a_swap_gives_the_old_sessions_pages_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """glibc kept the freed pages of the old bundle's sessions: RSS grew about 5 MB a swap
    (16 reloads of the demo bundle through the daemon: 252 -> 337 MB; trimmed 174 -> 188 MB).
    A reload trims the heap at once and again once the batches in flight are done."""
    import service.daemon as daemon_mod

    trims: list[str] = []
    monkeypatch.setattr(daemon_mod, "TRIM_AFTER_RELOAD_SECONDS", 0.2)
    real = daemon_mod.trim_heap
    monkeypatch.setattr(daemon_mod, "trim_heap", lambda: trims.append("trim") or real())
    shutil.copytree(DEMO_BUNDLE, tmp_path / "a")
    d = daemon_mod.Daemon(load_config(None, env={}, overrides={
        "store.root": str(tmp_path / "store"), "store.min_free_mb": 0, "engine.bundle": str(tmp_path / "a")}))
    try:
        d.reload(str(tmp_path / "a"))
        assert trims == ["trim"]
        import time

        deadline = time.monotonic() + 10
        while len(trims) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert trims == ["trim", "trim"]
    finally:
        d.close()


@pytest.mark.parametrize("mode,run_batch,want", [("square", 0, [(64, 64)]),
                                                  ("square", 3, [(64, 64)] * 3),
                                                  ("rect", 2, [(64, 64), (64, 64), (48, 64)])])
def test_a_bundle_is_checked_on_the_shapes_the_workers_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           mode: str, run_batch: int, want: list) -> None:
    """The load check ran one 64x64 image: a model that fails only on a whole batch (a GPU box
    runs batches) or on a rectangular input passed it, then failed every batch, and every image
    was quarantined after max_attempts while the old bundle was gone."""
    import service.daemon as daemon_mod
    from service.engine import Engine

    seen: list[list[tuple[int, int]]] = []
    predict = Engine.predict_arrays

    def spy(self: Engine, images: list) -> list:
        seen.append([im.shape[:2] for im in images])
        if len(images) > 1:
            raise RuntimeError("this model was exported for batch 1")
        return predict(self, images)

    monkeypatch.setattr(Engine, "predict_arrays", spy)
    config = load_config(None, env={}, overrides={
        "store.root": str(tmp_path / "store"), "store.min_free_mb": 0, "engine.bundle": str(DEMO_BUNDLE),
        "engine.letterbox": mode, "engine.run_batch": run_batch})
    if len(want) > 1:
        with pytest.raises(daemon_mod.BundleError, match="batch of"):
            daemon_mod.Daemon(config)
    else:
        daemon_mod.Daemon(config).close()
    assert seen[0] == want
