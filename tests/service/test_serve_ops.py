"""``annotator serve`` as a subprocess under a fake systemd: a real NOTIFY_SOCKET (a datagram
socket) and WATCHDOG_USEC, and its Prometheus endpoint scraped after annotating an image."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest

from service.client import AnnotatorClient


def _receive(sock: socket.socket, got: list[str], until: Callable[[], bool], proc: subprocess.Popen[bytes],
             log: Path, seconds: float = 90.0) -> None:
    """Collect notify datagrams into ``got`` until ``until()`` holds (or fail with the log)."""
    deadline = time.monotonic() + seconds
    while not until():
        if time.monotonic() > deadline or (proc.poll() is not None and not until()):
            try:
                got.append(sock.recv(4096).decode())  # a last message may still be queued
            except OSError:
                pass
            if until():
                return
            raise AssertionError(f"notify messages {got}; annotator serve rc={proc.poll()}:\n{log.read_text()[-3000:]}")
        try:
            got.append(sock.recv(4096).decode())
        except socket.timeout:
            continue


def test_serve_notifies_systemd_and_serves_metrics(tmp_path: Path, pose_bundle: Any,
                                                   small_jpeg: Callable[[int], bytes]) -> None:
    config = tmp_path / "annotator.toml"
    config.write_text(f"""
[server]
listen = "127.0.0.1:0"
[store]
root = "{tmp_path / 'store'}"
min_free_mb = 0
[engine]
bundle = "{pose_bundle.path}"
workers = 1
threads = 1
[metrics]
listen = "127.0.0.1:0"
[sync]
appliance_id = "passed-through"
""")
    notify_path = tmp_path / "notify.sock"
    assert len(str(notify_path)) < 100, "AF_UNIX paths are limited to 107 bytes"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.settimeout(0.5)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANNOTATOR_")}
    env.update(NOTIFY_SOCKET=str(notify_path), WATCHDOG_USEC="1000000")  # a ping every 0.5 s
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    got: list[str] = []
    try:
        _receive(sock, got, lambda: any(m.startswith("STATUS=") for m in got)
                 and sum(m == "WATCHDOG=1" for m in got) >= 2, proc, log)
        ready = [m for m in got if m.startswith("READY=1")]
        assert ready and f"MAINPID={proc.pid}" in ready[0]
        status = next(m for m in got if m.startswith("STATUS="))
        assert got.index(ready[0]) < got.index(status)  # READY once listening, then the status line
        found = re.search(r"port (\d+) with bundle (\S+), metrics on port (\d+)", status)
        assert found and found.group(2) == pose_bundle.id, status
        grpc_port, metrics_port = int(found.group(1)), int(found.group(3))

        with AnnotatorClient(f"127.0.0.1:{grpc_port}", timeout=60) as client:
            client.annotate(small_jpeg(21))
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        count = re.search(r'^annotator_inference_seconds_count\{role="pose_main"\} (\S+)$', text, re.M)
        assert count and float(count.group(1)) >= 1, text  # the image (the start-up probe is not counted)
        assert re.search(r'^annotator_inference_seconds_bucket\{le="0\.5",role="pose_main"\} ', text, re.M)
        assert f'annotator_bundle_info{{bundle_id="{pose_bundle.id}",providers="CPUExecutionProvider"}} 1.0' in text
        assert re.search(r'^annotator_images\{state="received"\} 0\.0$', text, re.M)
        assert re.search(r'^annotator_queue_depth\{queue="annotate"\} 0\.0$', text, re.M)

        proc.send_signal(signal.SIGTERM)
        _receive(sock, got, lambda: "STOPPING=1" in got, proc, log, seconds=30)
        assert proc.wait(30) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        sock.close()


def test_daemon_health_and_metrics_in_process(make_config: Callable[..., Any],
                                              small_jpeg: Callable[[int], bytes]) -> None:
    """Refusals at intake and streams are counted; ``healthy()`` holds while the daemon runs."""
    import grpc

    from protos.annotator.v1 import annotator_pb2 as pb
    from service.daemon import Daemon
    from service.metrics import MetricsRecorder
    from service.server import create_server

    metrics = MetricsRecorder()
    daemon = Daemon(make_config(), metrics=metrics)
    daemon.start()
    server, port = create_server(daemon.config, daemon)
    value = metrics.registry.get_sample_value
    try:
        assert daemon.healthy()
        with AnnotatorClient(f"127.0.0.1:{port}", timeout=30, retries=0) as client:
            for _ in range(2):
                try:
                    client.annotate(b"not an image")
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
            answers = list(client.stub.AnnotateStream(iter([pb.AnnotateRequest(image=small_jpeg(31))]), timeout=30))
            assert answers[0].WhichOneof("result") == "annotation"
        assert value("annotator_intake_rejected_total", {"reason": "invalid"}) == 2
        assert value("annotator_streams_total") == 1 and value("annotator_streams_active") == 0
        assert (value("annotator_inference_seconds_count", {"role": "pose_main"}) or 0) >= 1  # the streamed image (the start-up probe is not counted)
        assert value("annotator_images", {"state": "failed"}) == 0  # read from the store at collect
    finally:
        server.stop(grace=0.5).wait(5)
        daemon.close()
    assert not daemon.healthy()


def test_grpc_health_follows_the_daemons_own(make_config: Callable[..., Any], monkeypatch: Any) -> None:
    """The container's HEALTHCHECK asks gRPC health: it must see what the systemd watchdog sees
    (a dead worker, a wedged batch), not only that the port answers."""
    import threading

    from service.daemon import Daemon
    from service.server import SERVICE_NAME, serve
    from service.status_view import health_check

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    well = threading.Event()
    well.set()
    monkeypatch.setattr(Daemon, "healthy", lambda self: well.is_set())
    ready, stop = threading.Event(), threading.Event()
    thread = threading.Thread(target=serve, args=(make_config(server__listen=f"127.0.0.1:{port}"), ready, stop))
    thread.start()
    try:
        assert ready.wait(60), "serve never became ready"
        target = f"127.0.0.1:{port}"

        def serving_within(want: bool) -> bool:
            deadline = time.monotonic() + 15
            while health_check(target)[0] != want:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.1)
            return True

        assert serving_within(True)
        well.clear()
        assert serving_within(False)
        assert health_check(target, SERVICE_NAME)[0] is False
        well.set()
        assert serving_within(True) and health_check(target, SERVICE_NAME)[0] is True
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()


def test_serve_on_a_busy_port_starts_no_workers_or_drop_folder(make_config: Callable[..., Any], monkeypatch: Any,
                                                               tmp_path: Path) -> None:
    """A second ``serve`` of the same config (the port taken) must fail before its drop folder
    and workers touch the folders and the store the first daemon is using."""
    from service.daemon import Daemon
    from service.server import serve

    started: list[Daemon] = []
    real_start = Daemon.start
    monkeypatch.setattr(Daemon, "start", lambda self: (started.append(self), real_start(self))[1])
    drop = tmp_path / "drop"
    drop.mkdir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = make_config(server__listen=f"127.0.0.1:{port}", drop__folder=str(drop))
        with pytest.raises(RuntimeError, match="Failed to bind"):  # grpcio's words; cmd_serve rewords them
            serve(cfg)
    assert started == []
