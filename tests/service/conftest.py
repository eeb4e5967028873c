"""Fixtures for the daemon tests: a config on tmp_path, distinct real photos, a running server."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import cv2
import numpy as np
import pytest

from service.config import Config, load_config


@pytest.fixture(scope="session")
def photo_variants(coco_people_photos: list[Path]) -> Callable[[int], list[bytes]]:
    """``make(n)``: n distinct JPEG byte strings made from the real COCO photos (re-encoded)."""
    originals = [cv2.imread(str(p)) for p in coco_people_photos]

    def make(n: int, salt: int = 0) -> list[bytes]:
        out = []
        for i in range(n):
            img = originals[i % len(originals)]
            quality = 95 - (i // len(originals)) - 7 * salt
            ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
            assert ok
            out.append(buf.tobytes())
        assert len(set(out)) == n
        return out

    return make


def _jpeg(seed: int, size: tuple[int, int] = (40, 60)) -> bytes:
    ok, buf = cv2.imencode(".jpg", np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8))
    assert ok
    return buf.tobytes()


@pytest.fixture(scope="session")
def small_jpeg() -> Callable[[int], bytes]:
    """``make(seed)``: a small random-noise JPEG (no people), distinct per seed."""
    return _jpeg


@pytest.fixture
def make_config(tmp_path: Path, pose_bundle: Any) -> Callable[..., Config]:
    """``make(**dotted_overrides)``: a daemon Config with everything under tmp_path."""

    def make(**overrides: Any) -> Config:
        values: dict[str, Any] = {
            "server.listen": "127.0.0.1:0", "server.max_message_bytes": 4_000_000,
            "store.root": str(tmp_path / "store"), "store.lease_seconds": 5.0, "store.min_free_mb": 0,
            "drop.max_pixels": 4_000_000, "drop.max_bytes": 3_000_000,
            "engine.bundle": str(pose_bundle.path), "engine.batch_size": 4,
            "outputs.sidecar_dir": str(tmp_path / "sidecars"),
        }
        values.update({k.replace("__", "."): v for k, v in overrides.items()})
        return load_config(None, env={}, overrides=values)

    return make


@pytest.fixture
def served(make_config: Callable[..., Config]) -> Iterator[tuple[Any, int]]:
    """A started Daemon and a real gRPC server on 127.0.0.1 (free port): yields (daemon, port)."""
    from service.daemon import Daemon
    from service.server import create_server

    daemon = Daemon(make_config())
    daemon.start()
    server, port = create_server(daemon.config, daemon)
    try:
        yield daemon, port
    finally:
        server.stop(grace=1.0).wait(5)
        daemon.close()
