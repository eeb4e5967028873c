"""Hot swap at the edges of the daemon's life: a reload asked for while the daemon shuts down."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import grpc
import pytest

from service.bundle import load_bundle, write_bundle
from service.cli_daemon import DEMO_BUNDLE
from service.config import load_config
from service.errors import ShuttingDown


def _bundles(root: Path) -> Path:
    base = load_bundle(DEMO_BUNDLE)
    for bid in ("bundle-a", "bundle-b"):
        folder = root / "models" / bid
        shutil.copytree(DEMO_BUNDLE, folder)
        (folder / "bundle.sig").unlink(missing_ok=True)
        write_bundle(dataclasses.replace(base, path=folder, id=bid))
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
