"""Security of the gRPC edge (issue 6): TLS and mutual TLS, the bearer token, concurrent-stream
limits, client paths that must not escape, and secrets kept out of logs and errors.

Certificates are made here with ``cryptography`` (a CA, a server and a client certificate,
plus a client certificate from a foreign CA); every server is real and on loopback.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from protos.annotator.v1 import annotator_pb2 as pb
from protos.annotator.v1 import annotator_pb2_grpc as pb_grpc
from service.client import AnnotatorClient, TlsOptions
from service.config import load_config
from service.errors import ConfigError
from service.server import allowed_bundle_path, create_server

C = grpc.StatusCode


@dataclass(frozen=True)
class Pki:
    """PEM files on disk and in memory: CA, server (CN localhost, SAN localhost/127.0.0.1), clients."""

    ca: bytes
    ca_path: Path
    server_cert: Path
    server_key: Path
    client: tuple[bytes, bytes]  # (key, cert) signed by the CA
    foreign_client: tuple[bytes, bytes]  # (key, cert) signed by another CA


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(name: str, key: Any, issuer: tuple[x509.Name, Any] | None, ca: bool = False,
          san: list[x509.GeneralName] | None = None) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer or (subject, key)
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(folder: Path) -> Pki:
    pem = serialization.Encoding.PEM
    ca_key, other_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca, other = _cert("test CA", ca_key, None, ca=True), _cert("foreign CA", other_key, None, ca=True)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    server = _cert("localhost", server_key, (ca.subject, ca_key),
                   san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client = _cert("lab tool", client_key, (ca.subject, ca_key))
    foreign = _cert("intruder", client_key, (other.subject, other_key))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ca.crt").write_bytes(ca.public_bytes(pem))
    (folder / "server.crt").write_bytes(server.public_bytes(pem))
    (folder / "server.key").write_bytes(_pem_key(server_key))
    return Pki(ca.public_bytes(pem), folder / "ca.crt", folder / "server.crt", folder / "server.key",
               (_pem_key(client_key), client.public_bytes(pem)), (_pem_key(client_key), foreign.public_bytes(pem)))


@pytest.fixture
def daemon(make_config: Callable[..., Any]) -> Iterator[Any]:
    """A started Daemon; tests put servers with their own configs in front of it."""
    from service.daemon import Daemon

    d = Daemon(make_config())
    d.start()
    try:
        yield d
    finally:
        d.close()


@pytest.fixture
def server_for(daemon: Any, make_config: Callable[..., Any]) -> Iterator[Callable[..., int]]:
    """``start(**dotted_overrides) -> port``: a gRPC server with that config over ``daemon``."""
    servers: list[grpc.Server] = []

    def start(**overrides: Any) -> int:
        server, port = create_server(make_config(**overrides), daemon)
        servers.append(server)
        return port

    yield start
    for s in servers:
        s.stop(grace=0.5).wait(5)


def _status(client: AnnotatorClient) -> str:
    return client.status().bundle_id


def _code(call: Callable[[], Any]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def test_tls_and_mutual_tls(tmp_path: Path, server_for: Callable[..., int], daemon: Any) -> None:
    pki = make_pki(tmp_path / "pki")
    tls = server_for(server__tls_cert=str(pki.server_cert), server__tls_key=str(pki.server_key))
    with AnnotatorClient(f"127.0.0.1:{tls}", timeout=10, retries=0, tls=TlsOptions(pki.ca)) as c:
        assert _status(c) == daemon.bundle.id
    with AnnotatorClient(f"127.0.0.1:{tls}", timeout=5, retries=0) as plaintext:
        assert _code(lambda: _status(plaintext)) == C.UNAVAILABLE

    mtls = server_for(server__tls_cert=str(pki.server_cert), server__tls_key=str(pki.server_key),
                      server__tls_client_ca=str(pki.ca_path))
    key, cert = pki.client
    with AnnotatorClient(f"localhost:{mtls}", timeout=10, retries=0, tls=TlsOptions(pki.ca, cert, key)) as c:
        assert _status(c) == daemon.bundle.id
    # Without a client certificate, or with one from another CA, the TLS handshake fails:
    # gRPC reports that as UNAVAILABLE (the call never reaches the service).
    for options in (TlsOptions(pki.ca), TlsOptions(pki.ca, pki.foreign_client[1], pki.foreign_client[0])):
        with AnnotatorClient(f"localhost:{mtls}", timeout=5, retries=0, tls=options) as refused:
            assert _code(lambda: _status(refused)) == C.UNAVAILABLE


def test_the_container_healthcheck_speaks_tls_when_the_daemon_does(tmp_path: Path,
                                                                   server_for: Callable[..., int]) -> None:
    """The image's HEALTHCHECK (`annotator healthcheck`, $ANNOTATOR_CONFIG) connected in plain
    text, so a daemon serving TLS was reported unhealthy for ever."""
    from service.cli import main

    pki = make_pki(tmp_path / "pki")
    chain = tmp_path / "pki" / "chain.crt"  # the server certificate and the CA that signed it
    chain.write_bytes(pki.server_cert.read_bytes() + pki.ca)
    for extra in ("", f'tls_client_ca = "{pki.ca_path}"\n'):
        port = server_for(server__tls_cert=str(chain), server__tls_key=str(pki.server_key),
                          **({"server__tls_client_ca": str(pki.ca_path)} if extra else {}))
        config = tmp_path / "annotator.toml"
        config.write_text(f'[server]\ntls_cert = "{chain}"\ntls_key = "{pki.server_key}"\n{extra}')
        target = f"127.0.0.1:{port}"
        assert main(["healthcheck", "--server", target, "--timeout", "2", "--config", ""]) == 1  # plain text
        assert main(["healthcheck", "--server", target, "--timeout", "5", "--config", str(config)]) == 0


def test_the_sync_agent_reloads_a_daemon_that_speaks_tls_only(tmp_path: Path, server_for: Callable[..., int],
                                                              daemon: Any) -> None:
    """The agent reads the daemon's [server] table from the same file; with TLS on (and client
    certificates required) its ReloadModels calls connected in plain text and never got through."""
    from sync.config import load_sync_config
    from sync.models import grpc_reload_fn

    pki = make_pki(tmp_path / "pki")
    chain = tmp_path / "pki" / "chain.crt"
    chain.write_bytes(pki.server_cert.read_bytes() + pki.ca)
    port = server_for(server__tls_cert=str(chain), server__tls_key=str(pki.server_key),
                      server__tls_client_ca=str(pki.ca_path))
    config = tmp_path / "annotator.toml"
    config.write_text(f'[server]\ntls_cert = "{chain}"\ntls_key = "{pki.server_key}"\n'
                      f'tls_client_ca = "{pki.ca_path}"\n[sync]\nappliance_id = "lab"\n')
    cfg = load_sync_config(config, env={})
    assert cfg.daemon_tls is not None and cfg.daemon_tls.server_name == "localhost" and "BEGIN" not in repr(cfg)
    status = grpc_reload_fn(f"127.0.0.1:{port}", tls=cfg.daemon_tls)(str(daemon.config.engine.bundle))
    assert status.bundle_id == daemon.bundle.id


def test_wrong_or_missing_token_is_unauthenticated_for_every_kind_of_call(
        server_for: Callable[..., int], small_jpeg: Callable[[int], bytes]) -> None:
    port = server_for(server__token="correct-horse")
    for token in (None, "wrong", "correct-horse "):
        with AnnotatorClient(f"127.0.0.1:{port}", timeout=10, retries=0, token=token) as c:
            assert _code(lambda: c.status()) == C.UNAUTHENTICATED
            assert _code(lambda: c.annotate(small_jpeg(1))) == C.UNAUTHENTICATED
            stream = c.stub.AnnotateStream(iter([pb.AnnotateRequest(image=small_jpeg(2))]), metadata=c._metadata)
            assert _code(lambda: list(stream)) == C.UNAUTHENTICATED
    with AnnotatorClient(f"127.0.0.1:{port}", timeout=30, retries=0, token="correct-horse") as c:
        assert c.annotate(small_jpeg(3)).image_id


def test_streams_beyond_max_concurrent_streams_are_refused_and_other_calls_answered(server_for: Callable[..., int]) -> None:
    """``max_concurrent_streams`` bounds the open AnnotateStream calls of the whole server: a
    third stream is refused with RESOURCE_EXHAUSTED, while other calls on the same connection are
    answered. (It was also sent as HTTP/2's per-connection MAX_CONCURRENT_STREAMS, which made
    gRPC refuse, with RST_STREAM, every call beyond it on a connection, health checks included.)"""
    port = server_for(server__max_concurrent_streams=2)
    release = threading.Event()

    def idle_requests() -> Iterator[pb.AnnotateRequest]:
        release.wait(30)
        return
        yield  # a generator that sends nothing until released

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.AnnotatorStub(channel)
        stub.GetStatus(pb.GetStatusRequest(), timeout=10)  # connected
        streams = [stub.AnnotateStream(idle_requests(), timeout=30) for _ in range(2)]
        readers = [threading.Thread(target=lambda s=s: list(s)) for s in streams]
        for t in readers:
            t.start()
        try:
            deadline = time.monotonic() + 20  # until both streams hold their slot on the server
            while time.monotonic() < deadline:
                try:
                    list(stub.AnnotateStream(iter([]), timeout=10))
                    third = C.OK  # a stream had not taken its slot yet
                except grpc.RpcError as exc:
                    third = exc.code()
                if third == C.RESOURCE_EXHAUSTED:
                    break
                time.sleep(0.1)
            assert third == C.RESOURCE_EXHAUSTED
            assert stub.GetStatus(pb.GetStatusRequest(), timeout=10).bundle_id  # the same connection
        finally:
            release.set()
            for t in readers:
                t.join(10)
        assert stub.GetStatus(pb.GetStatusRequest(), timeout=10).bundle_id


PATH_TRICKS = ["../../escaped", "/etc/passwd", "..\\..\\escaped", "cam/../../../escaped", "\x00nul", ""]


@pytest.mark.parametrize("trick", PATH_TRICKS)
def test_client_metadata_never_names_a_file(trick: str, tmp_path: Path, server_for: Callable[..., int],
                                            small_jpeg: Callable[[int], bytes]) -> None:
    """Camera, session, request id and labels are data: the sidecar and the stored image are
    named by the image's hash, whatever the client sends."""
    port = server_for()
    before = {p for p in tmp_path.parent.rglob("*")}
    meta = pb.ClientMetadata(camera_id=trick, session=trick, request_id=trick, labels={"file": trick, "path": trick})
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        ann = pb_grpc.AnnotatorStub(channel).Annotate(pb.AnnotateRequest(image=small_jpeg(7), metadata=meta), timeout=30)
    new = {p for p in tmp_path.parent.rglob("*")} - before
    assert new, "the image and its sidecar were written"
    for path in new:
        assert path.is_relative_to(tmp_path / "store") or path.is_relative_to(tmp_path / "sidecars"), path
        assert "escaped" not in str(path) and "passwd" not in str(path)
    assert (tmp_path / "sidecars" / f"{ann.image_id}.json").is_file()


@pytest.mark.parametrize("requested, ok", [
    ("current", True), ("bundles/abc", True), ("../elsewhere", False), ("/etc", False),
    ("bundles/../../elsewhere", False), ("link-out", False), ("link-in", True),
])
def test_reload_paths_stay_in_the_bundles_folder(tmp_path: Path, requested: str, ok: bool) -> None:
    root = tmp_path / "models"
    (root / "bundles" / "abc").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (root / "link-out").symlink_to(tmp_path / "elsewhere")
    (root / "link-in").symlink_to(root / "bundles" / "abc")
    if ok:
        assert allowed_bundle_path(requested, root / "current").is_relative_to(root)
    else:
        with pytest.raises(Exception, match="outside the bundles folder"):
            allowed_bundle_path(requested, root / "current")


def test_reload_outside_the_bundles_folder_is_permission_denied(server_for: Callable[..., int]) -> None:
    port = server_for()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.AnnotatorStub(channel)
        for path in ("/etc", "../../../etc"):
            assert _code(lambda: stub.ReloadModels(pb.ReloadModelsRequest(bundle_path=path), timeout=10)) \
                == C.PERMISSION_DENIED


def test_secrets_never_reach_logs_or_errors(tmp_path: Path, make_config: Callable[..., Any],
                                           caplog: pytest.LogCaptureFixture, small_jpeg: Callable[[int], bytes]) -> None:
    from service.daemon import Daemon

    caplog.set_level(logging.DEBUG)
    token = "tok-5f1e9a7c2b"
    pki = make_pki(tmp_path / "pki")
    key_text = pki.server_key.read_text()
    secret_lines = [line for line in key_text.splitlines() if line and not line.startswith("-----")]
    config = make_config(server__token=token, server__tls_cert=str(pki.server_cert),
                         server__tls_key=str(pki.server_key))
    daemon = Daemon(config)
    daemon.start()
    server, port = create_server(config, daemon)
    try:
        with AnnotatorClient(f"localhost:{port}", timeout=30, retries=0, tls=TlsOptions(pki.ca), token=token) as c:
            c.annotate(small_jpeg(11))
            c.status()
        with AnnotatorClient(f"localhost:{port}", timeout=10, retries=0, tls=TlsOptions(pki.ca), token="nope") as c:
            _code(lambda: c.status())
    finally:
        server.stop(grace=0.5).wait(5)
        daemon.close()
    errors = []
    for bad in ({"server.token": 12345}, {"server.token": token, "server.listen": "nowhere"},
                {"server.token": token, "server.tls_key": str(pki.server_key)}):
        with pytest.raises(ConfigError) as err:
            load_config(None, env={}, overrides=bad)
        errors.append(str(err.value))
        logging.getLogger("test").error("config error: %s", err.value)
    shown = [repr(config), str(config.to_dict()), *errors, caplog.text]
    assert caplog.text and "12345" not in errors[0]
    for text in shown:
        assert token not in text
        assert not any(line in text for line in secret_lines)
