"""An S3 server (or a proxy before it) whose answers
carry no ``Date``, so that the registry's ages fall back to this box's clock."""
from __future__ import annotations

import http.client
import http.server
import logging
import threading
import time
from typing import Any, Iterator
from urllib.parse import urlsplit

import pytest

from s3servers import S3Server
from sync.registry import BundleRegistry


class NoDateProxy:
    """A loopback HTTP proxy that forwards every request to an S3 server and drops the ``Date``
    header of its answers (as some S3-compatible servers and proxies do)."""

    def __init__(self, upstream: str) -> None:
        up = urlsplit(upstream)
        host, port = up.hostname, up.port

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                conn = http.client.HTTPConnection(host, port, timeout=30)
                conn.request(self.command, self.path, body=body,
                             headers={k: v for k, v in self.headers.items() if k.lower() != "connection"})
                answer = conn.getresponse()
                data = answer.read()
                self.send_response_only(answer.status, answer.reason)  # no Server, no Date
                for k, v in answer.getheaders():
                    if k.lower() not in ("date", "connection", "transfer-encoding", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", answer.getheader("Content-Length", "0")
                                 if self.command == "HEAD" else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = forward

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint_url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def no_date(moto_server: S3Server) -> Iterator[S3Server]:
    proxy = NoDateProxy(moto_server.endpoint_url)
    try:
        yield S3Server("moto without Date", proxy.endpoint_url)
    finally:
        proxy.close()


def test_a_bucket_whose_answers_have_no_date_is_said_once_with_what_it_risks(
        no_date: S3Server, caplog: pytest.LogCaptureFixture) -> None:
    # HEAD: said at every listing: clean-registry --apply over 3 orphans said it 5 times (the
    # listing, one per folder removed, the uploads' listing), the agent once per Ground Truth batch.
    from sync.s3store import S3Store

    bucket = no_date.new_bucket()
    store = S3Store(bucket, "registry", client=no_date.client())
    for bid in ("a", "b", "c"):
        store.put(f"bundles/{bid}/head.onnx", b"cut short")
    assert store.client.list_objects_v2(Bucket=bucket)["ResponseMetadata"]["HTTPHeaders"].get("date") is None
    registry = BundleRegistry(store)
    before = time.time()
    with caplog.at_level(logging.DEBUG, logger="sync.s3store"):
        found = registry.orphans(0.0)
        assert all(registry.remove_orphan(o, 0.0) for o in found) and len(found) == 3
        assert registry.abandoned_uploads(0.0) == [] and list(store.list("bundles/")) == []
    assert before <= store.list_with_times("bundles/").now <= time.time()  # the box's clock, said
    said = [r for r in caplog.records if "no Date" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.WARNING] + [logging.DEBUG] * (len(said) - 1) and len(said) == 5
    assert "one ahead of the server's makes them older: keep it set by NTP" in said[0].getMessage()
