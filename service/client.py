"""A small typed client for the annotator's gRPC API.

A capture loop (README material)::

    from service.client import AnnotatorClient

    with AnnotatorClient("127.0.0.1:50051") as client:
        for frame_jpeg in camera.frames():
            ann = client.annotate(frame_jpeg, camera_id="cabin-front")
            print(ann.image_id, len(ann.persons), ann.judgement.decision)

Unary calls are retried on UNAVAILABLE (server restarting, connection refused) with
exponential backoff and full jitter (``compute_backoff``); every call has a deadline.
A busy server (UNAVAILABLE with the ``BUSY_METADATA`` trailer: too many Annotate calls
waiting, or a ReloadModels while another bundle loads; see ``service.server``) is retried the same way until the call's timeout has passed,
not just ``retries`` times: it asked for the retry, and a capture loop wants its image in.
Annotating is idempotent (the image id is the hash of the bytes), so a retry never
annotates an image twice.
"""
from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, TypeVar

import grpc

from protos.annotator.v1 import annotator_pb2 as pb
from protos.annotator.v1 import annotator_pb2_grpc as pb_grpc

from .backoff import compute_backoff
from .convert import epoch_to_timestamp

log = logging.getLogger(__name__)

T = TypeVar("T")
RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)  # REFUSED_STREAM and "server busy" are UNAVAILABLE too
BUSY_METADATA = (("annotator-busy", "1"),)  # trailer of the server's "busy, retry" answers


def is_busy(exc: grpc.RpcError) -> bool:
    """Whether ``exc`` is the server's "busy, retry later" answer (told by its trailer, not its text)."""
    if not hasattr(exc, "code") or exc.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    trailer = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    return any(tuple(item) in BUSY_METADATA for item in trailer or ())


@dataclass(frozen=True)
class TlsOptions:
    """PEM bytes: the CA that signed the server, and optionally a client certificate and key."""

    root_certificates: bytes | None = None
    client_cert: bytes | None = None
    client_key: bytes | None = None
    server_name: str | None = None  # overrides the TLS host name check (e.g. for an IP target)

    @classmethod
    def for_own_server(cls, tls_cert: "str | os.PathLike[str]", tls_key: "str | os.PathLike[str]",
                       client_ca: "str | os.PathLike[str] | None" = None,
                       server_name: str | None = None) -> "TlsOptions":
        """TLS for a program on the daemon's own box that reads the daemon's ``[server]`` table
        (the sync agent's reloads, the container's health check): the daemon's certificate as
        the root (a self-signed one, or a file holding the chain up to its CA), the
        certificate's name as the expected host name, and, when the daemon asks clients for
        certificates (``client_ca``), its own certificate and key as the client's (which passes
        when one CA signs both). ``OSError`` when a file cannot be read."""
        cert = Path(tls_cert).read_bytes()
        key = Path(tls_key).read_bytes() if client_ca else None
        return cls(root_certificates=cert, client_cert=cert if key else None, client_key=key,
                   server_name=server_name or certificate_name(cert))


def certificate_name(pem: bytes) -> str | None:
    """The first DNS name (else IP address) of a PEM certificate's subjectAltName, else its CN."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = san.get_values_for_type(x509.DNSName) or [str(a) for a in san.get_values_for_type(x509.IPAddress)]
        if names:
            return str(names[0])
    except x509.ExtensionNotFound:
        pass
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(cn[0].value) if cn else None


@dataclass(frozen=True)
class ImageMeta:
    """Client metadata sent with an image (all optional)."""

    camera_id: str = ""
    capture_time: float | None = None  # epoch seconds
    session: str = ""
    request_id: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)

    def to_proto(self) -> pb.ClientMetadata:
        msg = pb.ClientMetadata(camera_id=self.camera_id, session=self.session, request_id=self.request_id,
                                labels=dict(self.labels))
        ts = epoch_to_timestamp(self.capture_time)
        if ts is not None:
            msg.capture_time.CopyFrom(ts)
        return msg


def annotate_request(data: bytes, meta: ImageMeta | None = None) -> pb.AnnotateRequest:
    """An ``AnnotateRequest`` for ``annotate_stream``."""
    return pb.AnnotateRequest(image=data, metadata=(meta or ImageMeta()).to_proto())


class AnnotatorClient:
    """Typed calls to ``annotator.v1.Annotator``; usable as a context manager."""

    def __init__(self, target: str, timeout: float = 10.0, retries: int = 3, tls: TlsOptions | None = None,
                 token: str | None = None, max_message_bytes: int = 64 * 1024 * 1024,
                 rng: random.Random | None = None, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.target, self.timeout, self.retries = target, float(timeout), int(retries)
        self._rng, self._sleep, self._clock = rng or random.Random(), sleep, clock
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes)]
        if tls is not None:
            creds = grpc.ssl_channel_credentials(tls.root_certificates, tls.client_key, tls.client_cert)
            if tls.server_name:
                options.append(("grpc.ssl_target_name_override", tls.server_name))
            self.channel = grpc.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.stub = pb_grpc.AnnotatorStub(self.channel)

    def __enter__(self) -> "AnnotatorClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, method: Callable[..., T], request: Any, timeout: float | None) -> T:
        """Call with a deadline; retry UNAVAILABLE up to ``retries`` times with backoff, and a busy
        server's answer (``is_busy``) for as long as the call's timeout has not passed."""
        timeout = timeout or self.timeout
        give_up = self._clock() + timeout
        attempt = failed = 0  # backoff steps; failures other than "busy" (those count against retries)
        busy_before = False
        while True:
            try:  # after a busy answer, the time left: busy answers never outlast the timeout
                left = max(give_up - self._clock(), 0.1) if busy_before else timeout
                return method(request, timeout=left, metadata=self._metadata)
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                busy = is_busy(exc)
                if code not in RETRYABLE or (not busy and failed >= self.retries):
                    raise
                delay = compute_backoff(attempt, rng=self._rng)
                if busy and self._clock() + delay >= give_up:
                    raise
                log.info("%s: %s%s; retry %d in %.2f s", self.target, code, " (server busy)" if busy else "",
                         attempt + 1, delay)
                self._sleep(delay)
                attempt += 1
                failed += not busy
                busy_before = busy

    def annotate(self, data: bytes, camera_id: str = "", capture_time: float | None = None, session: str = "",
                 request_id: str = "", labels: Mapping[str, str] | None = None,
                 timeout: float | None = None) -> pb.Annotation:
        """Annotate one image (JPEG/PNG/... bytes) and return its ``Annotation``."""
        meta = ImageMeta(camera_id, capture_time, session, request_id, dict(labels or {}))
        return self._call(self.stub.Annotate, annotate_request(data, meta), timeout)

    def annotate_stream(self, requests: Iterable[pb.AnnotateRequest],
                        timeout: float | None = None) -> Iterator[pb.AnnotateStreamResponse]:
        """Stream requests (see ``annotate_request``); responses carry each request's request_id.

        Not retried (a stream cannot be replayed safely from an arbitrary iterator); the deadline
        covers the whole stream and defaults to ``timeout`` x 30.
        """
        return self.stub.AnnotateStream(iter(requests), timeout=timeout or self.timeout * 30,
                                        metadata=self._metadata)

    def get(self, image_id: str, timeout: float | None = None) -> pb.Annotation:
        return self._call(self.stub.GetAnnotation, pb.GetAnnotationRequest(image_id=image_id), timeout)

    def list(self, state: str = "", decision: str = "", since: float | None = None, until: float | None = None,
             page_size: int = 100, page_token: str = "", timeout: float | None = None) -> pb.ListAnnotationsResponse:
        """One page of annotations; pass ``next_page_token`` back as ``page_token`` for the next."""
        req = pb.ListAnnotationsRequest(state=state, decision=decision, page_size=page_size, page_token=page_token)
        for name, value in (("since", since), ("until", until)):
            ts = epoch_to_timestamp(value)
            if ts is not None:
                getattr(req, name).CopyFrom(ts)
        return self._call(self.stub.ListAnnotations, req, timeout)

    def list_all(self, state: str = "", decision: str = "", page_size: int = 200) -> Iterator[pb.Annotation]:
        """Every matching annotation, page by page."""
        token = ""
        while True:
            page = self.list(state=state, decision=decision, page_size=page_size, page_token=token)
            yield from page.annotations
            token = page.next_page_token
            if not token:
                return

    def status(self, timeout: float | None = None) -> pb.Status:
        return self._call(self.stub.GetStatus, pb.GetStatusRequest(), timeout)

    def reload(self, bundle_path: str = "", timeout: float | None = 120.0) -> pb.Status:
        return self._call(self.stub.ReloadModels, pb.ReloadModelsRequest(bundle_path=bundle_path), timeout)
