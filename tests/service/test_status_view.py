"""``annotator status`` and ``annotator healthcheck`` against a real daemon and gRPC server."""
from __future__ import annotations

import argparse
from typing import Any

import pytest

from protos.annotator.v1 import annotator_pb2 as pb
from service.ops_cli import register
from service.status_view import format_duration, format_status, health_check


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return int(args.func(args))


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (42.9, "42s"), (60, "1m"), (3 * 3600 + 5 * 60, "3h 5m"),
                                           (86400 + 120, "1d 0h 2m"), (-5, "0s")])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_format_status_message() -> None:
    status = pb.Status(bundle_id="b-1", bundle_path="/var/lib/annotator/bundles/current",
                       thresholds=pb.Thresholds(det_conf=0.25, person_conf=0.3, nms_iou=0.45, main=[0.6] * 17,
                                                visible=[0.55, 0.7], score_threshold=0.5, audit_fraction=0.02),
                       queue_depths={"received": 3, "failed": 1, "annotated": 0, "novel_state": 2},
                       counters={"annotated": 10}, uptime_seconds=3700, paused_reason="disk below floor",
                       version="0.1.0", providers=["CUDAExecutionProvider", "CPUExecutionProvider"], run_batch=8)
    text = format_status(status, "127.0.0.1:50051")
    assert "engine      CUDA, CPU, 8 image(s) per run" in text
    assert text.splitlines()[0] == "annotator 0.1.0 at 127.0.0.1:50051, up 1h 1m"
    assert "main 0.60, visible 0.55-0.70 (2 points)" in text
    assert "audit 2.0 %" in text and "PAUSED: disk below floor" in text
    states = [line.split()[0] for line in text.splitlines() if line.split() and line.split()[-1].isdigit()]
    assert states[:5] == ["received", "annotated", "failed", "novel_state", "total"]
    assert "counters    annotated 10" in text
    assert format_status(pb.Status()).startswith("annotator ?, up 0s")  # an empty message still formats


def test_status_and_healthcheck_against_a_server(served: tuple[Any, int], small_jpeg: Any,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    daemon, port = served
    daemon.annotate_now(small_jpeg(1), "test")
    target = f"127.0.0.1:{port}"
    assert run(["status", "--server", target]) == 0
    out = capsys.readouterr().out
    assert daemon.bundle.id in out and "ingest      accepting" in out
    assert "total" in out and "annotated 1" in out
    assert health_check(target) == (True, f"{target}: SERVING")
    assert run(["healthcheck", "--server", target]) == 0


def test_unreachable_daemon(capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: refused
        assert run(["status", "--server", target, "--timeout", "2"]) == 1
        assert "UNAVAILABLE" in capsys.readouterr().err
        assert run(["healthcheck", "--server", target, "--timeout", "2"]) == 1
        assert "UNAVAILABLE" in capsys.readouterr().err


def test_a_drop_folder_found_by_walks_only_is_a_notice_in_status(make_config: Any, tmp_path: Any,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The inotify watch lost (no watch to spare): the daemon works on, by the full walks, and
    ``annotator status`` says it with what to do (it was only in the log, once)."""
    from service.daemon import Daemon
    from service.server import create_server

    (tmp_path / "drop").mkdir()  # not made at this start: no notice of that
    daemon = Daemon(make_config(drop__folder=str(tmp_path / "drop")))
    daemon.start()
    server, port = create_server(daemon.config, daemon)
    try:
        assert daemon.drop is not None
        assert run(["status", "--server", f"127.0.0.1:{port}"]) == 0
        assert "notice" not in capsys.readouterr().out
        daemon.drop.watch_lost = "cannot watch the drop folder (No space left on device): raise the limit"
        assert run(["status", "--server", f"127.0.0.1:{port}"]) == 0
        out = capsys.readouterr().out
        assert "notice      cannot watch the drop folder (No space left on device): raise the limit" in out
    finally:
        server.stop(grace=1.0).wait(5)
        daemon.close()
