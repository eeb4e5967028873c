"""Two ``annotator serve`` processes on one store, as on a lab box: the systemd unit's daemon and a
second one started by hand on the same config (another port: ``127.0.0.1:0``).

One daemon per store (``<store root>/serve.lock``, an ``flock``): the judge's near-duplicate
memory, review budgets and review share live in the daemon, so two daemons sent a capture
sequence to review once each. The second is refused at once (exit code 2, one line naming the
first one's pid) before it loads a bundle or touches the store; the first goes on; the lock dies
with its holder (kill -9), and a daemon started then takes over the killed one's work."""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import cv2
import pytest

from procs import command_env, serve_toml, start_serve, wait_for
from service.store import Store

pytestmark = pytest.mark.slow
DONE = ("auto_accepted", "review_pending")


def _config(tmp_path: Path, bundle: Path) -> Path:
    config = tmp_path / "annotator.toml"
    config.write_text(serve_toml(tmp_path, bundle, sidecars=False))
    return config


def _drop(drop: Path, photos: list[Path], start: int, n: int) -> None:
    for i in range(start, start + n):
        ok, buf = cv2.imencode(".jpg", cv2.imread(str(photos[i % len(photos)])), [cv2.IMWRITE_JPEG_QUALITY, 95 - i])
        assert ok
        (drop / f".part{i}").write_bytes(buf.tobytes())
        os.replace(drop / f".part{i}", drop / f"frame {i:02d}.jpg")


def _done(root: Path) -> int:
    store = Store(root)
    try:
        counts = store.counts()
        return sum(counts.get(s, 0) for s in DONE)
    finally:
        store.close()


def test_a_second_serve_on_the_same_store_is_refused_at_once_naming_the_first(
        tmp_path: Path, pose_bundle: Any, coco_people_photos: list[Path]) -> None:
    (tmp_path / "drop").mkdir()
    config = _config(tmp_path, pose_bundle.path)
    log1, log2, log3 = tmp_path / "serve1.log", tmp_path / "serve2.log", tmp_path / "serve3.log"
    first = start_serve(config, log1, cwd=tmp_path, env=command_env())
    procs = [first]
    try:
        wait_for(lambda: "serving on port" in log1.read_text(), first, log1)
        second = start_serve(config, log2, cwd=tmp_path, env=command_env())  # by hand, on another port
        procs.append(second)
        assert second.wait(30) == 2, log2.read_text()[-3000:]
        said = log2.read_text()
        assert f"another annotator serve (pid {first.pid})" in said and "Traceback" not in said, said
        assert "serving on port" not in said

        _drop(tmp_path / "drop", coco_people_photos, 0, 6)  # the first one works on, alone
        wait_for(lambda: _done(tmp_path / "store") == 6, first, log1)

        first.send_signal(signal.SIGKILL)  # the lock dies with it: the next daemon starts
        first.wait(10)
        _drop(tmp_path / "drop", coco_people_photos, 6, 4)
        third = start_serve(config, log3, cwd=tmp_path, env=command_env())
        procs.append(third)
        wait_for(lambda: _done(tmp_path / "store") == 10, third, log3)
        third.send_signal(signal.SIGTERM)
        assert third.wait(30) == 0, log3.read_text()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    store = Store(tmp_path / "store")
    try:
        rows, _ = store.list(limit=100)
        assert len(rows) == 10
        for row in rows:  # annotated exactly once
            assert [h[1] for h in store.history(row.image_id)].count("annotated") == 1, row.image_id
    finally:
        store.close()


def test_a_store_root_that_does_not_exist_yet_is_made_and_served(tmp_path: Path, pose_bundle: Any) -> None:
    """The lock file is made in a store root that the daemon creates at its first start."""
    config = _config(tmp_path, pose_bundle.path)
    log = tmp_path / "serve.log"
    proc = start_serve(config, log, cwd=tmp_path, env=command_env())
    try:
        wait_for(lambda: "serving on port" in log.read_text(), proc, log)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert (tmp_path / "store" / "store.sqlite3").is_file()
