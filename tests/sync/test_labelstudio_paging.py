"""Paging of Label Studio lists against a small local HTTP server that pages as Label Studio does.

The real server caps the page size (projects at 100, tasks at ``TASK_API_PAGE_SIZE_MAX`` when an
admin sets it) and answers 404 for a page past the end; the project list is Django REST
framework's (``count``/``next``/``results``), the task list Label Studio's own (``total``/``tasks``,
no ``next``). A client that stopped at the first page shorter than it asked for missed the rest:
the backend then created a second project of the same title, or imported a task again.
"""
from __future__ import annotations

import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest

from review_contract import record
from sync.labelstudio import LabelStudioBackend, label_config
from sync.labelstudio_client import LabelStudioClient, NotFound
from sync.review import ReviewItem


class FakeLabelStudio:
    """Projects, tasks and a list without paging metadata, each page capped at ``cap`` items."""

    def __init__(self, cap: int = 100) -> None:
        self.cap = cap
        self.projects: list[dict[str, Any]] = []
        self.tasks: list[dict[str, Any]] = []  # of project 1
        self.plain = list(range(230))
        self.imports: list[list[dict[str, Any]]] = []
        self.posts: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def page(self, items: list[Any], query: dict[str, str]) -> tuple[list[Any], int] | None:
        """The requested page (capped) and its number; None past the end (Label Studio: 404)."""
        size = min(int(query.get("page_size", 30)), self.cap)
        number = int(query.get("page", 1))
        start = (number - 1) * size
        if number > 1 and start >= len(items):
            return None
        return items[start:start + size], number

    def answer(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any]:
        if method == "GET" and path == "/api/projects/":
            found = [p for p in self.projects if query.get("title", "").lower() in p["title"].lower()]
            got = self.page(found, query)
            if got is None:
                return 404, {"detail": "Invalid page."}
            chunk, number = got
            more = number * min(int(query.get("page_size", 30)), self.cap) < len(found)
            return 200, {"count": len(found), "previous": None, "results": chunk,
                         "next": f"{self.url}/api/projects/?page={number + 1}" if more else None}
        if method == "GET" and path == "/api/tasks/":
            got = self.page(self.tasks, query)
            if got is None:
                return 404, {"detail": "Invalid page."}
            return 200, {"total": len(self.tasks), "total_annotations": 0, "total_predictions": 0, "tasks": got[0]}
        if method == "GET" and path == "/api/plain/":
            got = self.page(self.plain, query)
            return (404, {"detail": "Invalid page."}) if got is None else (200, {"results": got[0]})
        if method == "GET" and path == "/api/storages/localfiles/":
            return 200, []
        if method == "POST":
            self.posts.append(path)
            if path == "/api/projects/":
                project = {"id": len(self.projects) + 1, **body}
                self.projects.append(project)
                return 201, project
            if path == "/api/projects/1/import":
                self.imports.append(body)
                self.tasks += [{"id": len(self.tasks) + n + 1, **t} for n, t in enumerate(body)]
                return 201, {"task_count": len(body)}
            if path == "/api/storages/localfiles/":
                return 201, {"id": 1, **body}
        return 404, {"detail": "Not found."}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(url.query))
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                code, answer = fake.answer(self.command, url.path, query, body)
                data = json.dumps(answer).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _serve  # noqa: N815 (http.server's naming)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        return Handler

    def __enter__(self) -> "FakeLabelStudio":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake() -> Iterator[FakeLabelStudio]:
    with FakeLabelStudio(cap=100) as server:
        yield server


def test_pages_follow_next_total_or_the_end_not_a_short_page(fake: FakeLabelStudio) -> None:
    fake.projects = [{"id": n, "title": f"p{n}"} for n in range(1, 251)]
    fake.tasks = [{"id": n, "data": {"image_id": f"img-{n}"}} for n in range(1, 206)]
    client = LabelStudioClient(fake.url, "token-123")
    assert [p["id"] for p in client.pages("/api/projects/", "results")] == list(range(1, 251))  # next link
    assert [t["id"] for t in client.pages("/api/tasks/", "tasks", project=1)] == list(range(1, 206))  # total
    assert client.pages("/api/plain/", "results") == fake.plain  # neither: until the 404 past the end
    fake.tasks = fake.tasks[:200]  # exactly two full pages: the total ends it, no third request needed
    assert len(client.pages("/api/tasks/", "tasks", page_size=100, project=1)) == 200
    fake.tasks = []
    assert client.pages("/api/tasks/", "tasks", project=1) == []
    with pytest.raises(NotFound):  # a 404 on the first page is no "past the end"
        client.pages("/api/nowhere/", "results")


def test_existing_tasks_on_later_pages_are_not_imported_again(fake: FakeLabelStudio, tmp_path: Path) -> None:
    """A retried submit (a crash after the import, before the journal row) with 150 tasks in the
    project: only the image without a task is imported."""
    title = "edge review"
    fake.projects = [{"id": 1, "title": title, "label_config": label_config()}]
    fake.projects += [{"id": n, "title": f"{title} old {n}", "label_config": ""} for n in range(2, 131)]
    fake.projects.append(fake.projects.pop(0))  # the exact title only on the second page
    rec = record()
    items = [ReviewItem(f"img-{n}", rec["width"], rec["height"], rec, "bundle-7", local_path=tmp_path / f"{n}.jpg")
             for n in range(151)]
    backend = LabelStudioBackend(LabelStudioClient(fake.url, "token-123"), title, tmp_path)
    fake.tasks = [{"id": n + 1, **backend.task("b-1", item, 1)} for n, item in enumerate(items[:150])]
    backend.submit("b-1", items)
    assert backend.project_id == 1 and "/api/projects/" not in fake.posts  # found, not created twice
    assert [[t["data"]["image_id"] for t in chunk] for chunk in fake.imports] == [["img-150"]]
    backend.submit("b-1", items)
    assert len(fake.imports) == 1 and len(fake.tasks) == 151


class RawServer:
    """Answers every request with the same raw bytes, then closes the connection."""

    def __init__(self, answer: bytes) -> None:
        import socket

        self.answer = answer
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(5)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(self.answer)

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("answer, words", [
    # the connection dropped after 8 of 100 bytes: http.client.IncompleteRead, not an OSError
    (b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"id": 1', "IncompleteRead"),
    # a proxy's (or a starting server's) page with status 200
    (b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 38\r\n\r\n<html><body>Bad Gateway</body></html>\n",
     "not JSON"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n\xff\xfe\xfd\xfc", "not JSON"),
    # a 502 whose error page is cut short
    (b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 100\r\n\r\n<html>", "HTTP 502"),
    # no status line at all: http.client.RemoteDisconnected
    (b"", "Remote end closed"),
])
def test_cut_short_and_non_json_answers_are_retryable(answer: bytes, words: str) -> None:
    from sync.errors import RetryableError

    server = RawServer(answer)
    try:
        client = LabelStudioClient(server.url, "secret-token", timeout=5)
        with pytest.raises(RetryableError, match=words) as info:
            client.get("/api/projects/")
        assert "secret-token" not in str(info.value)
        with pytest.raises(RetryableError):
            client.pages("/api/tasks/", "tasks")
    finally:
        server.close()
