"""What Label Studio reviewers (and admins) send back, through the real server into the merge.

One server per session (``ls_server``); each test has its own project. Each case is checked
together with good reviews of the same project: a refused review must leave the others merged.
"""
from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

import lsserver
from reviewdata import fill_store
from service.keypoints import CABIN19_NAMES
from service.store import REVIEWED, UPLOADED
from sync.agent import Agent
from sync.dataset import Dataset
from sync.labelstudio import LabelStudioBackend, label_config
from sync.labelstudio_client import LabelStudioClient
from sync.merge import Merger, MergeTask

WIDTH, HEIGHT = 64, 48  # reviewdata's images


class World:
    """Store -> uploader -> review submit -> Label Studio project; merge task into a dataset."""

    def __init__(self, server: lsserver.LabelStudioServer, tmp_path: Path, images: int) -> None:
        self.client = LabelStudioClient(server.url, server.token)
        self.server = server
        self.store, self.ids, _ = fill_store(server.document_root / f"store-{uuid.uuid4().hex[:8]}", review=images)
        self.title = f"adverse {uuid.uuid4().hex[:8]}"
        self.backend = LabelStudioBackend(self.client, self.title, server.document_root)
        self.uploader = lsserver.submit_all(self.store, self.backend, tmp_path / "outbox")
        self.dataset = Dataset(tmp_path / "dataset")
        self.task = MergeTask(Merger(self.store, self.dataset), self.backend.collect,
                              on_report=self.backend.merged)
        self.agent = Agent([self.task], fault_base=0.0)

    def tasks(self) -> dict[str, dict[str, Any]]:
        return {t["data"]["image_id"]: t for t in self.client.pages("/api/tasks/", "tasks",
                                                                    project=self.backend.project_id)}

    def prediction(self, image_id: str) -> list[dict[str, Any]]:
        task = self.client.get(f"/api/tasks/{self.tasks()[image_id]['id']}/")
        return task["predictions"][0]["result"]

    def annotate(self, image_id: str, result: list[dict[str, Any]], cancelled: bool = False) -> dict[str, Any]:
        tid = self.tasks()[image_id]["id"]
        return self.client.post(f"/api/tasks/{tid}/annotations/", {"result": result, "was_cancelled": cancelled,
                                                                    "lead_time": 3.0})

    def accept(self, image_id: str) -> dict[str, Any]:
        return self.annotate(image_id, self.prediction(image_id))

    def state(self, image_id: str) -> str:
        row = self.store.get(image_id)
        assert row is not None
        return row.state

    def close(self) -> None:
        lsserver.close_all(self.dataset, self.uploader, self.store)


@pytest.fixture
def world(ls_server: lsserver.LabelStudioServer, tmp_path: Path) -> Iterator[World]:
    yield from lsserver.opened(World(ls_server, tmp_path, images=4))


def _moved(result: list[dict[str, Any]], rid: str, **value: Any) -> list[dict[str, Any]]:
    """``result`` with region ``rid``'s items' values updated (a key point and its visibility)."""
    return [dict(r, value={**r["value"], **value}) if r["id"] == rid else r for r in result]


def test_a_huge_number_or_a_turned_image_refuses_that_review_and_the_others_merge(world: World) -> None:
    """x = 10**400 (Label Studio stores it) made float() raise OverflowError out of ``collect``:
    the merge task failed on every pass and no review of the project merged. Regions drawn on
    the image turned in the editor (``image_rotation``) merged as if it were upright."""
    w = world
    good, huge, turned, off = w.ids
    w.accept(good)
    result = w.prediction(huge)
    point = next(r["id"] for r in result if r["type"] == "keypointlabels")
    w.annotate(huge, _moved(result, point, x=10 ** 400))
    w.annotate(turned, [dict(r, image_rotation=90) for r in w.prediction(turned)])
    w.annotate(off, _moved(w.prediction(off), point, x=-4.0))  # a point left of the image
    assert w.agent.run_pass() and w.agent.last_error is None
    assert [w.state(i) for i in w.ids] == [REVIEWED, UPLOADED, UPLOADED, UPLOADED]
    assert w.dataset.get(good) is not None and all(w.dataset.get(i) is None for i in (huge, turned, off))
    assert "expected x in 0..100" in w.backend.rejected[huge]
    assert "turned by 90 degrees" in w.backend.rejected[turned]
    assert "expected x in 0..100" in w.backend.rejected[off]
    assert not w.agent.run_pass()  # nothing again, nothing changed
    # the reviewer puts it right: merged
    w.accept(turned)
    assert w.agent.run_pass() and w.state(turned) == REVIEWED and turned not in w.backend.rejected


def test_labels_an_admin_renamed_refuse_their_reviews_and_a_restart_goes_on(world: World) -> None:
    w = world
    first, second, third, _ = w.ids
    pid = w.backend.project_id
    renamed = label_config(CABIN19_NAMES).replace('<Label value="nose"/>', '<Label value="Nose"/>')
    w.client.patch(f"/api/projects/{pid}/", {"label_config": renamed})
    w.accept(first)
    result = w.prediction(second)
    nose = next(r["id"] for r in result if r["type"] == "keypointlabels" and r["value"]["keypointlabels"] == ["nose"])
    w.annotate(second, [dict(r, value={**r["value"], "keypointlabels": ["Nose"]}) if r["id"] == nose
                        and r["type"] == "keypointlabels" else r for r in result])
    assert w.agent.run_pass() and w.agent.last_error is None
    assert (w.state(first), w.state(second)) == (REVIEWED, UPLOADED)
    assert "'Nose'" in w.backend.rejected[second]
    # a restart brings the project's config back to ours; Label Studio refuses that while an
    # annotation uses "Nose"
    again = LabelStudioBackend(w.client, w.title, w.server.document_root)
    task = MergeTask(Merger(w.store, w.dataset), again.collect, on_report=again.merged)
    agent = Agent([task], fault_base=0.0)
    w.accept(third)
    agent.run_pass()
    assert w.state(third) == REVIEWED and "'Nose'" in again.rejected[second]


def test_skips_drafts_several_annotators_edits_and_deletions(world: World) -> None:
    w = world
    skipped, drafted, shared, edited = w.ids
    w.annotate(skipped, [], cancelled=True)
    w.client.post(f"/api/tasks/{w.tasks()[drafted]['id']}/drafts", {"result": w.prediction(drafted), "lead_time": 1.0})
    result = w.prediction(shared)
    point = next(r["id"] for r in result if r["type"] == "keypointlabels")
    w.annotate(shared, _moved(result, point, x=20.0))
    w.annotate(shared, _moved(result, point, x=30.0))  # a second annotator, later
    ann = w.accept(edited)
    assert w.agent.run_pass()
    assert [w.state(i) for i in w.ids] == [UPLOADED, UPLOADED, REVIEWED, REVIEWED]
    entry = w.dataset.get(shared)  # the later annotation of the two
    assert entry is not None and any(k[0] == pytest.approx(0.3 * WIDTH, abs=0.02)
                                     for p in entry.label["persons"] for k in p["keypoints"])
    # the edit after collection: merged again, with the new position
    w.client.patch(f"/api/annotations/{ann['id']}/", {"result": _moved(w.prediction(edited), point, x=40.0)})
    assert w.agent.run_pass()
    moved = w.dataset.get(edited)
    assert moved is not None and any(k[0] == pytest.approx(0.4 * WIDTH, abs=0.02) for p in moved.label["persons"]
                                     for k in p["keypoints"])
    assert not w.agent.run_pass()
    # the task deleted after the merge: the review stays merged, the collection goes on
    w.client.delete(f"/api/tasks/{w.tasks()[edited]['id']}/")
    assert not w.agent.run_pass() and w.agent.last_error is None
    assert w.state(edited) == REVIEWED and w.dataset.get(edited) == moved
