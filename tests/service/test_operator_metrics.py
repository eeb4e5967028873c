"""What an operator watching the appliance sees: /metrics, ``annotator status`` (GetStatus) and
the access log, checked against the store on a real daemon (``serve`` with a drop folder, gRPC
unary and stream calls, bad images, a reload, a restart), plus the recorder's own contracts."""
from __future__ import annotations

import contextlib
import logging
import re
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from protos.annotator.v1 import annotator_pb2 as pb
from service.client import AnnotatorClient, ImageMeta, annotate_request
from service.metrics import MetricsRecorder, start_metrics_server
from service.status_view import format_status
from service.store import STATES, Store

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """``{(sample name, sorted labels): value}`` from GET /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def serving(config: Any) -> Iterator[None]:
    """``service.server.serve(config)`` on a thread until the block ends (as SIGTERM would)."""
    from service.server import serve

    ready, stop = threading.Event(), threading.Event()
    failed: list[BaseException] = []

    def run() -> None:
        try:
            serve(config, ready, stop)
        except BaseException as exc:  # reported below instead of a silent thread
            failed.append(exc)
            ready.set()

    thread = threading.Thread(target=run, name="serve", daemon=True)
    thread.start()
    assert ready.wait(180) and not failed, failed
    try:
        yield
    finally:
        stop.set()
        thread.join(60)
        assert not thread.is_alive() and not failed, failed


def _wait(condition: Callable[[], bool], what: str, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_metrics_agree_with_the_store_and_status_across_a_reload_and_a_restart(
        tmp_path: Path, make_config: Callable[..., Any], photo_variants: Callable[[int], list[bytes]]) -> None:
    """Both intake paths, bad images, a reload and a restart: every count on /metrics is the
    store's and the status's; counters never go back except the process's own across a restart;
    no label names an image, a path or a camera. HEAD: no ``annotator_annotated_total`` (and no
    failed, reloads, queue age, free space or drop folder series) to compare, and the daemon's
    endpoint showed the sync agent's ``annotator_uploads_total`` at 0 for ever."""
    grpc_port, metrics_port = _free_port(), _free_port()
    drop = tmp_path / "drop"
    config = make_config(server__listen=f"127.0.0.1:{grpc_port}", metrics__listen=f"127.0.0.1:{metrics_port}",
                         drop__folder=str(drop), drop__stable_seconds=0.1, drop__poll_interval=0.1,
                         engine__workers=1, engine__threads=1)
    photos = photo_variants(5)
    target = f"127.0.0.1:{grpc_port}"
    with serving(config):
        (drop / "cam-7").mkdir(parents=True)
        (drop / "cam-7" / "a.jpg").write_bytes(photos[0])
        (drop / "b.jpg").write_bytes(photos[1])
        (drop / "broken.jpg").write_bytes(b"not an image at all")
        with AnnotatorClient(target, timeout=120, retries=0) as client:
            client.annotate(photos[2], camera_id="cam-1")
            for bad in (b"garbage", b""):
                with pytest.raises(grpc.RpcError) as caught:
                    client.annotate(bad, camera_id="cam-1")
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            answers = list(client.annotate_stream([annotate_request(photos[3], ImageMeta(camera_id="cam-2")),
                                                   annotate_request(photos[4], ImageMeta(camera_id="cam-3")),
                                                   annotate_request(b"junk")]))
            assert sorted(a.WhichOneof("result") for a in answers) == ["annotation", "annotation", "error"]

            def settled() -> bool:
                st = client.status()
                return (st.counters["drop_taken"] == 2 and st.counters["drop_quarantined"] == 1
                        and st.queue_depths["received"] == 0)
            _wait(settled, "the drop folder's files to be annotated")
            status = client.status()
            got = scrape(metrics_port)

            store_counts = dict(status.queue_depths)
            assert set(store_counts) == set(STATES)
            for state, n in store_counts.items():
                assert got[("annotator_images", (("state", state),))] == n, state
            assert got[("annotator_annotated_total", ())] == status.counters["annotated"] == 5
            assert got[("annotator_failed_total", ())] == status.counters["failed"] == 0
            assert got[("annotator_reloads_total", ())] == status.counters["reloads"] == 0
            assert got[("annotator_drop_taken_total", ())] == status.counters["drop_taken"] == 2
            assert got[("annotator_intake_rejected_total", (("reason", "quarantined"),))] == 1
            assert got[("annotator_intake_rejected_total", (("reason", "invalid"),))] == 3  # 2 unary, 1 streamed
            assert got[("annotator_intake_rejected_total", (("reason", "too_large"),))] == 0  # present at 0
            assert got[("annotator_grpc_calls_total", (("code", "OK"), ("method", "Annotate")))] == 1
            assert got[("annotator_grpc_calls_total", (("code", "INVALID_ARGUMENT"), ("method", "Annotate")))] == 2
            assert got[("annotator_grpc_calls_total", (("code", "OK"), ("method", "AnnotateStream")))] == 1
            assert got[("annotator_drop_watch_lost", ())] == 0
            assert got[("annotator_paused", ())] == 0
            assert got[("annotator_store_free_bytes", ())] > got[("annotator_store_min_free_bytes", ())] == 0
            assert got[("annotator_queue_oldest_age_seconds", (("queue", "annotate"),))] == 0  # empty
            waiting = store_counts["review_pending"]
            assert (got[("annotator_queue_oldest_age_seconds", (("queue", "upload"),))] > 0) == (waiting > 0)
            assert got[("annotator_bundle_created_timestamp_seconds", ())] > 0
            # arrival to annotation, both intakes (status's latency covers unary calls only)
            assert got[("annotator_annotate_seconds_count", (("intake", "drop"),))] == 2
            assert got[("annotator_annotate_seconds_count", (("intake", "grpc"),))] == 3
            names = {name for name, _ in got}
            assert not {n for n in names if re.match(r"annotator_(uploads|upload_retries|reviews_)", n)}, names
            values = {v for _, labels in got for _, v in labels}
            assert not [v for v in values if "cam-" in v or ".jpg" in v or re.search(r"[0-9a-f]{40}", v)], values
            text = format_status(status)
            assert "annotated 5" in text and "drop_taken 2" in text

            client.reload()
            after = scrape(metrics_port)
            for key, value in got.items():
                if key[0].endswith(("_total", "_count", "_sum")):
                    assert after.get(key, 0) >= value, key  # nothing goes back across a reload
            assert after[("annotator_reloads_total", ())] == client.status().counters["reloads"] == 1
    with serving(config):  # a restart: the store's counters go on, the process's start again at 0
        again = scrape(metrics_port)
        assert again[("annotator_annotated_total", ())] == 5 and again[("annotator_reloads_total", ())] == 1
        assert again[("annotator_drop_taken_total", ())] == 0
        assert ("annotator_grpc_calls_total", (("code", "OK"), ("method", "Annotate"))) not in again
        for state in STATES:
            assert again[("annotator_images", (("state", state),))] == store_counts[state]


def test_status_latency_counts_only_calls_answered_ok(served: tuple[Any, int],
                                                     small_jpeg: Callable[[int], bytes]) -> None:
    """One annotation and three refused images: ``annotate_p50_us`` was a refusal's 0.1 ms (489
    us on a real daemon with one 140 ms annotation), the median of calls that annotated nothing."""
    daemon, port = served
    with AnnotatorClient(f"127.0.0.1:{port}", timeout=60, retries=0) as client:
        client.annotate(small_jpeg(5))
        for _ in range(3):
            with pytest.raises(grpc.RpcError):
                client.annotate(b"not an image")
        counters = client.status().counters
    assert counters["annotate_p50_us"] == counters["annotate_p99_us"] > 0  # the one sample: the annotation


def test_made_up_method_names_leave_no_state_behind(make_config: Callable[..., Any]) -> None:
    """With a token, a call to any method name is answered UNAUTHENTICATED, and each made-up name
    kept a latency deque for ever (memory grown by any client that can reach the port, without
    the secret) and would have been a metric label."""
    from service.daemon import Daemon
    from service.server import create_server

    metrics = MetricsRecorder()
    daemon = Daemon(make_config(server__token="s3cret"), metrics=metrics)
    daemon.start()
    server, port = create_server(daemon.config, daemon)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            for i in range(50):
                call = channel.unary_unary(f"/annotator.v1.Annotator/Made{i}Up")
                with pytest.raises(grpc.RpcError) as caught:
                    call(b"", timeout=10)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert daemon.latency is not None
        assert all(daemon.latency.percentiles(f"/annotator.v1.Annotator/Made{i}Up") == (0.0, 0.0) for i in range(50))
        methods = {labels.get("method") for family in metrics.registry.collect() for s in family.samples
                   for labels in [s.labels] if s.name == "annotator_grpc_calls_total"}
        assert methods == {"other"}
        assert metrics.registry.get_sample_value("annotator_grpc_calls_total",
                                                 {"method": "other", "code": "UNAUTHENTICATED"}) == 50
    finally:
        server.stop(grace=0.5).wait(5)
        daemon.close()


def test_a_refused_call_is_logged_with_the_reason(served: tuple[Any, int], caplog: pytest.LogCaptureFixture) -> None:
    """The drop folder logs why it quarantined a file; a gRPC refusal logged only its code
    ("Annotate INVALID_ARGUMENT 0.1 ms"), so the operator had to ask the client why."""
    _, port = served
    caplog.set_level(logging.INFO, logger="service.interceptors")
    with AnnotatorClient(f"127.0.0.1:{port}", timeout=30, retries=0) as client:
        with pytest.raises(grpc.RpcError):
            client.annotate(b"garbage bytes")
    _wait(lambda: any("INVALID_ARGUMENT" in r.getMessage() for r in caplog.records), "the access log line", 10)
    line = next(r.getMessage() for r in caplog.records if "INVALID_ARGUMENT" in r.getMessage())
    assert "Annotate INVALID_ARGUMENT" in line and "not a decodable image" in line, line


def test_status_says_which_counters_are_whose_and_what_the_latency_covers() -> None:
    """``annotate_p50_us 0`` after a day of drop-folder work read as "annotations take 0 us"; the
    store's counters (kept across restarts) and this start's stood in one line."""
    idle = pb.Status(version="0.1.0", bundle_id="b", counters={"annotated": 8, "failed": 0, "reloads": 1,
                                                                 "drop_taken": 0, "drop_quarantined": 0,
                                                                 "annotate_p50_us": 0, "annotate_p99_us": 0})
    text = format_status(idle)
    assert "annotate_p50_us" not in text and "no unary Annotate call answered yet" in text
    assert "counters    annotated 8, failed 0, reloads 1" in text
    assert "this start  drop_quarantined 0, drop_taken 0" in text
    busy = pb.Status(counters={"annotated": 9, "annotate_p50_us": 489, "annotate_p99_us": 140121})
    assert "Annotate p50 0.5 ms, p99 140 ms (unary calls answered OK" in format_status(busy)


def test_labels_stay_bounded_and_each_process_shows_its_own_series(tmp_path: Path) -> None:
    """A thousand files and cameras make three ``intake`` values; the daemon's endpoint has none
    of the sync agent's series and the agent's none of the daemon's."""
    from service.metrics import intake_of

    daemon = MetricsRecorder(process="daemon")
    for i in range(1000):
        daemon.annotated(f"drop:cam{i}/s{i}/frame{i}.jpg", 0.2)
        daemon.annotated(f"grpc:camera-{i}", 0.1)
    daemon.annotated("annotate-cli", 3.0)
    value = daemon.registry.get_sample_value
    assert value("annotator_annotate_seconds_count", {"intake": "drop"}) == 1000
    assert value("annotator_annotate_seconds_count", {"intake": "grpc"}) == 1000
    assert value("annotator_annotate_seconds_count", {"intake": "other"}) == 1
    intakes = {s.labels["intake"] for f in daemon.registry.collect() for s in f.samples if "intake" in s.labels}
    assert intakes == {"drop", "grpc", "other"}
    assert intake_of("grpc:") == "grpc" and intake_of("drop:x.jpg") == "drop" and intake_of("") == "other"
    assert value("annotator_uploads_total", {"result": "ok"}) is None

    sync = MetricsRecorder(process="sync")
    sync.task_pass("uploader", ok=True)
    sync.task_pass("merge", ok=False)
    assert (sync.registry.get_sample_value("annotator_sync_last_success_timestamp_seconds", {"task": "uploader"})
            or 0) > 0
    assert sync.registry.get_sample_value("annotator_sync_task_errors_total", {"task": "merge"}) == 1
    assert sync.registry.get_sample_value("annotator_inference_seconds_count", {"role": "head"}) is None
    store = Store(tmp_path / "store")
    sync.watch_store(store)
    assert sync.registry.get_sample_value("annotator_images", {"state": "received"}) == 0
    assert sync.registry.get_sample_value("annotator_annotated_total") is None  # the daemon's to show
    store.close()
    sync.observe_inference("head", 0.1)  # a call into a series the process does not show still works
    with pytest.raises(ValueError):
        MetricsRecorder(process="both")


def test_queue_age_is_the_oldest_waiting_images(tmp_path: Path) -> None:
    """A queue's depth alone does not tell a stuck intake (the same images for an hour) from a
    busy one: the age of its oldest image does."""
    store = Store(tmp_path / "store")
    metrics = MetricsRecorder()
    metrics.watch_store(store)
    port = start_metrics_server(metrics, "127.0.0.1", 0)
    assert scrape(port)[("annotator_queue_oldest_age_seconds", (("queue", "annotate"),))] == 0
    first, _ = store.ingest(b"first image bytes", "drop:a.jpg")
    store.ingest(b"second image bytes", "drop:b.jpg")
    received_at = store.get(first).received_at  # type: ignore[union-attr]
    before = time.time()
    got = scrape(port)
    after = time.time()
    age = got[("annotator_queue_oldest_age_seconds", (("queue", "annotate"),))]
    assert before - received_at <= age <= after - received_at  # the older one's, not the newer one's
    assert got[("annotator_queue_oldest_age_seconds", (("queue", "upload"),))] == 0
    store.close()


def test_the_sync_agent_says_when_each_task_last_worked() -> None:
    """"Last successful sync" had no series: an agent failing every upload for a day looked like
    an idle one. Each pass of a task sets its last success or counts its error."""
    from service.metrics import MetricsRecorder
    from sync.agent import Agent
    from sync.errors import RetryableError

    class Task:
        def __init__(self, name: str, fail: bool) -> None:
            self.name, self.fail = name, fail

        def run_once(self) -> bool:
            if self.fail:
                raise RetryableError("the bucket does not answer")
            return False

    from sync.agent import Every

    metrics = MetricsRecorder(process="sync")
    agent = Agent([Task("upload", True), Task("merge", False), Every(Task("collect", True), 3600.0)], metrics=metrics)
    for _ in range(4):
        agent.run_pass()
    value = metrics.registry.get_sample_value
    assert value("annotator_sync_task_errors_total", {"task": "upload"}) == 4
    assert value("annotator_sync_last_success_timestamp_seconds", {"task": "upload"}) is None
    assert value("annotator_sync_last_success_timestamp_seconds", {"task": "merge"}) > 0
    # a task run once an hour failed its one run: the passes it was not due are no success of it
    assert value("annotator_sync_task_errors_total", {"task": "collect"}) == 1
    assert value("annotator_sync_last_success_timestamp_seconds", {"task": "collect"}) is None


def test_the_sync_endpoint_leaves_the_daemons_floor_and_pause_out(tmp_path: Path) -> None:
    """The agent's Store has no floor: its endpoint said min_free_bytes 0 and paused 0 while the
    daemon (floor 10^15 bytes) was paused."""
    from service.metrics import MetricsRecorder
    from service.store import Store

    daemon_side, sync_side = MetricsRecorder(process="daemon"), MetricsRecorder(process="sync")
    daemon_side.watch_store(Store(tmp_path / "store", min_free_bytes=10**15))
    sync_side.watch_store(Store(tmp_path / "store"))
    d, s = daemon_side.registry.get_sample_value, sync_side.registry.get_sample_value
    assert d("annotator_paused") == 1 and d("annotator_store_min_free_bytes") == 10**15
    assert s("annotator_paused") is None and s("annotator_store_min_free_bytes") is None
    assert s("annotator_images", {"state": "received"}) == d("annotator_images", {"state": "received"}) == 0
