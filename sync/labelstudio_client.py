"""Plain HTTP for a Label Studio server (no SDK): a small JSON client and a webhook receiver.

Label Studio runs as its own process (its own virtual environment: it pins an older numpy),
so the appliance only speaks HTTP to it. ``LabelStudioClient`` sends ``Authorization: Token``
requests and wraps failures: connection trouble, timeouts, an answer cut short
(``http.client.IncompleteRead``), a body that is not JSON (the HTML page of a proxy or a
restarting server, answered with 200) and HTTP 5xx/429 become ``RetryableError``; HTTP 404
``NotFound`` (a ``PermanentError``: the backend tells a deleted project from a page past the
end by it); HTTP 401/403 ``AuthError`` (a ``PermanentError`` naming the token's setting; the
backend retries it, ``sync.labelstudio.AccessRefused``); other HTTP errors ``PermanentError``
with the server's detail. Messages name the server's URL; the token never appears in messages
or logs.

``WebhookReceiver`` is a tiny HTTP server on loopback that Label Studio posts
``ANNOTATION_CREATED``/``ANNOTATION_UPDATED`` events to. Label Studio delivers webhooks once,
with a one-second timeout and no retry, so a webhook only wakes the collector early; polling
the export stays the source of truth.
"""
from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .errors import PermanentError, RetryableError

log = logging.getLogger(__name__)


class NotFound(PermanentError):
    """HTTP 404: the object (project, task, page of a list) does not exist (or no longer)."""


class AuthError(PermanentError):
    """HTTP 401/403: the server refused the API token (revoked, rotated, the user deactivated or
    without access to the project); the message names the setting to fix."""


TOKEN_HINT = ("check the API token: [sync.review.labelstudio] token, or ANNOTATOR_LABEL_STUDIO_TOKEN in the "
              "environment, which wins (Label Studio's Account & Settings page shows the current one; legacy "
              "tokens need LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true on the server)")
PAGING_TRIES = 3  # listings restarted because the list changed while it was paged


class LabelStudioClient:
    """JSON over HTTP to one Label Studio server (``base_url`` like ``http://127.0.0.1:8080``)."""

    def __init__(self, base_url: str, token: str, timeout: float = 30.0) -> None:
        if not token:
            raise ValueError("Label Studio: expected an API token, got an empty one")
        self.base_url = base_url.rstrip("/")
        self._token = token
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"LabelStudioClient({self.base_url!r})"

    def request(self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None) -> Any:
        """``method path`` with an optional JSON body; returns the decoded JSON answer (None if empty)."""
        url = self.base_url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method, headers={
            "Authorization": f"Token {self._token}", "Content-Type": "application/json",
            "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                text = resp.read()
        except urllib.error.HTTPError as exc:
            try:
                detail = exc.read()[:500].decode("utf-8", "replace")
            except (http.client.HTTPException, OSError):  # the error page itself cut short
                detail = exc.reason if isinstance(exc.reason, str) else ""
            what = f"Label Studio {method} {self.base_url}{path}: HTTP {exc.code}: {detail}"
            if exc.code >= 500 or exc.code == 429:
                raise RetryableError(what) from exc
            if exc.code == 404:
                raise NotFound(what) from exc
            if exc.code in (401, 403):
                raise AuthError(f"{what} ({TOKEN_HINT})") from exc
            raise PermanentError(what) from exc
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            # refused, reset, timeout; or the answer cut short (IncompleteRead is no OSError)
            raise RetryableError(f"Label Studio {method} {self.base_url}{path}: {exc}") from exc
        if not text:
            return None
        try:
            return json.loads(text)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError included; not the server's API answering
            start = text[:80].decode("utf-8", "replace")
            raise RetryableError(f"Label Studio {method} {self.base_url}{path}: the answer is not JSON "
                                 f"(a proxy's or a starting server's page?): {start!r}") from exc

    def get(self, path: str, **query: Any) -> Any:
        return self.request("GET", path, query=query or None)

    def post(self, path: str, body: Any) -> Any:
        return self.request("POST", path, body)

    def patch(self, path: str, body: Any) -> Any:
        return self.request("PATCH", path, body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def pages(self, path: str, key: str, page_size: int = 500, **query: Any) -> list[Any]:
        """All items of a paginated list (``page``/``page_size``; items under ``key`` or ``results``).

        A page shorter than ``page_size`` is not the last one: the server caps the page size
        (projects at 100, tasks at ``TASK_API_PAGE_SIZE_MAX`` when an admin sets it), and stopping
        there missed tasks, so a retried import duplicated them. The end comes from the answer
        itself: a ``next`` link that is null (Django REST framework lists: projects), else a
        ``total``/``count`` reached (the task list has ``total`` and no ``next``), else an empty
        page or a 404 past the last page (Label Studio's answer to a page number beyond the end).
        A plain JSON list is an unpaginated answer: all there is. A list that changed while it
        was paged (``_paged``) is read again, ``PAGING_TRIES`` times at most, then
        ``RetryableError``.
        """
        for _ in range(PAGING_TRIES):
            items = self._paged(path, key, page_size, query)
            if items is not None:
                return items
        raise RetryableError(f"Label Studio GET {self.base_url}{path}: the list changed while it was read, {PAGING_TRIES} times "
                             "in a row (tasks added or deleted meanwhile); read again at the next pass")

    def _paged(self, path: str, key: str, page_size: int, query: dict[str, Any]) -> list[Any] | None:
        """One read of every page; None when the list changed between pages (its ``total`` or
        ``count`` moved, or a page went missing before the total was reached): items deleted
        meanwhile shift the later pages back, and an item read neither time was taken for
        missing (a task imported twice)."""
        items: list[Any] = []
        page, first_total = 1, None
        while True:
            try:
                answer = self.get(path, page=page, page_size=page_size, **query)
            except NotFound:
                if page == 1:
                    raise
                if isinstance(first_total, int) and len(items) < first_total:
                    return None  # fewer pages than the total said: items deleted meanwhile
                break  # past the last page
            if not isinstance(answer, dict):
                items.extend(answer or [])
                break
            total = answer.get("total", answer.get("count"))
            if page == 1:
                first_total = total
            elif total != first_total:
                return None
            chunk = answer.get(key, answer.get("results")) or []
            items.extend(chunk)
            if not chunk:
                break
            if "next" in answer:
                if not answer["next"]:
                    break
            elif isinstance(total, int) and len(items) >= total:
                break
            page += 1
        return items


WEBHOOK_MAX_BYTES = 1 << 20


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 <= length <= WEBHOOK_MAX_BYTES:  # an event is a few kB; it only wakes the collector
                raise ValueError(f"Content-Length {length}")
            event = json.loads(self.rfile.read(length) or b"{}")
            if not isinstance(event, dict):
                raise ValueError(f"expected a JSON object, got {type(event).__name__}")
        except (ValueError, RecursionError):
            self.send_response(400)
            self.end_headers()
            return
        self.server.owner.record(event)
        self.send_response(200)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (signature of the base)
        log.debug("webhook: " + format, *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: "WebhookReceiver"


class WebhookReceiver:
    """Receives Label Studio webhooks on ``host:port`` (0 = any free port) in a thread.

    ``url`` is what to register in Label Studio; ``wait(timeout)`` returns True when an
    annotation event arrived since the last call; ``task_ids`` holds the tasks they named.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, path: str = "/label-studio") -> None:
        self.path = path
        self._server = _Server((host, port), _Handler)
        self._server.owner = self
        self._event = threading.Event()
        self._lock = threading.Lock()
        self.task_ids: set[int] = set()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host if isinstance(host, str) else socket.gethostname()}:{port}{self.path}"

    def start(self) -> "WebhookReceiver":
        self._thread = threading.Thread(target=self._server.serve_forever, name="ls-webhook", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def record(self, event: dict[str, Any]) -> None:
        action = event.get("action")
        task = event.get("task") if isinstance(event.get("task"), dict) else {}
        log.debug("webhook %s for task %s", action, task.get("id"))
        if action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED"):
            with self._lock:
                if isinstance(task.get("id"), int):
                    self.task_ids.add(task["id"])
            self._event.set()

    def wait(self, timeout: float) -> bool:
        """True when an annotation event arrived (and clears it); False after ``timeout`` seconds."""
        got = self._event.wait(timeout)
        self._event.clear()
        return got

    def __enter__(self) -> "WebhookReceiver":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
