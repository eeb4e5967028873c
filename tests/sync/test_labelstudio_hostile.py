"""Label Studio answers and webhook posts shaped by a broken proxy or someone on the network
(security audit): JSON nested 100k deep raised RecursionError out of the client (a traceback
at every pass) and out of the webhook's handler; a webhook body of any size was read whole."""
from __future__ import annotations

import http.server
import threading
import urllib.error
import urllib.request

import pytest

from sync.errors import RetryableError
from sync.labelstudio_client import WEBHOOK_MAX_BYTES, LabelStudioClient, WebhookReceiver


def test_an_answer_nested_thousands_deep_is_a_retryable_error() -> None:
    class Deep(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = b"[" * 100_000
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Deep)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = LabelStudioClient(f"http://127.0.0.1:{server.server_port}", "t" * 40, timeout=10)
        with pytest.raises(RetryableError, match="the answer is not JSON"):  # HEAD: RecursionError
            client.get("/api/projects/")
    finally:
        server.shutdown()
        server.server_close()


def _post(url: str, body: bytes, length: int | None = None) -> int:
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Length": str(len(body) if length is None else length)})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_hostile_webhook_posts_are_refused_and_a_real_event_still_wakes_the_collector() -> None:
    with WebhookReceiver() as receiver:
        assert _post(receiver.url, b"[" * 100_000) == 400  # HEAD: the handler thread died (no answer)
        assert _post(receiver.url, b"[1, 2]") == 400
        assert _post(receiver.url, b'{"action": "ANNOTATION_CREATED", "task": {"id": "x"}}') == 200
        assert _post(receiver.url, b"{}", length=WEBHOOK_MAX_BYTES + 1) == 400
        assert receiver.wait(1) and receiver.task_ids == set()
        assert _post(receiver.url, b'{"action": "ANNOTATION_UPDATED", "task": {"id": 7}}') == 200
        assert receiver.wait(5) and receiver.task_ids == {7}
