"""End to end: ``annotator serve`` as a subprocess, SIGKILLed mid-batch, restarted; nothing lost or doubled."""
from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any, Callable

import cv2
import pytest

from procs import start_serve, wait_for
from service.client import AnnotatorClient
from service.store import Store

pytestmark = pytest.mark.slow
DONE = ("auto_accepted", "review_pending")


def _images(photos: list[Path], n: int) -> list[bytes]:
    originals = [cv2.imread(str(p)) for p in photos]
    out = []
    for i in range(n):
        img = originals[i % len(originals)]
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95 - i // len(originals)])
        assert ok
        out.append(buf.tobytes())
    assert len(set(out)) == n
    return out


def _start(config: Path, log: Path) -> subprocess.Popen[bytes]:
    return start_serve(config, log, cwd=config.parent)


def _wait(cond: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path, seconds: float = 90.0) -> None:
    wait_for(cond, proc, log, seconds, poll=0.02)


def _annotated(store: Store) -> int:
    counts = store.counts()
    return sum(counts[s] for s in DONE)


def _leased(store: Store) -> int:
    return sum(r.lease_owner is not None for r in store.list(state="received", limit=1000)[0])


def test_kill_mid_batch_and_restart_annotates_everything_once(tmp_path: Path, pose_bundle: Any,
                                                              coco_people_photos: list[Path]) -> None:
    drop, sidecars, store_root = tmp_path / "drop", tmp_path / "sidecars", tmp_path / "store"
    drop.mkdir()
    config = tmp_path / "annotator.toml"
    config.write_text(f"""
[server]
listen = "127.0.0.1:0"
[store]
root = "{store_root}"
lease_seconds = 2.0
min_free_mb = 0
[drop]
folder = "{drop}"
stable_seconds = 0.0
poll_interval = 0.1
[engine]
bundle = "{pose_bundle.path}"
batch_size = 2
threads = 1
[outputs]
sidecar_dir = "{sidecars}"
""")
    images = _images(coco_people_photos, 24)
    first, while_down = images[:20], images[20:]
    log = tmp_path / "serve.log"
    proc = _start(config, log)
    _wait(lambda: "serving on port" in log.read_text(), proc, log)
    store = Store(store_root)
    try:
        for i, data in enumerate(first):
            (drop / f".part{i}").write_bytes(data)
            os.replace(drop / f".part{i}", drop / f"frame {i:02d}.jpg")
        # Kill while a worker holds leases (a batch in flight): those images must come back.
        _wait(lambda: _annotated(store) >= 3 and _leased(store) > 0, proc, log)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        before_restart = _annotated(store)
        assert before_restart < len(first), "the daemon finished before it could be killed mid-batch"
        for i, data in enumerate(while_down):  # arrive while the daemon is down: the start-up scan takes them
            (drop / f"late {i}.jpg").write_bytes(data)

        proc = _start(config, log)
        _wait(lambda: _annotated(store) == len(images), proc, log, seconds=120)
        port = int(re.findall(r"serving on port (\d+)", log.read_text())[-1])
        with AnnotatorClient(f"127.0.0.1:{port}", timeout=10) as client:
            status = client.status()
        assert sum(status.queue_depths[s] for s in DONE) == len(images)

        rows, _ = store.list(limit=1000)
        assert len(rows) == len(images) and all(r.state in DONE for r in rows)
        for row in rows:  # annotated exactly once: one received -> annotated transition per image
            assert [h[1] for h in store.history(row.image_id)].count("annotated") == 1, row.image_id
        assert sorted(p.stem for p in sidecars.glob("*.json")) == sorted(r.image_id for r in rows)
        assert len(list((drop / "processed").glob("*.jpg"))) == len(images)
        assert not list(drop.glob("*.jpg"))

        proc.send_signal(signal.SIGTERM)  # clean shutdown: exit code 0, leases released
        assert proc.wait(30) == 0
        assert "daemon stopped" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        store.close()
