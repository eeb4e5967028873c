"""A team of appliances on one review project: several boxes, each with its own store and
``appliance_id``, share one bucket and one Label Studio project (``project_title``), and so the
server's one document root and its ``label-studio-jpeg/<project id>/`` copies.

Against the real Label Studio server on loopback (``ls_server``), each box an agent built from
its own config by ``build_agent``, as ``annotator sync`` builds it. What a box sends is reviewed
once: an image two boxes captured (the same bytes, the same id) gets one task, and its review
merges on both; a box leaves the reviews of another's images alone.

A box writes a batch's browser-safe copies (a PGM, a 16-bit TIFF) before it imports their tasks;
another box's collection in between found copies no task linked and removed them, so that every
such task showed the reviewers no image, for good (all 400 of a second box's PGM frames, with the
first box's agent running). Now a box removes at once only the unlinked copies of its own images.
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import lsserver
from review_contract import record
from reviewdata import make_jpeg
from service.store import REVIEWED, Store
from sync.agent import build_agent
from sync.config import load_sync_config
from sync.dataset import Dataset
from sync.labelstudio import LabelStudioBackend
from sync.labelstudio_client import LabelStudioClient
from sync.merge import Merger
from sync.merge import MergeTask
from sync.submit import ReviewSubmitTask
from test_labelstudio_formats import JPEG, _pixels
from test_merge import _reviewed


class Box:
    """One appliance: a store under the document root holding ``images`` (review-pending), and
    the agent its config builds (upload, review-submit, merge tasks), run task by task."""

    def __init__(self, server: lsserver.LabelStudioServer, team: Path, title: str, name: str,
                 images: list[bytes]) -> None:
        root = server.document_root / team.name / name / "store"
        store = Store(root)
        self.ids = []
        for n, data in enumerate(images):
            image_id, _ = store.ingest(data, f"drop/{n}")
            (row,) = store.claim("test-worker", 1)
            store.complete(row.image_id, "test-worker", record(persons=1), "bundle-7", "review", 0.4,
                           ["kpt_near_threshold"], audit=False)
            self.ids.append(image_id)
        store.close()
        config = team / f"{name}.toml"
        config.write_text(f"""
[store]
root = "{root}"
[sync]
appliance_id = "{name}"
retry_base = 0.01
[sync.target]
kind = "local"
root = "{team / 'bucket'}"
[sync.review]
kind = "labelstudio"
[sync.review.labelstudio]
url = "{server.url}"
token = "{server.token}"
project_title = "{title}"
document_root = "{server.document_root}"
""")
        self.agent = build_agent(load_sync_config(config, env={}), env={})
        self.upload = self.agent.tasks[0]
        self.submit = next(t for t in self.agent.tasks if isinstance(t, ReviewSubmitTask))
        self.merge: MergeTask = next(getattr(t, "task", t) for t in self.agent.tasks if t.name == "merge")
        self.backend: Any = self.submit.backend
        self.store: Store = self.submit.store

    def send(self) -> None:
        """Upload and submit until nothing is left."""
        while self.upload.run_once() | self.submit.run_once():
            pass

    def close(self) -> None:
        self.agent.close()


def linked(server: lsserver.LabelStudioServer, task: dict[str, Any]) -> Path:
    return server.document_root / unquote(task["data"]["image"].split("?d=", 1)[1])


def test_a_box_leaves_the_copies_another_box_imports_and_shares_the_reviews(
        ls_server: lsserver.LabelStudioServer, tmp_path: Path) -> None:
    team = tmp_path / f"team-{uuid.uuid4().hex[:8]}"
    team.mkdir()
    title = f"team review {uuid.uuid4().hex[:8]}"
    salt = int(uuid.uuid4().int % 150)
    both = make_jpeg(1000 + salt)  # captured by both boxes: the same bytes, the same id
    first = Box(ls_server, team, title, "box-1", [make_jpeg(2000 + salt), both])
    second = Box(ls_server, team, title, "box-2", [both, _pixels(".pgm", salt), _pixels(".tiff", salt)])
    try:
        first.send()
        while second.upload.run_once():
            pass
        # box-1's collection (its export and sweep) comes while box-2 has written its copies and
        # not yet imported their tasks
        client = second.backend.client
        post = client.post

        def import_after_the_other_box_collects(path: str, *args: Any, **kwargs: Any) -> Any:
            if path.endswith("/import"):
                first.merge.run_once()
            return post(path, *args, **kwargs)

        client.post = import_after_the_other_box_collects
        second.send()
        client.post = post
        tasks = {t["data"]["image_id"]: t for t in client.pages("/api/tasks/", "tasks",
                                                                 project=second.backend.project_id)}
        assert sorted(tasks) == sorted({*first.ids, *second.ids})  # the shared image once
        for image_id in second.ids[1:]:
            copy = linked(ls_server, tasks[image_id])
            assert copy.is_file() and copy.read_bytes().startswith(JPEG), (
                f"box-2's task links {copy}, which box-1's collection removed: the reviewers see no image")

        # box-2's own left-overs still go at its next collection, another box's only once a day old
        folder = linked(ls_server, tasks[second.ids[1]]).parent
        own = folder / f".{second.ids[1][:24]}.jpg.k7x_q2ab.tmp"  # a write of box-2 a kill cut short
        other = folder / f"{'e' * 64}.jpg"  # another box's copy, imported by nobody
        own.write_bytes(JPEG)
        other.write_bytes(JPEG)
        first.merge.run_once()
        assert own.exists() and other.exists()
        second.merge.run_once()
        assert not own.exists() and other.exists()
        os.utime(other, (time.time() - 2 * 86400,) * 2)  # over a day old (FOREIGN_COPY_AGE_S)
        first.merge.run_once()
        assert not other.exists()

        # one review per task; the shared image's merges on both boxes, each box's own on it alone
        for task in tasks.values():
            full = client.get(f"/api/tasks/{task['id']}/")
            client.post(f"/api/tasks/{task['id']}/annotations/", {
                "result": full["predictions"][0]["result"], "was_cancelled": False, "lead_time": 2.0,
                "parent_prediction": full["predictions"][0]["id"]})
        first.merge.run_once()
        second.merge.run_once()
        for box in (first, second):
            states = {i: box.store.get(i).state for i in box.ids}  # type: ignore[union-attr]
            assert states == dict.fromkeys(box.ids, REVIEWED)
        assert all(linked(ls_server, tasks[i]).exists() for i in second.ids[1:])  # collected, not yet said merged
        second.merge.run_once()
        assert not any(linked(ls_server, tasks[i]).exists() for i in second.ids[1:])  # merged: gone
    finally:
        first.close()
        second.close()


def test_the_other_boxes_reviews_are_one_line_at_a_start_not_a_warning_each(tmp_path: Path, caplog: Any) -> None:
    """A box on a shared project collects every box's reviews; those of images it does not have
    are left, and said in one line. Each start of an agent warned once per such review: 300
    warnings for a project holding 300 reviews of the other boxes' images."""
    store, dataset = Store(tmp_path / "store"), Dataset(tmp_path / "dataset")
    try:
        others = [_reviewed(f"{n:064x}") for n in range(300)]
        caplog.set_level(logging.DEBUG, logger="sync.merge")
        running = Merger(store, dataset)
        for merger in (running, running, Merger(store, dataset)):  # a start, its next collection, a restart
            report = merger.merge(others)
            assert not report.merged and not report.refused and len(report.skipped) == 300
        said = [r for r in caplog.records if r.levelno >= logging.INFO and "not merged" in r.getMessage()]
        assert [r.levelno for r in said] == [logging.INFO] * 2, [r.getMessage() for r in said][:3]
        assert "300 reviews not merged" in said[0].getMessage()
    finally:
        dataset.close()
        store.close()


def test_boxes_started_together_make_one_project(ls_server: lsserver.LabelStudioServer) -> None:
    """Boxes sharing a ``project_title`` started at once (a roll-out, the end of a power cut) each
    found no project and each made one: 3 boxes started together made 3 or 4 projects of one
    title, each box importing into its own. Here box-2 lists the projects before box-1's exists
    and makes its own after: it deletes that one (empty) and joins box-1's, the older."""
    title = f"team review {uuid.uuid4().hex[:8]}"
    first = LabelStudioBackend(LabelStudioClient(ls_server.url, ls_server.token), title, ls_server.document_root)
    client = LabelStudioClient(ls_server.url, ls_server.token)
    second = LabelStudioBackend(client, title, ls_server.document_root)
    pages = client.pages

    def listed_before_the_other_box_made_it(path: str, *args: Any, **kwargs: Any) -> Any:
        found = pages(path, *args, **kwargs)
        if path == "/api/projects/" and first.project_id is None:
            first.ensure_project()
        return found

    client.pages = listed_before_the_other_box_made_it  # type: ignore[method-assign]
    assert second.ensure_project() == first.project_id
    client.pages = pages  # type: ignore[method-assign]
    titled = [p["id"] for p in pages("/api/projects/", "results", title=title) if p["title"] == title]
    assert titled == [first.project_id]
    # a restart of either finds that one
    again = LabelStudioBackend(LabelStudioClient(ls_server.url, ls_server.token), title, ls_server.document_root)
    assert again.ensure_project() == first.project_id


def test_a_task_whose_copy_is_gone_gets_it_again(ls_server: lsserver.LabelStudioServer, tmp_path: Path) -> None:
    """A task whose copy was removed (by another box's collection before this version, by hand)
    showed the reviewers no image, for good: its image has a task, so nothing sent it again. The
    box's reconcile (at its start, then every 10 minutes) writes the copy again."""
    team = tmp_path / f"team-{uuid.uuid4().hex[:8]}"
    team.mkdir()
    salt = int(uuid.uuid4().int % 150)
    box = Box(ls_server, team, f"team review {uuid.uuid4().hex[:8]}", "box-2",
              [_pixels(".pgm", salt), _pixels(".tiff", salt)])
    try:
        box.send()
        tasks = list(box.backend.client.pages("/api/tasks/", "tasks", project=box.backend.project_id))
        copies = [linked(ls_server, t) for t in tasks]
        copies[0].unlink()
        assert box.submit.reconcile() == 1
        assert copies[0].is_file() and copies[0].read_bytes().startswith(JPEG) and copies[1].is_file()
        assert box.submit.reconcile() == 0  # nothing more to do
        assert len(box.backend.client.pages("/api/tasks/", "tasks", project=box.backend.project_id)) == 2
    finally:
        box.close()


def test_an_upgraded_box_stays_on_the_project_it_used(ls_server: lsserver.LabelStudioServer,
                                                      caplog: Any) -> None:
    """Where several projects carry the title (boxes started together before this release),
    every earlier release took the server's first (pinned, else the newest), and imported its
    tasks there. Taking the oldest instead moved an upgraded box to another project: its
    pending images imported again there, the reviews in the one it used never collected. It
    stays on the server's first, and the others are named in a warning."""
    title = f"team review {uuid.uuid4().hex[:8]}"
    client = LabelStudioClient(ls_server.url, ls_server.token)
    older = client.post("/api/projects/", {"title": title})["id"]
    newer = client.post("/api/projects/", {"title": title})["id"]
    caplog.set_level(logging.WARNING, logger="sync.labelstudio")
    backend = LabelStudioBackend(LabelStudioClient(ls_server.url, ls_server.token), title, ls_server.document_root)
    assert backend.ensure_project() == newer
    assert any(f"projects {newer}, {older} are all titled" in r.getMessage() for r in caplog.records)
