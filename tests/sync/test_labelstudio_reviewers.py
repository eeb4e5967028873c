"""What real reviewers (and admins) do in Label Studio over weeks, against the real server.

A reviewer corrects an annotation after it was merged; several annotators answer one task;
a reviewer skips; a new bundle's tasks are shown without their pre-annotation; the server is
killed and started again (same data dir, same port) in the middle of the agent's submit and
collect; an admin edits the project's labelling config. Each uses its own project on the
session's server (``ls_server``); the restart test restarts that server on its own port.
"""
from __future__ import annotations

import copy
import logging
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

import pytest

import lsserver
from reviewdata import fill_store
from service.store import REVIEWED, UPLOADED
from sync.agent import Agent
from sync.dataset import Dataset
from sync.errors import RetryableError
from sync.labelstudio import LabelStudioBackend, label_config
from sync.labelstudio_client import LabelStudioClient
from sync.merge import Merger, MergeTask
from sync.objectstore import LocalFolderStore
from sync.review import ReviewItem
from sync.submit import ReviewSubmitTask
from sync.uploader import Uploader, UploadSettings


class Box:
    """Store -> uploader -> review submit -> Label Studio -> merge into a dataset (one process)."""

    def __init__(self, server: lsserver.LabelStudioServer, tmp_path: Path, images: int = 2,
                 batch_size: int = 10) -> None:
        self.server = server
        self.client = LabelStudioClient(server.url, server.token, timeout=20.0)
        self.store, self.ids, _ = fill_store(server.document_root / f"store-{uuid.uuid4().hex[:8]}", review=images)
        self.uploader = Uploader(self.store, LocalFolderStore(tmp_path / "outbox"),
                                 UploadSettings("box-1", batch_size=batch_size))
        self.title = f"reviewers {uuid.uuid4().hex[:8]}"
        self.dataset = Dataset(tmp_path / "dataset", holdout_fraction=0.0)
        self.now = [0.0]
        self.pid: int | None = None  # the project's id, also while a new process has not found it yet
        self.start()

    def start(self) -> None:
        """A new sync process: a fresh backend, submit and merge task."""
        self.backend = LabelStudioBackend(self.client, self.title, self.server.document_root)
        self.backend.clock = lambda: self.now[0]
        self.submit = ReviewSubmitTask(self.uploader.journal, self.store, self.uploader.target, self.backend,
                                       clock=lambda: self.now[0])
        self.merge = MergeTask(Merger(self.store, self.dataset), self.backend.collect, on_report=self.backend.merged)

    def send(self) -> None:
        while self.uploader.run_once():
            pass
        while self.submit.run_once():
            pass

    def tasks(self) -> dict[str, dict[str, Any]]:
        """The project's tasks by image id (each image must have one)."""
        if self.backend.project_id is not None:
            self.pid = self.backend.project_id
        tasks = self.client.pages("/api/tasks/", "tasks", project=self.pid)
        counts = Counter(str(t["data"]["image_id"]) for t in tasks)
        assert all(n == 1 for n in counts.values()), counts
        return {str(t["data"]["image_id"]): self.client.get(f"/api/tasks/{t['id']}/") for t in tasks}

    def annotate(self, image_id: str, head_dx: float = 0.0, user: int | None = None,
                 cancelled: bool = False, result: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """A reviewer's submit: the prediction with the head box moved ``head_dx`` percent."""
        task = self.tasks()[image_id]
        pred = task["predictions"][0]
        if result is None:
            result = [] if cancelled else moved(pred["result"], head_dx)
        body: dict[str, Any] = {"result": result, "was_cancelled": cancelled, "lead_time": 3.0,
                                "parent_prediction": pred["id"]}
        if user is not None:
            body["completed_by"] = user
        return self.client.post(f"/api/tasks/{task['id']}/annotations/", body)

    def head_x(self, image_id: str) -> float | None:
        """The dataset's reviewed head box x1 of an image (None: no reviewed label)."""
        entry = self.dataset.get(image_id)
        if entry is None or entry.origin != "reviewed":
            return None
        return float(entry.label["heads"][0][0]) if entry.label["heads"] else -1.0

    def close(self) -> None:
        self.uploader.close()
        self.dataset.close()
        self.store.close()


def moved(result: list[dict[str, Any]], dx: float) -> list[dict[str, Any]]:
    out = copy.deepcopy(result)
    for item in out:
        if item["id"] == "h0":
            item["value"]["x"] += dx
    return out


def pred_head_x(box: Box) -> float:
    """The auto (pre-annotation) head box x1, pixels: the record's."""
    row = box.store.get(box.ids[0])
    assert row is not None and row.record is not None
    return float(row.record["heads"][0]["box"][0])


@pytest.fixture
def box(ls_server: lsserver.LabelStudioServer, tmp_path: Path) -> Iterator[Box]:
    b = Box(ls_server, tmp_path)
    yield b
    b.close()


def second_user(client: LabelStudioClient) -> int:
    """Another annotator of the organisation (made once per server)."""
    for user in client.get("/api/users/"):
        if user.get("email") == "second@example.com":
            return int(user["id"])
    made = client.post("/api/users/", {"email": "second@example.com", "username": "second",
                                       "password": "second-pass-1"})
    return int(made["id"])


def messages(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= level and r.name.startswith("sync")]


# (1) a correction after the merge ---------------------------------------------------------

def test_a_correction_after_the_merge_wins_and_is_said(box: Box, caplog: pytest.LogCaptureFixture) -> None:
    """The reviewer fixes the head box the next day: the correction replaces the merged label
    (the dataset trains on it), once, and the log says it replaced the earlier review. Was:
    merged with the same line as a first review, and every later pass logged every review ever
    merged as "reviewed label merged" again although nothing changed."""
    caplog.set_level(logging.INFO)
    image = box.ids[0]
    box.send()
    first = box.annotate(image, head_dx=5.0)
    assert box.merge.run_once()
    x1 = box.head_x(image)
    assert x1 is not None and x1 == pytest.approx(pred_head_x(box) + 0.05 * 64, abs=0.01)
    caplog.clear()
    assert not box.merge.run_once()  # nothing new: not merged again, and not said to be
    assert not [m for m in messages(caplog) if "merged" in m], messages(caplog)
    time.sleep(0.01)
    box.client.patch(f"/api/annotations/{first['id']}/", {"result": moved(box.tasks()[image]["predictions"][0]["result"], 20.0)})
    assert box.merge.run_once()
    assert box.head_x(image) == pytest.approx(pred_head_x(box) + 0.20 * 64, abs=0.01)  # the correction wins
    said = [m for m in messages(caplog) if image[:12] in m and "replaces" in m]
    assert len(said) == 1, messages(caplog)
    caplog.clear()
    assert not box.merge.run_once()
    assert box.head_x(image) == pytest.approx(pred_head_x(box) + 0.20 * 64, abs=0.01)
    assert not [m for m in messages(caplog) if "merged" in m or "replaces" in m], messages(caplog)


# (2) several annotators on one task -------------------------------------------------------

def test_several_annotations_of_a_task_are_said_and_a_ground_truth_mark_decides(
        box: Box, caplog: pytest.LogCaptureFixture) -> None:
    """Two annotators answer one task differently. The latest is merged (a deterministic rule)
    and the disagreement is said once (``conflicts``, a warning naming both); an annotation
    marked ground truth in Label Studio (the star: how a manager picks one) wins over a later
    one. Was: the latest taken without a word, the ground-truth mark ignored."""
    caplog.set_level(logging.INFO)
    other = second_user(box.client)
    image = box.ids[0]
    box.send()
    mine = box.annotate(image, head_dx=5.0)
    time.sleep(0.01)
    box.annotate(image, head_dx=15.0, user=other)  # the later one
    assert box.merge.run_once()
    assert box.head_x(image) == pytest.approx(pred_head_x(box) + 0.15 * 64, abs=0.01)
    assert image in box.backend.conflicts
    said = [m for m in messages(caplog, logging.WARNING) if image[:12] in m and "2 annotations" in m]
    assert len(said) == 1 and "second@example.com" in said[0] and "ground truth" in said[0], messages(caplog)
    caplog.clear()
    box.merge.run_once()
    assert not [m for m in messages(caplog, logging.WARNING) if "2 annotations" in m]  # said once
    # a manager marks the first (earlier) one as the ground truth: it wins from now on
    box.client.patch(f"/api/annotations/{mine['id']}/", {"ground_truth": True})
    time.sleep(0.01)
    later = [a for a in box.tasks()[image]["annotations"] if a["id"] != mine["id"]][0]
    box.client.patch(f"/api/annotations/{later['id']}/", {"result": moved(box.tasks()[image]["predictions"][0]["result"], 25.0)})
    box.merge.run_once()
    assert box.head_x(image) == pytest.approx(pred_head_x(box) + 0.05 * 64, abs=0.01)
    assert image not in box.backend.conflicts  # decided


# (3) skipped, deleted ---------------------------------------------------------------------

def test_a_skipped_task_is_said_and_keeps_its_image_waiting(box: Box, caplog: pytest.LogCaptureFixture) -> None:
    """A reviewer skips (a cancelled annotation): nothing is merged, the image still waits for
    a review, and the log says so once. Was: silent, the image waited for ever unexplained."""
    caplog.set_level(logging.INFO)
    image, kept = box.ids
    box.send()
    box.annotate(image, cancelled=True)
    for _ in range(2):
        assert not box.merge.run_once()
    assert box.store.get(image).state == UPLOADED  # type: ignore[union-attr]
    said = [m for m in messages(caplog) if image[:12] in m and "skipped" in m]
    assert len(said) == 1 and lsserver.USER in said[0], messages(caplog)
    # skipped after another review was merged: the merged label stays
    box.annotate(kept, head_dx=5.0)
    assert box.merge.run_once()
    box.annotate(kept, cancelled=True)
    assert not box.merge.run_once()
    assert box.head_x(kept) == pytest.approx(pred_head_x(box) + 0.05 * 64, abs=0.01)
    assert box.store.get(kept).state == REVIEWED  # type: ignore[union-attr]


# (4) an empty answer, and the pre-annotation a reviewer sees -------------------------------

def test_tasks_of_a_new_bundle_show_their_pre_annotation_in_the_label_stream(box: Box) -> None:
    """Label Studio sets the project's ``model_version`` from the first import and its label
    stream (``/next``, "Label All Tasks") shows only predictions of that version: once the
    box pulled a new bundle, every new task opened with an empty image (a reviewer who then
    submits nothing merges "no head, no person"). Now every task shows its pre-annotation;
    the bundle stays in the task's data."""
    box.send()
    first = box.ids[0]
    row = box.store.get(box.ids[1])
    assert row is not None and row.record is not None
    new_bundle = ReviewItem(box.ids[1], 64, 48, {**row.record, "bundle_id": "bundle-2"}, "bundle-2",
                            local_path=box.store.image_path(box.ids[1]))
    # the second image, as if pre-labelled by the next bundle: a task of its own in the project
    box.client.delete(f"/api/tasks/{box.tasks()[box.ids[1]]['id']}/")
    box.backend.submit("later", [new_bundle])
    pid = box.backend.project_id
    box.annotate(first, cancelled=True)  # the first task done: the stream gives the new one
    task = box.client.get(f"/api/projects/{pid}/next/")
    assert task["data"]["image_id"] == box.ids[1] and task["data"]["bundle_id"] == "bundle-2"
    assert len(task["predictions"]) == 1, "the reviewer sees the new bundle's task without its pre-annotation"
    # an empty submit is a reviewer who removed every region: merged as "nobody in the image"
    box.annotate(box.ids[1], result=[])
    box.merge.run_once()
    entry = box.dataset.get(box.ids[1])
    assert entry is not None and entry.origin == "reviewed" and entry.label["persons"] == [] and entry.label["heads"] == []


# (5) the server killed and started again --------------------------------------------------

def restart(server: lsserver.LabelStudioServer, down: Callable[[], None] = lambda: None) -> None:
    """Kill the server (SIGKILL: no clean shutdown), run ``down`` while it is down, start it
    again on the same data dir and port, wait until it is healthy."""
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    down()
    base = server.document_root.parent
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(base / "home"),
           "LABEL_STUDIO_BASE_DATA_DIR": str(base / "data"),
           "LABEL_STUDIO_USERNAME": lsserver.USER, "LABEL_STUDIO_PASSWORD": lsserver.PASSWORD,
           "LABEL_STUDIO_USER_TOKEN": lsserver.TOKEN, "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
           "LOCAL_FILES_SERVING_ENABLED": "true", "LOCAL_FILES_DOCUMENT_ROOT": str(server.document_root),
           "SSRF_PROTECTION_ENABLED": "false", "LATEST_VERSION_CHECK": "false", "SENTRY_DSN": "",
           "FRONTEND_SENTRY_DSN": "", "COLLECT_ANALYTICS": "false", "SECRET_KEY": "edge-tests-only"}
    port = urlsplit(server.url).port
    with open(server.log_path, "ab") as log, open(os.devnull, "rb") as stdin:
        server.proc = subprocess.Popen([str(lsserver.LS_BIN), "start", "--no-browser", "--internal-host", "127.0.0.1",
                                        "--port", str(port)], env=env, cwd=base, stdin=stdin, stdout=log,
                                       stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        assert server.proc.poll() is None and time.monotonic() < deadline, server.log_path.read_text()[-2000:]
        time.sleep(0.3)


class KillDuring:
    """Wraps a client's ``request``: the first request that ``match`` accepts kills the server
    ``delay`` seconds after it was sent (the server is working on it)."""

    def __init__(self, client: LabelStudioClient, server: lsserver.LabelStudioServer,
                 match: Callable[[str, str], bool], delay: float) -> None:
        self.server, self.match, self.delay, self.fired = server, match, delay, False
        self._request = client.request
        client.request = self  # type: ignore[method-assign]

    def __call__(self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None) -> Any:
        if not self.fired and self.match(method, path):
            self.fired = True
            proc = self.server.proc
            threading.Timer(self.delay, lambda: proc.poll() is None and proc.send_signal(signal.SIGKILL)).start()
        return self._request(method, path, body, query)


def test_the_server_killed_and_started_again_mid_submit_and_mid_collect(
        ls_server: lsserver.LabelStudioServer, tmp_path: Path) -> None:
    """Label Studio killed while it imports a batch, and again while it exports: nothing is
    submitted twice or lost, and the agent (uploads, submit, merge) goes on by itself."""
    box = Box(ls_server, tmp_path, images=10, batch_size=10)
    try:
        while box.uploader.run_once():
            pass
        KillDuring(box.client, ls_server, lambda m, p: m == "POST" and p.endswith("/import"), 0.15)
        agent = Agent([box.uploader, box.submit, box.merge], poll_interval=0.01, fault_base=0.0)
        agent.run_pass()
        assert isinstance(agent.last_error, RetryableError), agent.last_error
        for _ in range(3):  # down: every pass fails quietly, the agent goes on
            agent.run_pass()
        restart(ls_server)
        box.now[0] += 1000
        for _ in range(4):
            agent.run_pass()
            box.now[0] += 1000
        assert agent.last_error is None, agent.last_error
        tasks = box.tasks()  # one task per image
        assert set(tasks) == set(box.ids)
        assert all(len(t["predictions"]) == 1 for t in tasks.values())
        assert box.uploader.journal.unsubmitted_batches(box.backend.name) == []
        for image in box.ids:
            box.annotate(image, head_dx=5.0)
        KillDuring(box.client, ls_server, lambda m, p: m == "GET" and p.endswith("/export"), 0.05)
        with pytest.raises(RetryableError):
            box.merge.run_once()
        restart(ls_server)
        box.now[0] += 1000
        for _ in range(3):
            agent.run_pass()
            box.now[0] += 1000
        assert agent.last_error is None, agent.last_error
        assert all(box.store.get(i).state == REVIEWED for i in box.ids)  # type: ignore[union-attr]
        assert len(box.tasks()) == len(box.ids)
    finally:
        if ls_server.proc.poll() is not None:  # leave the session's server up for the other tests
            restart(ls_server)
        box.close()


# (6) an admin edits the project --------------------------------------------------------------

def test_an_edited_labelling_config_is_said_and_stops_only_the_review_tasks(
        ls_server: lsserver.LabelStudioServer, tmp_path: Path) -> None:
    """An admin renames the box control and a reviewer annotates with it. Was: the running
    agent refused every such review with "unexpected 'rectanglelabels' from 'boxes'", and the
    next start's config update was refused by Label Studio (HTTP 400, annotations use it): a
    ``PermanentError`` that ended ``annotator sync``, uploads and model pulls with it. Now
    the review tasks say what was edited and wait (a retryable error); uploads go on."""
    box = Box(ls_server, tmp_path, images=2, batch_size=1)
    try:
        assert box.uploader.run_once()  # the first image only
        while box.submit.run_once():
            pass
        pid = box.backend.project_id
        edited = label_config().replace('name="box"', 'name="boxes"')
        box.client.patch(f"/api/projects/{pid}/", {"label_config": edited})
        result = box.tasks()[box.ids[0]]["predictions"][0]["result"]
        box.annotate(box.ids[0], result=[{**r, "from_name": "boxes"} if r["from_name"] == "box" else r
                                         for r in result])
        with pytest.raises(RetryableError, match=r"labelling config.*edited"):
            box.merge.run_once()  # the running agent notices
        box.start()  # a new process
        agent = Agent([box.uploader, box.submit, box.merge], poll_interval=0.01, fault_base=0.0)
        box.now[0] += 1000
        agent.run_pass()  # was: PermanentError out of run_pass (the agent ended)
        assert isinstance(agent.last_error, RetryableError) and "edited" in str(agent.last_error), agent.last_error
        assert box.store.get(box.ids[1]).state == UPLOADED  # type: ignore[union-attr]  # the uploads went on
        # the admin puts the config back: reviews flow again
        box.client.delete(f"/api/annotations/{box.tasks()[box.ids[0]]['annotations'][0]['id']}/")
        box.client.patch(f"/api/projects/{pid}/", {"label_config": label_config()})
        box.annotate(box.ids[0], head_dx=5.0)
        for _ in range(3):
            box.now[0] += 1000
            agent.run_pass()
        assert agent.last_error is None, agent.last_error
        assert box.store.get(box.ids[0]).state == REVIEWED  # type: ignore[union-attr]
        assert set(box.tasks()) == set(box.ids)
    finally:
        box.close()
