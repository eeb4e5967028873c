"""The drop folder's backlog, what an operator alerts on: files seen in the folder and not taken
yet (being written, settling, queued, held by a pause, retried) and how long the oldest has
waited, on /metrics of a real daemon and in ``annotator status``. HEAD had no such series: a
capture tool writing faster than the daemon takes, or files stuck in the folder, showed nowhere
(``queue_depth{queue="annotate"}`` counts only what is in the store already)."""
from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import cv2
import numpy as np
import pytest
from prometheus_client import generate_latest

import service.dropfolder as dropfolder
from protos.annotator.v1 import annotator_pb2 as pb
from service.client import AnnotatorClient
from service.dropfolder import DropFolder
from service.metrics import MetricsRecorder
from service.status_view import format_status

from test_operator_metrics import _free_port, _wait, scrape, serving

BACKLOG = ("annotator_drop_backlog_files", ())
OLDEST = ("annotator_drop_backlog_oldest_age_seconds", ())


def _jpeg(seed: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", np.random.default_rng(seed).integers(0, 255, (24, 32, 3), dtype=np.uint8))
    assert ok
    return buf.tobytes()


def test_files_waiting_in_the_drop_folder_show_on_metrics_and_status(
        tmp_path: Path, make_config: Callable[..., Any], photo_variants: Callable[[int], list[bytes]]) -> None:
    """Three frames still settling (``drop.stable_seconds``) wait: the count and the oldest's
    wait on /metrics and in the status; a temporary name never counts; once taken, both are 0."""
    grpc_port, metrics_port = _free_port(), _free_port()
    drop = tmp_path / "drop"
    config = make_config(server__listen=f"127.0.0.1:{grpc_port}", metrics__listen=f"127.0.0.1:{metrics_port}",
                         drop__folder=str(drop), drop__stable_seconds=3600.0, drop__poll_interval=0.1,
                         engine__workers=1, engine__threads=1)
    with serving(config):
        first = scrape(metrics_port)
        assert first[BACKLOG] == 0 and first[OLDEST] == 0
        (drop / "cam-1").mkdir()
        frames = [drop / "cam-1" / f"{i}.jpg" for i in range(3)]
        for path, data in zip(frames, photo_variants(3)):
            path.write_bytes(data)
        (drop / "cam-1" / "3.jpg.part").write_bytes(b"a capture tool still writing")
        _wait(lambda: scrape(metrics_port)[BACKLOG] == 3 and scrape(metrics_port)[OLDEST] >= 1,
              "three files waiting, the oldest for a second", 60)
        with AnnotatorClient(f"127.0.0.1:{grpc_port}", timeout=30, retries=0) as client:
            status = client.status()
            assert status.counters["drop_backlog"] == 3 and status.counters["drop_backlog_oldest_s"] >= 1
            assert "drop folder 3 file(s) waiting to be taken, the oldest seen " in format_status(status)
            past = time.time() - 7200  # as a copy that kept the camera's mtime: settled, taken now
            for path in frames:
                os.utime(path, (past, past))
            _wait(lambda: client.status().counters["drop_taken"] == 3, "the three files to be taken", 60)
            after = scrape(metrics_port)
            assert after[BACKLOG] == 0 and after[OLDEST] == 0
            assert "drop folder no file waiting" in format_status(client.status())


def test_the_backlog_follows_a_pause_takes_and_files_gone_without_an_event(tmp_path: Path) -> None:
    """While the store refuses ingest the files announced pile up (and age); once it accepts they
    are taken and leave the backlog. A file waiting for a retry and then removed with no event
    (an unwatched folder, a share) leaves it at the next full walk, not never."""
    now = [1000.0]
    paused: list[str | None] = ["the store's disk is below its floor"]
    got: list[str] = []
    drop = DropFolder(tmp_path / "drop", lambda data, source, meta, decoded: got.append(source),
                      stable_seconds=0.0, clock=lambda: now[0], paused=lambda: paused[0])
    assert drop.backlog() == (0, 0.0)
    for i in range(5):
        (drop.root / f"{i}.jpg").write_bytes(_jpeg(i))
        drop.notify(drop.root / f"{i}.jpg")  # what watchdog does
    drop.notify(drop.root / ".5.jpg")  # a writer's temporary name: never taken, never waiting
    assert drop.scan_once() == 0 and drop.backlog() == (5, 0.0)
    now[0] += 30.0
    (drop.root / "cam").mkdir()
    (drop.root / "cam" / "late.jpg").write_bytes(_jpeg(9))
    drop.notify(drop.root / "cam" / "late.jpg")
    assert drop.scan_once() == 0 and drop.backlog() == (6, 30.0)
    paused[0] = None
    assert drop.scan_once() == 6 and len(got) == 6
    assert drop.backlog() == (0, 0.0)

    def unsure(image_id: str) -> bool:
        raise OSError("database is locked")  # the store cannot say: the file is retried later

    retried = DropFolder(tmp_path / "drop2", lambda *a: None, stable_seconds=0.0, clock=lambda: now[0], known=unsure)
    (retried.root / "a.jpg").write_bytes(_jpeg(1))
    assert retried.scan_once() == 0 and retried.backlog() == (1, 0.0)
    (retried.root / "a.jpg").unlink()  # no event told
    retried.scan_once(full=True)
    assert retried.backlog() == (0, 0.0)


def test_a_scrape_reads_the_backlog_without_walking_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The folder may hold 100,000 files (keep mode, a backlog after an outage): a scrape reads
    what the watcher knows, it never lists or stats the folder (no walk per scrape)."""
    drop = DropFolder(tmp_path / "drop", lambda *a: None, stable_seconds=3600.0)
    for i in range(300):
        (drop.root / f"{i:04d}.jpg").write_bytes(b"x")
    drop.scan_once()
    metrics = MetricsRecorder(process="daemon")
    metrics.watch_daemon(SimpleNamespace(drop=drop, bundle=None))
    looked: list[str] = []
    for name in ("walk", "scandir", "listdir", "lstat", "stat"):
        real = getattr(dropfolder.os, name)
        monkeypatch.setattr(dropfolder.os, name, lambda *a, _real=real, _name=name, **k: (looked.append(_name),
                                                                                          _real(*a, **k))[1])
    text = generate_latest(metrics.registry).decode()
    monkeypatch.undo()
    assert "annotator_drop_backlog_files 300.0" in text
    assert looked == []


def test_status_shows_the_backlog_on_a_line_of_its_own() -> None:
    """A gauge, not a counter: not among ``this start``'s counters."""
    text = format_status(pb.Status(counters={"annotated": 1, "drop_taken": 4, "drop_quarantined": 0,
                                             "drop_backlog": 120, "drop_backlog_oldest_s": 3720}))
    assert "drop folder 120 file(s) waiting to be taken, the oldest seen 1h 2m ago" in text
    assert "drop_backlog" not in text
