"""The typed client: backoff maths, retries against a closed port, calls against a real server."""
from __future__ import annotations

import random
from typing import Any, Callable

import grpc
import pytest

from procs import free_port
from service.client import AnnotatorClient, ImageMeta, annotate_request, compute_backoff


@pytest.mark.parametrize("attempt,base,cap,ceiling", [
    (0, 0.1, 5.0, 0.1), (1, 0.1, 5.0, 0.2), (3, 0.1, 5.0, 0.8), (10, 0.1, 5.0, 5.0), (500, 0.1, 5.0, 5.0),
    (0, 0.0, 5.0, 0.0),
])
def test_compute_backoff_bounds(attempt: int, base: float, cap: float, ceiling: float) -> None:
    rng = random.Random(7)
    values = [compute_backoff(attempt, base, cap, rng) for _ in range(200)]
    assert all(0.0 <= v <= ceiling for v in values)
    if ceiling:
        assert max(values) > ceiling / 2  # full jitter spreads over the range
    assert compute_backoff(attempt, base, cap, random.Random(1)) == compute_backoff(attempt, base, cap, random.Random(1))


def test_compute_backoff_refuses_negative_attempts() -> None:
    with pytest.raises(ValueError):
        compute_backoff(-1)


def test_retries_unavailable_then_gives_up() -> None:
    slept: list[float] = []
    with AnnotatorClient(f"127.0.0.1:{free_port()}", timeout=2.0, retries=2, rng=random.Random(0),
                         sleep=slept.append) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.status()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(slept) == 2 and all(0 <= s <= 0.2 for s in slept)


class _Answer(grpc.RpcError):
    """An RpcError as a unary call raises it: code, details and trailing metadata."""

    def __init__(self, code: grpc.StatusCode, trailer: tuple[tuple[str, str], ...] = ()) -> None:
        self._code, self._trailer = code, trailer

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "server busy" if self._trailer else "connection refused"

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._trailer


def _fake_client(clock: list[float], slept: list[float]) -> AnnotatorClient:
    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock[0] += seconds

    return AnnotatorClient("127.0.0.1:1", timeout=10.0, retries=2, rng=random.Random(0), sleep=sleep,
                           clock=lambda: clock[0])


def test_busy_answers_are_retried_until_the_timeout_not_just_retries_times() -> None:
    """A busy server (UNAVAILABLE with the busy trailer) asked for the retry: 6 busy answers in a
    row, more than ``retries``, and the call still lands."""
    from service.client import BUSY_METADATA

    clock, slept = [0.0], []
    answers: list[Any] = [_Answer(grpc.StatusCode.UNAVAILABLE, BUSY_METADATA)] * 6 + ["annotation"]

    def method(request: Any, timeout: float, metadata: Any) -> Any:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    with _fake_client(clock, slept) as client:
        assert client._call(method, None, None) == "annotation"
    assert len(slept) == 6 and clock[0] < 10.0


def test_busy_retries_stop_at_the_timeout_and_other_failures_at_retries() -> None:
    from service.client import BUSY_METADATA

    clock, slept = [0.0], []
    calls = [0]

    def busy(request: Any, timeout: float, metadata: Any) -> Any:
        calls[0] += 1
        clock[0] += 1.0  # each answer takes a second
        raise _Answer(grpc.StatusCode.UNAVAILABLE, BUSY_METADATA)

    with _fake_client(clock, slept) as client, pytest.raises(grpc.RpcError):
        client._call(busy, None, None)
    assert calls[0] > 3 and clock[0] <= 10.0 + 1.0  # past retries=2, never past the timeout (+ the last answer)

    def down(request: Any, timeout: float, metadata: Any) -> Any:
        raise _Answer(grpc.StatusCode.UNAVAILABLE)  # no busy trailer: a connection failure

    slept.clear()
    with _fake_client([0.0], slept) as client, pytest.raises(grpc.RpcError):
        client._call(down, None, None)
    assert len(slept) == 2


def test_client_against_a_real_server(served: tuple[Any, int], small_jpeg: Callable[[int], bytes]) -> None:
    daemon, port = served
    with AnnotatorClient(f"127.0.0.1:{port}", timeout=60) as client:
        ann = client.annotate(small_jpeg(1), camera_id="cam-9", capture_time=1_800_000_000.5, session="s1",
                              request_id="x", labels={"k": "v"})
        assert client.get(ann.image_id) == ann
        assert daemon.store.get(ann.image_id).meta["labels"] == {"k": "v"}
        assert daemon.store.get(ann.image_id).meta["capture_time"] == pytest.approx(1_800_000_000.5)
        answers = list(client.annotate_stream(annotate_request(small_jpeg(i), ImageMeta(request_id=f"id{i}"))
                                              for i in range(2, 6)))
        assert sorted(a.request_id for a in answers) == ["id2", "id3", "id4", "id5"]
        assert len(list(client.list_all(page_size=2))) == 5
        assert client.status().counters["annotated"] == 5
        with pytest.raises(grpc.RpcError) as err:
            client.annotate(b"not an image")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_token_is_required_when_configured(make_config: Callable[..., Any], small_jpeg: Callable[[int], bytes]) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from service.daemon import Daemon
    from service.server import create_server

    daemon = Daemon(make_config(server__token="s3cret"))
    daemon.start()
    server, port = create_server(daemon.config, daemon)
    try:
        with AnnotatorClient(f"127.0.0.1:{port}", timeout=30, retries=0) as anonymous:
            with pytest.raises(grpc.RpcError) as err:
                anonymous.status()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "token" in err.value.details()
            health = health_pb2_grpc.HealthStub(anonymous.channel)  # probes need no secret
            assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        with AnnotatorClient(f"127.0.0.1:{port}", timeout=30, token="s3cret") as client:
            assert client.annotate(small_jpeg(50)).state in ("auto_accepted", "review_pending")
    finally:
        server.stop(grace=1.0).wait(5)
        daemon.close()
