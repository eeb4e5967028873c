"""A misbehaving Label Studio server and connection, through a fault-injecting proxy.

A small loopback HTTP proxy (``FaultProxy``) forwards to the real server (``ls_server``, one per
session) and, per request, answers a status of its own (a reverse proxy's 502, a 429, a 401 of
a revoked token), an HTML page, drops the connection, holds the request (a slow server: the
client times out while the server still works), or forwards it and then loses the answer.
Expected: every image submitted once (no duplicate task after a retry of the import), no image
lost, a transient fault retried with a backoff, a rejected token said with its setting, and the
uploads never stopped by the review server.
"""
from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

import lsserver
from reviewdata import fill_store
from sync.agent import Agent
from sync.errors import RetryableError
from sync.labelstudio import LabelStudioBackend
from sync.labelstudio_client import LabelStudioClient
from sync.objectstore import LocalFolderStore
from sync.submit import ReviewSubmitTask
from sync.uploader import Uploader, UploadSettings

# A rule sees (method, path without query, query dict, body bytes) and returns None (forward) or
# an action: ("status", code, body), ("drop",), ("late", seconds) forward after a pause,
# ("lose", code) forward then answer ``code`` instead, ("body", bytes) forward a changed body.
Rule = Callable[[str, str, dict[str, list[str]], bytes], Any]


class _ProxyHandler(BaseHTTPRequestHandler):
    server: "_ProxyServer"
    protocol_version = "HTTP/1.1"

    def _forward(self, method: str, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        up = urllib.parse.urlsplit(self.server.owner.upstream)
        conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection", "content-length")}
        conn.request(method, self.path, body=body or None, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, [(k, v) for k, v in resp.getheaders()
                             if k.lower() not in ("transfer-encoding", "connection", "content-length")], data

    def _answer(self, code: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def _handle(self) -> None:
        method = self.command
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        parts = urllib.parse.urlsplit(self.path)
        owner = self.server.owner
        action = owner.decide(method, parts.path, urllib.parse.parse_qs(parts.query), body)
        try:
            if action is None:
                self._answer(*self._forward(method, body))
            elif action[0] == "status":
                self._answer(action[1], [("Content-Type", "text/html")], action[2])
            elif action[0] == "drop":
                self.close_connection = True
            elif action[0] == "late":
                time.sleep(action[1])
                self._answer(*self._forward(method, body))
            elif action[0] == "lose":
                self._forward(method, body)
                self._answer(action[1], [("Content-Type", "text/html")], b"<html>502 Bad Gateway</html>")
            elif action[0] == "body":
                self._answer(*self._forward(method, action[1]))
        except (BrokenPipeError, ConnectionResetError):
            pass

    do_GET = do_POST = do_PATCH = do_DELETE = _handle  # noqa: N815 (http.server's naming)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    owner: "FaultProxy"


class FaultProxy:
    """``url`` forwards to ``upstream``; ``rules`` (first answer that is not None wins) inject faults;
    ``seen`` lists every (method, path) it received."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.rules: list[Rule] = []
        self.seen: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server = _ProxyServer(("127.0.0.1", 0), _ProxyHandler)
        self._server.owner = self
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def decide(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> Any:
        with self._lock:
            self.seen.append((method, path))
            rules = list(self.rules)
        for rule in rules:
            action = rule(method, path, query, body)
            if action is not None:
                return action
        return None

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def once(match: Callable[[str, str], bool], action: Any) -> Rule:
    """A rule that answers ``action`` to the first request ``match`` accepts, then forwards."""
    done = []

    def rule(method: str, path: str, query: Any, body: bytes) -> Any:
        if not done and match(method, path):
            done.append(1)
            return action(body) if callable(action) else action
        return None
    return rule


def is_import(method: str, path: str) -> bool:
    return method == "POST" and path.endswith("/import")


class World:
    """Store -> uploader -> review submit, talking to Label Studio through a ``FaultProxy``."""

    def __init__(self, server: lsserver.LabelStudioServer, tmp_path: Path, images: int = 3,
                 timeout: float = 30.0) -> None:
        self.proxy = FaultProxy(server.url)
        self.direct = LabelStudioClient(server.url, server.token)
        self.client = LabelStudioClient(self.proxy.url, server.token, timeout=timeout)
        self.store, self.ids, _ = fill_store(server.document_root / f"store-{uuid.uuid4().hex[:8]}", review=images)
        self.uploader = Uploader(self.store, LocalFolderStore(tmp_path / "outbox"), UploadSettings("box-1", batch_size=3))
        self.backend = LabelStudioBackend(self.client, f"faults {uuid.uuid4().hex[:8]}", server.document_root)
        self.now = [0.0]
        self.submit = ReviewSubmitTask(self.uploader.journal, self.store, self.uploader.target, self.backend,
                                       clock=lambda: self.now[0])

    def upload(self) -> None:
        while self.uploader.run_once():
            pass

    def tasks(self) -> list[dict[str, Any]]:
        assert self.backend.project_id is not None
        return self.direct.pages("/api/tasks/", "tasks", project=self.backend.project_id)

    def per_image(self) -> Counter[str]:
        return Counter(str(t["data"]["image_id"]) for t in self.tasks())

    def close(self) -> None:
        self.proxy.stop()
        lsserver.close_all(self.uploader, self.store)


@pytest.fixture
def world(ls_server: lsserver.LabelStudioServer, tmp_path: Path) -> Iterator[World]:
    yield from lsserver.opened(World(ls_server, tmp_path))


def wait_for(check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_an_import_whose_answer_was_lost_is_not_repeated(world: World) -> None:
    """The server imported the tasks, the proxy answered 502: the retry finds them."""
    world.upload()
    world.proxy.rules.append(once(is_import, ("lose", 502)))
    with pytest.raises(RetryableError, match="HTTP 502"):
        world.submit.run_once()
    assert world.per_image() == Counter({i: 1 for i in world.ids})  # the server did import them
    world.now[0] += 1000
    assert world.submit.run_once()
    assert world.per_image() == Counter({i: 1 for i in world.ids})
    assert world.uploader.journal.unsubmitted_batches(world.backend.name) == []


def test_an_import_the_server_finishes_after_the_client_gave_up_leaves_one_task_per_image(
        ls_server: lsserver.LabelStudioServer, tmp_path: Path) -> None:
    """A slow server: the client times out while the import is still on its way; the retry
    imports again (the tasks are not there yet), then the first import lands. Was: two tasks
    per image for ever, each reviewed twice; now the next listing deletes the untouched extras."""
    w = World(ls_server, tmp_path, timeout=4.0)
    try:
        w.upload()
        w.proxy.rules.append(once(is_import, ("late", 8.0)))
        with pytest.raises(RetryableError, match="timed out"):
            w.submit.run_once()
        w.now[0] += 1000
        assert w.submit.run_once()  # imported again: nothing was there yet
        wait_for(lambda: sum(w.per_image().values()) == 2 * len(w.ids))  # the late import landed
        w.now[0] += 1000  # the reconcile lists the project's tasks
        w.submit.run_once()
        assert w.per_image() == Counter({i: 1 for i in w.ids})
    finally:
        w.close()


FAULTS = {
    "401 revoked token": ("status", 401, b'{"detail": "Invalid token."}'),
    "403 no access": ("status", 403, b'{"detail": "You do not have permission to perform this action."}'),
    "502 proxy": ("status", 502, b"<html><body><h1>502 Bad Gateway</h1></body></html>"),
    "503 proxy": ("status", 503, b"<html>Service Unavailable</html>"),
    "429": ("status", 429, b'{"detail": "Request was throttled."}'),
    "HTML 200": ("status", 200, b"<!DOCTYPE html><html>Label Studio is starting</html>"),
    "down": ("drop",),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_failing_server_never_stops_the_agent_is_tried_with_a_backoff_and_recovers(
        world: World, fault: str) -> None:
    """Uploads go on; the review submit fails, says what is wrong, is not asked again at every
    pass (was: each pass, and a 401/403 was a PermanentError that ended the agent: under
    systemd a restart loop that ends in a dead unit, uploads stopped); once the server answers
    again every image gets exactly one task."""
    world.proxy.rules.append(lambda *_: FAULTS[fault])
    agent = Agent([world.uploader, world.submit], poll_interval=0.01, fault_base=0.0)
    agent.run_pass()  # uploads the batch, the submit fails
    error = str(agent.last_error)
    assert world.proxy.url in error or "127.0.0.1" in error, error
    if fault.startswith(("401", "403")):
        assert "sync.review.labelstudio" in error and "ANNOTATOR_LABEL_STUDIO_TOKEN" in error, error
    assert world.uploader.journal.unsubmitted_batches(world.backend.name)  # nothing marked
    tries = len(world.proxy.seen)
    for _ in range(5):
        agent.run_pass()
    assert len(world.proxy.seen) == tries, "asked again at every pass, without a wait"
    world.proxy.rules.clear()
    world.now[0] += 1000
    while agent.run_pass():
        pass
    assert agent.last_error is None
    assert world.per_image() == Counter({i: 1 for i in world.ids})
    assert world.uploader.journal.unsubmitted_batches(world.backend.name) == []


def test_an_import_that_makes_fewer_tasks_than_sent_is_completed_at_the_next_pass(
        ls_server: lsserver.LabelStudioServer, tmp_path: Path) -> None:
    """The import answers 201 with fewer tasks than sent (the proxy drops one on the way): the
    batch was marked submitted and the image waited for the next reconcile, ten minutes later."""
    w = World(ls_server, tmp_path, images=5)  # batches of 3 and 2
    try:
        assert w.uploader.run_once()
        assert w.submit.run_once()  # the first batch, then the start's reconcile: the next is 600 s away
        assert not w.submit.run_once()
        assert w.uploader.run_once()

        def fewer(body: bytes) -> Any:
            return ("body", json.dumps(json.loads(body)[:-1]).encode())
        w.proxy.rules.append(once(is_import, fewer))
        try:
            w.submit.run_once()
        except RetryableError as exc:
            assert "1 tasks made of 2" in str(exc)
        w.now[0] += 30
        while w.submit.run_once():
            pass
        assert w.per_image() == Counter({i: 1 for i in w.ids})
        assert w.uploader.journal.unsubmitted_batches(w.backend.name) == []
    finally:
        w.close()


def test_a_task_list_that_changes_between_pages_is_read_again(world: World) -> None:
    """A task deleted while the list is paged shifts the later pages back: the task that moved
    onto the page already read was missed (and the import then made it a second time)."""
    world.upload()
    world.submit.run_once()
    ids = [t["id"] for t in world.tasks()]
    assert len(ids) == 3

    def delete_first(method: str, path: str, query: dict[str, list[str]], body: bytes) -> Any:
        if path == "/api/tasks/" and query.get("page") == ["2"] and ids[0] not in deleted:
            deleted.append(ids[0])
            world.direct.delete(f"/api/tasks/{ids[0]}/")
        return None
    deleted: list[int] = []
    world.proxy.rules.append(delete_first)
    got = world.client.pages("/api/tasks/", "tasks", page_size=1, project=world.backend.project_id)
    assert sorted(t["id"] for t in got) == ids[1:]




def test_a_hanging_server_is_not_waited_for_at_every_collection(ls_server: lsserver.LabelStudioServer,
                                                                tmp_path: Path) -> None:
    """The export hangs until the client's timeout: the next collections within the backoff
    raise at once, without a request (was: each collection held the agent for the timeout),
    and the reviews are collected once the server answers."""
    w = World(ls_server, tmp_path, timeout=1.0)
    try:
        w.upload()
        assert w.submit.run_once()
        w.backend.clock = lambda: w.now[0]
        w.proxy.rules.append(lambda m, path, *_: ("late", 3.0) if path.endswith("/export") else None)
        with pytest.raises(RetryableError, match=r"127\.0\.0\.1.*export.*timed out"):
            list(w.backend.collect())
        seen = len(w.proxy.seen)
        started = time.monotonic()
        for _ in range(3):
            with pytest.raises(RetryableError, match="timed out"):
                list(w.backend.collect())
        assert len(w.proxy.seen) == seen and time.monotonic() - started < 0.5
        w.proxy.rules.clear()
        w.now[0] += 1000
        assert list(w.backend.collect()) == []  # answers again (nothing reviewed yet)
    finally:
        w.close()


def test_duplicate_cleanup_keeps_drafts_and_tasks_without_an_image_id(world: World) -> None:
    """The duplicate cleanup deleted every untouched extra task: a task with a reviewer's saved
    draft (the task list carries no other reviewer's drafts), and tasks a person imported by hand
    without an image id (all grouped as "None") (review pass's finding)."""
    w = world
    w.upload()
    assert w.submit.run_once()
    pid = w.backend.project_id
    first = {str(t["data"]["image_id"]): t for t in w.tasks()}
    drafted, plain = w.ids[0], w.ids[1]
    for image_id in (drafted, plain):  # imported again: a retry after a lost answer
        w.direct.post(f"/api/projects/{pid}/import", [{"data": dict(first[image_id]["data"])}])
    w.direct.post(f"/api/projects/{pid}/import", [{"data": {"image": "/data/local-files/?d=x.jpg"}},
                                                  {"data": {"image": "/data/local-files/?d=y.jpg"}}])
    dup = max(t["id"] for t in w.tasks() if str(t["data"].get("image_id")) == drafted)
    w.direct.post(f"/api/tasks/{dup}/drafts", {"result": [], "lead_time": 5.0})  # a reviewer saved a draft
    w.backend.missing(w.ids)  # lists the project's tasks: the cleanup
    counts = Counter(str(t["data"].get("image_id")) for t in w.tasks())
    assert counts[drafted] == 2 and counts[plain] == 1  # the draft kept, the untouched extra deleted
    assert counts["None"] == 2  # hand-imported tasks are not ours to delete
