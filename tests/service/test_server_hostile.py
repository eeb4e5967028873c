"""A careless or hostile client on a raw generated stub: every bad call gets a status with the
right code and a message saying what to fix, and nothing else is affected.

A real daemon with the shipped demo bundle (copied under ``tmp_path/models``, so that reload
paths are confined there) and a real gRPC server on 127.0.0.1.
"""
from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import cv2
import grpc
import numpy as np
import pytest

from protos.annotator.v1 import annotator_pb2 as pb
from protos.annotator.v1 import annotator_pb2_grpc as pb_grpc
from service.cli_daemon import DEMO_BUNDLE
from service.config import load_config
from service.store import image_id_of

C = grpc.StatusCode
pytestmark = pytest.mark.skipif(not (DEMO_BUNDLE / "bundle.json").is_file(), reason="no demo bundle shipped")


def _jpeg(seed: int) -> bytes:
    return cv2.imencode(".jpg", np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8))[1].tobytes()


def _req(data: bytes) -> pb.AnnotateRequest:
    return pb.AnnotateRequest(image=data, metadata=pb.ClientMetadata(camera_id="cam-h"))


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, Any]]:
    """(daemon, stub): at most 2 waiting Annotate calls on the server, so that a test can fill them."""
    import service.server
    from service.daemon import Daemon

    monkeypatch.setattr(service.server, "MAX_WAITING_ANNOTATE", 2)
    shutil.copytree(DEMO_BUNDLE, tmp_path / "models" / "current")
    config = load_config(None, env={}, overrides={
        "server.listen": "127.0.0.1:0", "server.max_message_bytes": 4_000_000,
        "store.root": str(tmp_path / "store"), "store.lease_seconds": 30.0, "store.min_free_mb": 0,
        "engine.bundle": str(tmp_path / "models" / "current"), "engine.batch_size": 4,
        "outputs.sidecar_dir": str(tmp_path / "sidecars")})
    daemon = Daemon(config)
    daemon.start()
    server, port = service.server.create_server(config, daemon)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield daemon, pb_grpc.AnnotatorStub(channel)
    finally:
        channel.close()
        server.stop(grace=1.0).wait(5)
        daemon.close()


def _code(call: Any, *args: Any, **kw: Any) -> tuple[grpc.StatusCode, str]:
    try:
        call(*args, **kw)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return C.OK, ""


def test_cancelled_annotate_calls_give_their_slot_back_and_their_images_are_annotated_once(
        served: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A capture tool that gives up on its calls (Ctrl-C, no deadline) held the server's waiting
    slots until each image was annotated or a minute passed: every other client got "server
    busy" meanwhile. A cancelled call now gives its slot back at once; its image stays queued."""
    daemon, stub = served
    engine = daemon._loaded[0]
    gate = threading.Event()
    predict = engine.predict

    def held(*args: Any, **kw: Any) -> Any:  # the engine is slow: the calls wait for their images
        gate.wait(60)
        return predict(*args, **kw)

    monkeypatch.setattr(engine, "predict", held)
    try:
        calls = [stub.Annotate.future(_req(_jpeg(i))) for i in range(2)]  # no deadline
        # Both hold their slots before the third comes (a slot is taken before the image is
        # stored): a third call that came first took a slot, one of the two was told "busy",
        # and the slots were never full again.
        for _ in range(400):
            if all(daemon.store.get(image_id_of(_jpeg(i))) is not None for i in range(2)):
                break
            time.sleep(0.025)
        for _ in range(100):  # until both wait on the server: a third is busy
            code, details = _code(stub.Annotate, _req(_jpeg(9)), timeout=2)
            if code == C.UNAVAILABLE:
                break
        assert code == C.UNAVAILABLE and "server busy" in details
        for call in calls:
            call.cancel()
        for _ in range(100):  # the cancels reach the server; a new call is admitted (and times out)
            code, details = _code(stub.Annotate, _req(_jpeg(10)), timeout=0.5)
            if code != C.UNAVAILABLE:
                break
        assert code == C.DEADLINE_EXCEEDED, details
    finally:
        gate.set()
    answers = [stub.Annotate(_req(_jpeg(i)), timeout=60) for i in (0, 1, 9, 10)]
    for answer in answers:
        assert answer.state in ("auto_accepted", "review_pending")
        assert [h[1] for h in daemon.store.history(answer.image_id)].count("annotated") == 1
    assert daemon.store.counter("annotated") == 4


@pytest.mark.parametrize("call,request_,code,words", [
    ("GetAnnotation", pb.GetAnnotationRequest(image_id="a" * 3_000_000), C.INVALID_ARGUMENT, "image_id: expected"),
    ("GetAnnotation", pb.GetAnnotationRequest(image_id=""), C.INVALID_ARGUMENT, "image_id: expected"),
    ("GetAnnotation", pb.GetAnnotationRequest(image_id="E3B0C442" * 8), C.INVALID_ARGUMENT, "lower-case hex"),
    ("GetAnnotation", pb.GetAnnotationRequest(image_id="e3b0c442" * 8), C.NOT_FOUND, "no image with id"),
    ("ListAnnotations", pb.ListAnnotationsRequest(state="x" * 3_000_000), C.INVALID_ARGUMENT, "state: expected"),
    ("ListAnnotations", pb.ListAnnotationsRequest(decision="y" * 3_000_000), C.INVALID_ARGUMENT, "decision: expected"),
    ("ReloadModels", pb.ReloadModelsRequest(bundle_path="/" + "z" * 3_000_000), C.PERMISSION_DENIED, "outside"),
    ("ReloadModels", pb.ReloadModelsRequest(bundle_path="current\x00"), C.INVALID_ARGUMENT, "bundle_path: "),
])
def test_bad_values_get_their_code_and_a_short_message(served: tuple[Any, Any], call: str, request_: Any,
                                                      code: grpc.StatusCode, words: str) -> None:
    """A value quoted whole in the message (a 3 MB id) overflowed the grpc-message trailer: the
    client saw RESOURCE_EXHAUSTED "received metadata size exceeds hard limit" instead of the
    answer. Quoted values are cut; a malformed image id says what an id looks like."""
    daemon, stub = served
    got, details = _code(getattr(stub, call), request_, timeout=30)
    assert got == code and words in details, (got, details[:200])
    assert len(details) < 1000
    assert stub.GetStatus(pb.GetStatusRequest(), timeout=10).bundle_id == daemon.bundle.id  # nothing else affected
