"""A saturated server: waiting Annotate calls are bounded, calls are never refused by HTTP/2,
health, status and reload still answer, and the client's retries land every image; reloads run
one at a time without holding the threads of the calls that wait for theirs.

The engine is held (``predict`` waits on an Event), or a bundle's load (``Daemon._load``), so
"saturated" is a state, not a race: the tests assert outcomes (status codes, counts), never times.
"""
from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.annotator.v1 import annotator_pb2 as pb
from protos.annotator.v1 import annotator_pb2_grpc as pb_grpc
from service.client import AnnotatorClient

C = grpc.StatusCode


def _channel(port: int) -> grpc.Channel:
    """A channel with its own connection (gRPC shares one per target in a process otherwise)."""
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])


@pytest.fixture
def held(make_config: Callable[..., Any]) -> Iterator[tuple[Any, int, threading.Event, threading.Event]]:
    """A daemon and server whose engine waits in ``predict`` until released: every Annotate call
    that reaches the daemon stays waiting. Yields (daemon, port, entered, release)."""
    from service.daemon import Daemon
    from service.server import create_server

    daemon = Daemon(make_config(store__lease_seconds=120.0))  # no lease takeover while held
    daemon.start()
    entered, release = threading.Event(), threading.Event()
    engine = daemon._engine
    real = engine.predict

    def held_predict(images: Any) -> Any:
        entered.set()
        release.wait(60)
        return real(images)

    engine.predict = held_predict
    server, port = create_server(daemon.config, daemon)
    try:
        yield daemon, port, entered, release
    finally:
        release.set()
        server.stop(grace=1.0).wait(5)
        daemon.close()


def _burst(stubs: list[Any], images: list[bytes]) -> tuple[list[threading.Thread], list[tuple[C, str]]]:
    """One thread per image, calls spread over ``stubs``; outcomes collect (code, details)."""
    outcomes: list[tuple[C, str]] = []

    def call(i: int) -> None:
        try:
            stubs[i % len(stubs)].Annotate(pb.AnnotateRequest(image=images[i]), timeout=120)
            outcomes.append((C.OK, ""))
        except grpc.RpcError as exc:
            busy = dict(exc.trailing_metadata() or ()).get("annotator-busy") == "1"  # what the client retries
            outcomes.append((exc.code(), (exc.details() or "") + (" [busy trailer]" if busy else "")))

    threads = [threading.Thread(target=call, args=(i,), daemon=True) for i in range(len(images))]
    for t in threads:
        t.start()
    return threads, outcomes


def _saturated(entered: threading.Event, outcomes: list[tuple[C, str]], seconds: float = 10.0) -> None:
    """Wait until the engine holds a batch and the server has turned a call away (or ``seconds``)."""
    assert entered.wait(60), "the engine never got a batch"
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not any(code != C.OK for code, _ in outcomes):
        time.sleep(0.05)


def _check_outcomes(outcomes: list[tuple[C, str]], total: int) -> None:
    assert len(outcomes) == total
    refused = [d for code, d in outcomes if "RST_STREAM" in d]
    assert not refused, f"{len(refused)} calls refused by HTTP/2: {refused[:1]}"
    other = [(code, d) for code, d in outcomes
             if code != C.OK and not (code == C.UNAVAILABLE and "server busy" in d and d.endswith("[busy trailer]"))]
    assert not other, other[:3]
    assert any(code == C.OK for code, _ in outcomes)
    assert any(code == C.UNAVAILABLE for code, _ in outcomes), "the burst never filled the bound"


def test_waiting_annotate_calls_leave_threads_for_health_status_and_reload(
        held: tuple[Any, int, threading.Event, threading.Event], small_jpeg: Callable[[int], bytes]) -> None:
    """4 clients x 16 waiting Annotate calls (within HTTP/2's old per-connection limit) took every
    pool thread; health checks, GetStatus and ReloadModels queued behind them until their
    deadline. Now Annotate calls beyond the server-wide bound are answered "busy" at once."""
    daemon, port, entered, release = held
    channels = [_channel(port) for _ in range(5)]
    try:
        stubs = [pb_grpc.AnnotatorStub(ch) for ch in channels[:4]]
        for stub in stubs:
            stub.GetStatus(pb.GetStatusRequest(), timeout=30)  # connected
        threads, outcomes = _burst(stubs, [small_jpeg(1000 + i) for i in range(64)])
        _saturated(entered, outcomes)
        probe = channels[4]
        health = health_pb2_grpc.HealthStub(probe).Check(health_pb2.HealthCheckRequest(), timeout=20)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        admin = pb_grpc.AnnotatorStub(probe)
        assert admin.GetStatus(pb.GetStatusRequest(), timeout=20).bundle_id == daemon.bundle.id
        assert admin.ReloadModels(pb.ReloadModelsRequest(), timeout=60).bundle_id == daemon.bundle.id
        release.set()
        for t in threads:
            t.join(120)
        _check_outcomes(outcomes, 64)
    finally:
        release.set()
        for ch in channels:
            ch.close()


def test_many_calls_on_one_connection_are_never_refused_by_http2(
        held: tuple[Any, int, threading.Event, threading.Event], small_jpeg: Callable[[int], bytes]) -> None:
    """SETTINGS_MAX_CONCURRENT_STREAMS (16) made gRPC refuse calls beyond it on a connection
    (RST_STREAM REFUSED_STREAM, UNAVAILABLE), a health check sharing the connection included.
    Now every call reaches the servicer: it is annotated or answered "busy"."""
    daemon, port, entered, release = held
    channel = _channel(port)
    try:
        stub = pb_grpc.AnnotatorStub(channel)
        stub.GetStatus(pb.GetStatusRequest(), timeout=30)  # connected, SETTINGS exchanged
        threads, outcomes = _burst([stub], [small_jpeg(2000 + i) for i in range(100)])
        _saturated(entered, outcomes)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=20)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        release.set()
        for t in threads:
            t.join(120)
        _check_outcomes(outcomes, 100)
        assert daemon.store.counter("annotated") == sum(code == C.OK for code, _ in outcomes)
    finally:
        release.set()
        channel.close()


def test_one_client_shared_by_many_threads_lands_every_image(
        make_config: Callable[..., Any], small_jpeg: Callable[[int], bytes]) -> None:
    """A capture tool's 64 threads share one AnnotatorClient against a slow engine: busy answers
    (and any refusal) are retried, so every image is annotated and none is lost."""
    from service.daemon import Daemon
    from service.server import create_server

    daemon = Daemon(make_config())
    daemon.start()
    engine = daemon._engine
    real = engine.predict

    def slow(images: Any) -> Any:
        time.sleep(0.02 * len(images))  # a production bundle is slower than the test's
        return real(images)

    engine.predict = slow
    server, port = create_server(daemon.config, daemon)
    images = [small_jpeg(3000 + i) for i in range(192)]
    failures: list[str] = []
    try:
        with AnnotatorClient(f"127.0.0.1:{port}", timeout=60) as client:
            client.status()

            def worker(k: int) -> None:
                for i in range(k, len(images), 64):
                    try:
                        client.annotate(images[i])
                    except grpc.RpcError as exc:
                        failures.append(f"{exc.code().name}: {exc.details()}")  # type: ignore[attr-defined]

            threads = [threading.Thread(target=worker, args=(k,)) for k in range(64)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
        assert not failures, f"{len(failures)} images lost: {failures[:3]}"
        assert daemon.store.counter("annotated") == len(images)
    finally:
        server.stop(grace=1.0).wait(5)
        daemon.close()


def _hold_loads(daemon: Any, first_only: bool = False) -> tuple[threading.Event, threading.Event, list[int]]:
    """Make the daemon's bundle loads wait until released (only the first with ``first_only``),
    and count the callers inside ``Daemon.reload`` at once. Returns (entered, release, counts):
    counts is [inside now, most inside at once]."""
    entered, release = threading.Event(), threading.Event()
    real_load, real_reload = daemon._load, daemon.reload
    counts, lock = [0, 0], threading.Lock()

    def held_load(path: str) -> Any:
        if not (first_only and entered.is_set()):
            entered.set()
            release.wait(60)
        return real_load(path)

    def counted_reload(bundle_path: str | None = None) -> Any:
        with lock:
            counts[0] += 1
            counts[1] = max(counts)
        try:
            return real_reload(bundle_path)
        finally:
            with lock:
                counts[0] -= 1

    daemon._load, daemon.reload = held_load, counted_reload
    return entered, release, counts


def _wait_for(condition: Callable[[], bool], seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def test_reloads_at_once_take_one_thread_and_health_still_answers(make_config: Callable[..., Any]) -> None:
    """Reloads waited for each other on the daemon's reload lock, each holding a pool thread for
    the whole load before it: a burst of them (an operator's script, the agent's pull, a
    rollback) took every thread and the health check (the container gives it 5 s) waited until
    its deadline. Now one reload runs and the others are answered "busy" at once."""
    from service.daemon import Daemon
    from service.server import MAX_WAITING_ANNOTATE, SPARE_THREADS, create_server

    daemon = Daemon(make_config(server__max_concurrent_streams=1))  # a pool of 1 + 32 + 8 threads
    entered, release, counts = _hold_loads(daemon)
    server, port = create_server(daemon.config, daemon)
    calls = 1 + MAX_WAITING_ANNOTATE + SPARE_THREADS + 4  # more than the pool has threads
    channels = [_channel(port) for _ in range(5)]
    outcomes: list[tuple[C, str]] = []
    try:
        stubs = [pb_grpc.AnnotatorStub(ch) for ch in channels[:4]]
        for stub in stubs:
            stub.GetStatus(pb.GetStatusRequest(), timeout=30)  # connected

        def call(i: int) -> None:
            try:
                stubs[i % len(stubs)].ReloadModels(pb.ReloadModelsRequest(), timeout=120)
                outcomes.append((C.OK, ""))
            except grpc.RpcError as exc:
                busy = dict(exc.trailing_metadata() or ()).get("annotator-busy") == "1"
                outcomes.append((exc.code(), (exc.details() or "") + (" [busy trailer]" if busy else "")))

        threads = [threading.Thread(target=call, args=(i,), daemon=True) for i in range(calls)]
        for t in threads:
            t.start()
        assert entered.wait(60), "no reload started"
        _wait_for(lambda: len(outcomes) >= calls - 1)  # the old server answered none of them
        probe = channels[4]
        health = health_pb2_grpc.HealthStub(probe).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert pb_grpc.AnnotatorStub(probe).GetStatus(pb.GetStatusRequest(), timeout=5).bundle_id == daemon.bundle.id
        release.set()
        for t in threads:
            t.join(120)
        assert len(outcomes) == calls and sum(code == C.OK for code, _ in outcomes) == 1
        busy = [d for code, d in outcomes if code == C.UNAVAILABLE and d.endswith("[busy trailer]")
                and "a reload of engine.bundle" in d and "is in progress" in d and "nothing was loaded" in d]
        assert len(busy) == calls - 1, [o for o in outcomes if o[0] != C.OK][:3]
        assert counts[1] == 1 and daemon.store.counter("reloads") == 1
    finally:
        release.set()
        for ch in channels:
            ch.close()
        server.stop(grace=1.0).wait(5)
        daemon.close()


@pytest.fixture
def bundles(tmp_path: Path, pose_bundle: Any, pose_two_model_bundle: Any) -> Path:
    """A bundles folder as the model pull keeps one: ``a`` (engine.bundle) and ``b``, another bundle."""
    root = tmp_path / "models"
    shutil.copytree(pose_bundle.path, root / "a")
    shutil.copytree(pose_two_model_bundle.path, root / "b")
    return root


def test_a_reload_while_one_runs_is_busy_and_the_pulls_reload_waits_for_its_turn(
        make_config: Callable[..., Any], bundles: Path, pose_bundle: Any, pose_two_model_bundle: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    """A reload asked for while another loads waited on the server, holding a thread, until its
    deadline (and loaded its bundle even after its caller had given up). Now it is answered at
    once with UNAVAILABLE and the busy trailer, saying which reload runs; the model pull's
    ``reload_fn`` (``AnnotatorClient``'s retries) waits for its turn on the client's side and
    then loads its bundle, or fails with that message when its timeout passes first (a
    ``RetryableError``: the pull puts its pointers back and tries again, the bundle is not
    refused, and ``models rollback`` does not take it for a daemon that is down)."""
    from service.daemon import Daemon
    from service.server import create_server
    from sync.errors import RetryableError
    from sync.models import grpc_reload_fn
    from sync.models_cli import _unless_down

    caplog.set_level(logging.INFO, logger="service.server")
    daemon = Daemon(make_config(engine__bundle=str(bundles / "a")))
    entered, release, counts = _hold_loads(daemon, first_only=True)
    server, port = create_server(daemon.config, daemon)
    target = f"127.0.0.1:{port}"
    channel = _channel(port)
    answers: dict[str, Any] = {}

    def reload(name: str, fn: Callable[[str], Any]) -> None:
        try:
            answers[name] = fn(name)
        except Exception as exc:  # reported by the asserts below
            answers[name] = exc

    def busy_answers() -> int:
        return sum("answered busy" in r.getMessage() for r in caplog.records)

    try:
        stub = pb_grpc.AnnotatorStub(channel)
        first = threading.Thread(target=reload, args=(
            "a", lambda name: stub.ReloadModels(pb.ReloadModelsRequest(bundle_path=name), timeout=120)))
        first.start()
        assert entered.wait(60), "the first reload never started"
        with pytest.raises(grpc.RpcError) as err:
            stub.ReloadModels(pb.ReloadModelsRequest(bundle_path="b"), timeout=10)
        assert err.value.code() == C.UNAVAILABLE, err.value.details()
        assert ("annotator-busy", "1") in tuple(err.value.trailing_metadata() or ())
        assert f"a reload of {bundles / 'a'}" in err.value.details() and "in progress" in err.value.details()
        with pytest.raises(RetryableError, match="in progress") as gave_up:  # its timeout passed first
            _unless_down(grpc_reload_fn(target, timeout=1.5), target)("b")
        assert "UNAVAILABLE" in str(gave_up.value)
        before = busy_answers()
        pull = threading.Thread(target=reload, args=("b", grpc_reload_fn(target, timeout=60)))
        pull.start()
        assert _wait_for(lambda: busy_answers() > before), "the pull's reload was never answered busy"
        release.set()
        first.join(120)
        pull.join(120)
        assert answers["a"].bundle_id == pose_bundle.id, answers["a"]
        assert answers["b"].bundle_id == pose_two_model_bundle.id, answers["b"]
        assert daemon.bundle.id == pose_two_model_bundle.id and counts[1] == 1
        assert daemon.store.counter("reloads") == 2  # the calls answered busy loaded nothing
        with pytest.raises(grpc.RpcError) as err:  # a failed reload frees the server for the next one
            stub.ReloadModels(pb.ReloadModelsRequest(bundle_path="no-such-bundle"), timeout=60)
        assert err.value.code() == C.FAILED_PRECONDITION
        assert stub.ReloadModels(pb.ReloadModelsRequest(), timeout=60).bundle_id == pose_bundle.id
    finally:
        release.set()
        channel.close()
        server.stop(grace=1.0).wait(5)
        daemon.close()
