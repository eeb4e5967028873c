"""A real gRPC server on 127.0.0.1 with a real bundle: answers, clear errors, health, reflection."""
from __future__ import annotations

import errno
import sqlite3
from typing import Any, Callable

import cv2
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos.annotator.v1 import annotator_pb2 as pb
from protos.annotator.v1 import annotator_pb2_grpc as pb_grpc
from service.errors import BundleError, ImageError, ImageNotFound, ImageTooLarge, ShuttingDown, StoreFull
from service.server import status_for

C = grpc.StatusCode


@pytest.fixture
def stub(served: tuple[Any, int]) -> Any:
    with grpc.insecure_channel(f"127.0.0.1:{served[1]}",
                               options=[("grpc.max_send_message_length", 16_000_000)]) as channel:
        yield pb_grpc.AnnotatorStub(channel)


def _req(data: bytes, rid: str = "", camera: str = "cam-a") -> pb.AnnotateRequest:
    return pb.AnnotateRequest(image=data, metadata=pb.ClientMetadata(camera_id=camera, request_id=rid,
                                                                     labels={"seat": "driver"}))


@pytest.mark.parametrize("exc,code", [
    (ImageError("empty image data (0 bytes)"), C.INVALID_ARGUMENT),
    (ImageTooLarge("too many pixels"), C.RESOURCE_EXHAUSTED),
    (StoreFull("disk below floor"), C.RESOURCE_EXHAUSTED),
    (ImageNotFound("no image"), C.NOT_FOUND),
    (BundleError("checksum mismatch"), C.FAILED_PRECONDITION),
    (ShuttingDown("stopping"), C.UNAVAILABLE),
    (TimeoutError("slow"), C.DEADLINE_EXCEEDED),
    (ValueError("bad cursor"), C.INVALID_ARGUMENT),
    (RuntimeError("secret internals"), C.INTERNAL),
    (OSError(errno.ENOSPC, "No space left on device"), C.RESOURCE_EXHAUSTED),
    (OSError(errno.EACCES, "Permission denied"), C.FAILED_PRECONDITION),  # a setting to fix (says which file)
])
def test_status_for(exc: Exception, code: grpc.StatusCode) -> None:
    got, message = status_for(exc)
    assert got == code and message
    if code == C.INTERNAL:
        assert "secret" not in message  # no internals leak to clients


def test_full_disk_is_resource_exhausted_with_a_clear_message() -> None:
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = sqlite3.SQLITE_FULL
    for exc in (OSError(errno.ENOSPC, "No space left on device"), full):
        code, message = status_for(exc)
        assert code == C.RESOURCE_EXHAUSTED and "disk is full" in message and "ingest is paused" in message


def test_no_space_while_storing_is_resource_exhausted(served: tuple[Any, int], stub: Any,
                                                      small_jpeg: Callable[[int], bytes],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The store's floor is 0 (or the disk filled faster than it): writing the image file fails
    with ENOSPC, which is the store being full, not an internal error."""
    import service.store

    def no_space(*args: object, **kw: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(service.store, "write_bytes_atomic", no_space)
    with pytest.raises(grpc.RpcError) as err:
        stub.Annotate(_req(small_jpeg(7)), timeout=30)
    assert err.value.code() == C.RESOURCE_EXHAUSTED and "disk is full" in err.value.details()


def test_annotate_real_photo_then_same_bytes_once(served: tuple[Any, int], stub: Any,
                                                   photo_variants: Callable[..., list[bytes]]) -> None:
    daemon, _ = served
    data = photo_variants(1)[0]
    first = stub.Annotate(_req(data), timeout=60)
    assert first.state in ("auto_accepted", "review_pending")
    assert first.persons and first.width > 0 and first.camera_id == "cam-a"
    kp = first.persons[0].keypoints
    assert kp[0].name == "nose" and kp[0].visibility != pb.VISIBILITY_UNSPECIFIED
    assert first.judgement.decision in ("auto_accepted", "review") and first.bundle_id == daemon.bundle.id
    again = stub.Annotate(_req(data), timeout=60)
    assert again == first
    assert [h[1] for h in daemon.store.history(first.image_id)].count("annotated") == 1
    assert daemon.store.counter("annotated") == 1
    assert stub.GetAnnotation(pb.GetAnnotationRequest(image_id=first.image_id)) == first


def test_bad_inputs_get_clear_errors_and_others_are_unaffected(served: tuple[Any, int], stub: Any,
                                                                small_jpeg: Callable[[int], bytes]) -> None:
    daemon, _ = served
    good = small_jpeg(1)
    bomb = cv2.imencode(".png", np.zeros((2100, 2000, 3), np.uint8))[1].tobytes()  # 4.2 MP > 4 MP limit
    cases = [
        (b"", C.INVALID_ARGUMENT, "empty"),
        (good[: len(good) // 2], C.INVALID_ARGUMENT, "truncated"),
        (b"%PDF-1.7 not an image", C.INVALID_ARGUMENT, "not a decodable image"),
        (bomb, C.RESOURCE_EXHAUSTED, "more than the limit"),
        (b"\xff\xd8" + bytes(5_000_000), C.RESOURCE_EXHAUSTED, ""),  # over server.max_message_bytes
    ]
    for data, code, words in cases:
        with pytest.raises(grpc.RpcError) as err:
            stub.Annotate(_req(data), timeout=30)
        assert err.value.code() == code, (words, err.value.details())
        assert words in err.value.details() and "Traceback" not in err.value.details()
    assert stub.Annotate(_req(good), timeout=60).state in ("auto_accepted", "review_pending")
    assert daemon.store.counts()["failed"] == 0  # refused before anything was stored

    daemon.store.min_free_bytes = 1 << 62  # the disk floor: ingest pauses
    with pytest.raises(grpc.RpcError) as err:
        stub.Annotate(_req(small_jpeg(2)), timeout=30)
    assert err.value.code() == C.RESOURCE_EXHAUSTED and "floor" in err.value.details()
    assert "floor" in stub.GetStatus(pb.GetStatusRequest()).paused_reason


def test_stream_returns_request_ids_and_per_image_errors(served: tuple[Any, int], stub: Any,
                                                         small_jpeg: Callable[[int], bytes]) -> None:
    daemon, _ = served
    images = {f"r{i}": small_jpeg(100 + i) for i in range(20)}  # more than the in-flight bound
    images["bad"] = b"junk"
    images["dup"] = images["r0"]
    answers = {r.request_id: r for r in stub.AnnotateStream(iter(_req(d, rid) for rid, d in images.items()), timeout=120)}
    assert set(answers) == set(images)
    assert answers["bad"].WhichOneof("result") == "error"
    assert answers["bad"].error.code == C.INVALID_ARGUMENT.value[0] and "not a decodable" in answers["bad"].error.message
    assert answers["dup"].annotation.image_id == answers["r0"].annotation.image_id
    assert all(answers[f"r{i}"].annotation.state in ("auto_accepted", "review_pending") for i in range(20))
    assert daemon.store.counter("annotated") == 20


def test_streams_are_bounded_on_the_whole_server_and_health_still_answers(
        make_config: Callable[..., Any], small_jpeg: Callable[[int], bytes]) -> None:
    """Each open stream holds a server thread. Several clients with their streams open took
    every thread, and health checks timed out. ``server.max_concurrent_streams`` bounds them on
    the whole server: a stream beyond it (on any connection) is refused at once."""
    import threading

    from service.daemon import Daemon
    from service.server import create_server

    daemon = Daemon(make_config(server__max_concurrent_streams=2))
    daemon.start()
    server, port = create_server(daemon.config, daemon)
    hold = threading.Event()
    channels = [grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(3)]
    try:
        def requests(seed: int):
            yield _req(small_jpeg(seed), f"s{seed}")
            hold.wait(60)

        calls = []
        for i, ch in enumerate(channels[:2]):  # two clients, one stream each: both admitted
            call = pb_grpc.AnnotatorStub(ch).AnnotateStream(requests(300 + i), timeout=60)
            assert next(call).request_id == f"s{300 + i}"  # open and answered
            calls.append(call)
        with pytest.raises(grpc.RpcError) as refused:
            next(pb_grpc.AnnotatorStub(channels[2]).AnnotateStream(requests(302), timeout=60))
        assert refused.value.code() == C.RESOURCE_EXHAUSTED and "streams are open" in refused.value.details()
        health = health_pb2_grpc.HealthStub(channels[2]).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        calls[0].cancel()  # a slot comes back when a stream ends
        for _ in range(50):
            try:
                again = pb_grpc.AnnotatorStub(channels[2]).AnnotateStream(requests(303), timeout=60)
                assert next(again).request_id == "s303"
                calls.append(again)
                break
            except grpc.RpcError as exc:
                assert exc.code() == C.RESOURCE_EXHAUSTED  # the cancel not yet seen by the server
                hold.wait(0.1)
        else:
            raise AssertionError("the slot of the cancelled stream never came back")
    finally:
        hold.set()
        for ch in channels:
            ch.close()
        server.stop(grace=1.0).wait(5)
        daemon.close()


def test_list_get_status_reload(served: tuple[Any, int], stub: Any, small_jpeg: Callable[[int], bytes],
                                pose_keypoints: Any) -> None:
    daemon, _ = served
    ids = {stub.Annotate(_req(small_jpeg(200 + i)), timeout=60).image_id for i in range(5)}
    seen: set[str] = set()
    token = ""
    while True:
        page = stub.ListAnnotations(pb.ListAnnotationsRequest(page_size=2, page_token=token))
        assert len(page.annotations) <= 2
        seen.update(a.image_id for a in page.annotations)
        token = page.next_page_token
        if not token:
            break
    assert seen == ids
    with pytest.raises(grpc.RpcError) as err:
        stub.GetAnnotation(pb.GetAnnotationRequest(image_id="0" * 64))
    assert err.value.code() == C.NOT_FOUND
    for bad, words in ((dict(page_token="garbage"), "cursor"), (dict(page_token="e|" + "0" * 64), "cursor"),
                       (dict(state="review"), "state: expected one of"), (dict(decision="bogus"), "decision:")):
        with pytest.raises(grpc.RpcError) as err:
            stub.ListAnnotations(pb.ListAnnotationsRequest(**bad))
        assert err.value.code() == C.INVALID_ARGUMENT and words in err.value.details(), bad
    assert len(stub.ListAnnotations(pb.ListAnnotationsRequest(state="auto_accepted", decision="auto_accepted"))
               .annotations) + len(stub.ListAnnotations(pb.ListAnnotationsRequest(decision="review")).annotations) == 5

    status = stub.GetStatus(pb.GetStatusRequest())
    assert status.bundle_id == daemon.bundle.id and status.queue_depths["received"] == 0
    assert sum(status.queue_depths.values()) == 5 and len(status.thresholds.main) == pose_keypoints.count
    assert list(status.providers) == ["CPUExecutionProvider"] and status.run_batch == 1  # run_batch 0 on a CPU
    with pytest.raises(grpc.RpcError) as err:  # inside the bundles folder, but no bundle there
        stub.ReloadModels(pb.ReloadModelsRequest(bundle_path="no-such-bundle"))
    assert err.value.code() == C.FAILED_PRECONDITION and "bundle.json" in err.value.details()
    assert stub.ReloadModels(pb.ReloadModelsRequest()).bundle_id == daemon.bundle.id  # old one kept / re-read


def test_health_and_reflection(served: tuple[Any, int]) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{served[1]}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "annotator.v1.Annotator"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
                health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        answer = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in answer.list_services_response.service}
        assert {"annotator.v1.Annotator", "grpc.health.v1.Health"} <= names
