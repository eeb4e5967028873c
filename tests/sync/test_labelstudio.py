"""Label Studio backend against a real Label Studio server on loopback (one start per session).

The server comes from ``.venv-ls`` (``make ls-env``); without it the server tests are skipped
with that reason, the pure conversion tests still run. Each test uses its own project.
"""
from __future__ import annotations

import itertools
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterator, Sequence

import pytest

import lsserver
from review_contract import (HEIGHT, WIDTH, ReviewBackendContract, assert_label, collect, expected, image_id,
                             record)
from reviewdata import fill_store, make_jpeg
from service.keypoints import CABIN19_NAMES, COCO17_NAMES
from service.store import REVIEWED, UPLOADED
from sync.errors import PermanentError, RetryableError
from sync.labelstudio import (InvalidAnnotation, LabelStudioBackend, label_config, parse_result,
                              prediction_result)
from sync.labelstudio_client import LabelStudioClient, NotFound, WebhookReceiver
from sync.objectstore import LocalFolderStore
from sync.review import ReviewedKeypoint, ReviewedPerson, ReviewItem
from sync.submit import ReviewSubmitTask
from sync.uploader import Uploader, UploadSettings

_counter = itertools.count(100)


class LabelStudioHarness:
    tolerance = 0.02

    def __init__(self, server: lsserver.LabelStudioServer, webhook_url: str | None = None,
                 names: Sequence[str] = CABIN19_NAMES) -> None:
        self.server, self.reviewer_id = server, server.user
        self.client = LabelStudioClient(server.url, server.token)
        self.folder = server.document_root / f"cam-{uuid.uuid4().hex[:8]}"
        self.folder.mkdir()
        self.backend = LabelStudioBackend(self.client, f"edge review {uuid.uuid4().hex[:8]}", server.document_root,
                                          names=names, webhook_url=webhook_url)

    def item(self, n: int, rec: dict[str, Any]) -> ReviewItem:
        path = self.folder / f"{n}.jpg"
        path.write_bytes(make_jpeg(n, WIDTH, HEIGHT))
        return ReviewItem(image_id(n), rec["width"], rec["height"], rec, rec["bundle_id"], local_path=path,
                          score=0.41, reasons=("kpt_near_threshold",))

    def task(self, item: ReviewItem) -> dict[str, Any]:
        tasks = self.client.pages("/api/tasks/", "tasks", project=self.backend.project_id)
        (task,) = [t for t in tasks if t["data"]["image_id"] == item.image_id]
        return self.client.get(f"/api/tasks/{task['id']}/")

    def post(self, item: ReviewItem, result: list[dict[str, Any]], cancelled: bool = False) -> dict[str, Any]:
        task = self.task(item)
        return self.client.post(f"/api/tasks/{task['id']}/annotations/", {
            "result": result, "was_cancelled": cancelled, "lead_time": 4.2,
            "parent_prediction": task["predictions"][0]["id"]})

    def review(self, item: ReviewItem, heads: Sequence[Sequence[float]], persons: Sequence[ReviewedPerson]) -> None:
        rec = {"width": item.width, "height": item.height, "keypoint_names": list(CABIN19_NAMES),
               "heads": [{"box": list(h)} for h in heads],
               "persons": [{"box": list(p.box), "keypoints": [{"x": k.x, "y": k.y, "visibility": k.visibility}
                                                              for k in p.keypoints]} for p in persons]}
        self.post(item, prediction_result(rec))  # the same region ids as the prediction: a UI submit

    def accept(self, item: ReviewItem) -> None:
        self.post(item, self.task(item)["predictions"][0]["result"])


class TestLabelStudioBackend(ReviewBackendContract):
    @pytest.fixture
    def harness(self, ls_server: lsserver.LabelStudioServer) -> LabelStudioHarness:
        return LabelStudioHarness(ls_server)


def test_project_tasks_and_predictions_as_imported(ls_server: lsserver.LabelStudioServer) -> None:
    h = LabelStudioHarness(ls_server)
    rec = record(persons=1, names=COCO17_NAMES)
    item = h.item(next(_counter), rec)
    h.backend.submit("batch-1", [item])
    pid = h.backend.project_id
    project = h.client.get(f"/api/projects/{pid}/")
    assert project["label_config"] == label_config()
    (storage,) = h.client.get("/api/storages/localfiles/", project=pid)
    assert Path(storage["path"]) == h.folder
    task = h.task(item)
    assert task["data"]["image_id"] == item.image_id and task["data"]["batch"] == "batch-1"
    req = urllib.request.Request(ls_server.url + task["data"]["image"], headers={"Authorization": f"Token {ls_server.token}"})
    with urllib.request.urlopen(req) as resp:
        assert resp.read() == item.local_path.read_bytes()  # type: ignore[union-attr]
    (pred,) = task["predictions"]
    # the project's model_version (its label stream shows only that version's), the bundle in data
    assert (pred["model_version"], pred["score"], task["data"]["bundle_id"]) == ("edge-annotator", 0.41, "bundle-7")
    by_id: dict[str, list[dict[str, Any]]] = {}
    for r in pred["result"]:
        by_id.setdefault(r["id"], []).append(r)
    nose = {r["type"]: r for r in by_id["p0k0"]}
    assert set(nose) == {"keypointlabels", "choices"}
    assert nose["keypointlabels"]["value"]["keypointlabels"] == ["nose"]
    assert nose["choices"]["value"]["choices"] == ["visible"]
    assert nose["keypointlabels"]["value"]["x"] == pytest.approx(100 * rec["persons"][0]["keypoints"][0]["x"] / WIDTH)
    assert nose["choices"]["value"]["x"] == nose["keypointlabels"]["value"]["x"]
    assert "p0k2" not in by_id  # right_eye is outside: not placed
    assert by_id["h0"][0]["value"]["y"] == pytest.approx(100 * 12.5 / HEIGHT)
    h.backend.submit("batch-1", [item])  # again: no second task, no second storage
    assert len(h.client.pages("/api/tasks/", "tasks", project=pid)) == 1
    assert len(h.client.get("/api/storages/localfiles/", project=pid)) == 1
    # an unchanged review of a COCO-17 record comes back with mouth and neck outside
    h.accept(item)
    (label,) = h.backend.collect()
    assert label.keypoint_names == CABIN19_NAMES and label.adjusted is False
    assert [k.visibility for k in label.persons[0].keypoints[17:]] == ["outside", "outside"]
    # the same title again, other names: the project is reused and its config updated
    again = LabelStudioBackend(h.client, h.backend.title, ls_server.document_root, names=COCO17_NAMES)
    assert again.ensure_project() == pid
    assert h.client.get(f"/api/projects/{pid}/")["label_config"] == label_config(COCO17_NAMES)


def test_new_regions_invalid_and_cancelled_annotations(ls_server: lsserver.LabelStudioServer) -> None:
    h = LabelStudioHarness(ls_server)
    rec = record(persons=1)
    item, other = h.item(next(_counter), rec), h.item(next(_counter), rec)
    h.backend.submit("b", [item, other])
    h.post(other, [], cancelled=True)  # skipped by the reviewer: nothing to collect
    bad = [{"id": "zz1", "from_name": "kp", "to_name": "img", "type": "keypointlabels",
            "value": {"x": 150.0, "y": 5.0, "width": 0.6, "keypointlabels": ["nose"]}}]
    h.post(item, bad)
    assert collect(h.backend) == {}
    assert "x in 0..100" in h.backend.rejected[item.image_id]
    # a newer, valid annotation: the prediction's regions plus a new person with a new point
    result = h.task(item)["predictions"][0]["result"]
    result = [r for r in result if r["id"] != "p0k0"]  # the nose deleted ...
    result += [{"id": "new-nose", "from_name": "kp", "to_name": "img", "type": "keypointlabels",
                "value": {"x": 10.0, "y": 10.0, "width": 0.6, "keypointlabels": ["nose"]}},  # ... and placed anew
               {"id": "Xp", "from_name": "box", "to_name": "img", "type": "rectanglelabels",
                "value": {"x": 75.0, "y": 50.0, "width": 20.0, "height": 40.0, "rotation": 0, "rectanglelabels": ["person"]}},
               {"id": "Xk", "from_name": "kp", "to_name": "img", "type": "keypointlabels",
                "value": {"x": 80.0, "y": 60.0, "width": 0.6, "keypointlabels": ["neck"]}},
               {"id": "Xk", "from_name": "visibility", "to_name": "img", "type": "choices",
                "value": {"x": 80.0, "y": 60.0, "width": 0.6, "choices": ["occluded"]}}]
    h.post(item, result)
    got = collect(h.backend)
    assert list(got) == [item.image_id] and item.image_id not in h.backend.rejected
    label = got[item.image_id]
    first, second = label.persons
    assert first.keypoints[0] == ReviewedKeypoint(0.1 * WIDTH, 0.1 * HEIGHT, "visible")  # nearest box: person 0
    assert second.box == pytest.approx((0.75 * WIDTH, 0.5 * HEIGHT, 0.95 * WIDTH, 0.9 * HEIGHT))
    assert second.keypoints[18] == ReviewedKeypoint(0.8 * WIDTH, 0.6 * HEIGHT, "occluded")
    assert {k.visibility for k in second.keypoints[:18]} == {"outside"}
    assert label.adjusted is True and label.job.endswith(f"/projects/{h.backend.project_id}")


def test_webhook_wakes_the_collector(ls_server: lsserver.LabelStudioServer) -> None:
    with WebhookReceiver() as receiver:
        h = LabelStudioHarness(ls_server, webhook_url=receiver.url)
        item = h.item(next(_counter), record())
        h.backend.submit("b", [item])
        h.backend.submit("b", [item])  # registers the webhook once
        assert len(h.client.get("/api/webhooks/", project=h.backend.project_id)) == 1
        assert not receiver.wait(0.1)
        h.accept(item)
        assert receiver.wait(10), "no webhook from Label Studio"
        assert receiver.task_ids == {h.task(item)["id"]}
        assert list(collect(h.backend)) == [item.image_id]  # polling stays the source of truth


def test_client_errors_are_sorted(ls_server: lsserver.LabelStudioServer) -> None:
    with pytest.raises(PermanentError, match="HTTP 401.*token") as info:
        LabelStudioClient(ls_server.url, "wrong-token").get("/api/projects/")
    assert "wrong-token" not in str(info.value)
    with pytest.raises(RetryableError):
        LabelStudioClient(f"http://127.0.0.1:{lsserver.free_port()}", "t", timeout=2).get("/api/projects/")


class Pipeline:
    """The upload and review-submit tasks of one sync process, with a store under Label Studio's
    document root (images it can serve) and a clock the test moves."""

    def __init__(self, server: lsserver.LabelStudioServer, tmp_path: Path, images: int = 4) -> None:
        self.server, self.now = server, [0.0]
        self.client = LabelStudioClient(server.url, server.token)
        self.title = f"edge review {uuid.uuid4().hex[:8]}"
        self.store, self.review, _ = fill_store(server.document_root / f"store-{uuid.uuid4().hex[:8]}", review=images)
        self.target = LocalFolderStore(tmp_path / "outbox")
        self.uploader = Uploader(self.store, self.target, UploadSettings("box-1", batch_size=3))
        self.restart()
        while self.uploader.run_once() | self.submit.run_once():
            pass

    def restart(self, title: str | None = None) -> None:
        """A new process: a fresh backend (no project id yet) and submit task."""
        self.title = title or self.title
        self.backend = LabelStudioBackend(self.client, self.title, self.server.document_root)
        self.submit = ReviewSubmitTask(self.uploader.journal, self.store, self.target, self.backend,
                                       reconcile_interval=600.0, clock=lambda: self.now[0])

    def tasks(self, pid: int | None = None) -> list[dict[str, Any]]:
        return self.client.pages("/api/tasks/", "tasks", project=pid or self.backend.project_id)

    def image_ids(self, pid: int | None = None) -> list[str]:
        return sorted(t["data"]["image_id"] for t in self.tasks(pid))

    def close(self) -> None:
        self.uploader.close()
        self.store.close()


@pytest.fixture
def pipeline(ls_server: lsserver.LabelStudioServer, tmp_path: Path) -> Iterator[Pipeline]:
    p = Pipeline(ls_server, tmp_path)
    yield p
    p.close()


def test_a_deleted_project_is_found_again_and_its_pending_images_resubmitted(pipeline: Pipeline) -> None:
    p = pipeline
    first = p.backend.project_id
    assert p.image_ids() == sorted(p.review)
    batches = {t["data"]["image_id"]: t["data"]["batch"] for t in p.tasks()}
    assert len(set(batches.values())) == 2
    p.client.delete(f"/api/projects/{first}/")
    assert list(p.backend.collect()) == []  # was: HTTP 404, a PermanentError that ended the process
    assert p.backend.project_id not in (None, first)
    assert p.submit.run_once()  # the project changed: reconciled at once, not after the interval
    assert p.image_ids() == sorted(p.review)  # each image once, in its original batch
    assert {t["data"]["image_id"]: t["data"]["batch"] for t in p.tasks()} == batches
    assert not p.submit.run_once() and len(p.tasks()) == len(p.review)
    p.restart()  # a restart reconciles at its first pass and finds nothing missing
    assert not p.submit.run_once() and len(p.tasks()) == len(p.review)
    # deleted while this process is away: the restarted process creates it again and refills it
    p.client.delete(f"/api/projects/{p.backend.project_id}/")
    p.restart()
    assert p.submit.run_once() and p.image_ids() == sorted(p.review)


def test_a_deleted_task_or_a_new_title_gets_its_pending_images_again(pipeline: Pipeline) -> None:
    p = pipeline
    gone = p.tasks()[0]
    p.client.delete(f"/api/tasks/{gone['id']}/")
    assert not p.submit.run_once()  # reconciled at the first pass; next due after the interval
    p.now[0] = 600.0
    assert p.submit.run_once()
    assert p.image_ids() == sorted(p.review)  # the lost one back, no other twice
    assert not p.submit.run_once()
    # a reviewed image has nothing left to review; the others follow a new project_title
    assert p.store.set_state(p.review[0], [UPLOADED], REVIEWED)
    old = p.backend.project_id
    p.restart(title=f"{p.title} renamed")
    assert p.submit.run_once() and p.backend.project_id != old
    assert p.image_ids() == sorted(p.review[1:])
    assert len(p.tasks(old)) == len(p.review)  # the old project is left as it was


def test_task_pages_end_with_total_and_404_past_the_end(pipeline: Pipeline) -> None:
    """What ``LabelStudioClient.pages`` relies on, as this Label Studio version answers."""
    p = pipeline
    pid = p.backend.project_id
    answer = p.client.get("/api/tasks/", project=pid, page=1, page_size=1)
    assert answer["total"] == len(p.review) and len(answer["tasks"]) == 1 and "next" not in answer
    with pytest.raises(NotFound):
        p.client.get("/api/tasks/", project=pid, page=len(p.review) + 1, page_size=1)
    assert sorted(t["data"]["image_id"] for t in p.client.pages("/api/tasks/", "tasks", page_size=1, project=pid)) \
        == sorted(p.review)
    projects = p.client.get("/api/projects/", page=1, page_size=1)
    assert {"count", "next", "results"} <= set(projects)


def _kp(rid: str, name: str, x: float = 10.0, y: float = 20.0) -> dict[str, Any]:
    return {"id": rid, "from_name": "kp", "to_name": "img", "type": "keypointlabels",
            "value": {"x": x, "y": y, "width": 0.6, "keypointlabels": [name]}}


@pytest.mark.parametrize("result, message", [
    ([_kp("a", "elbow")], "expected one of"),
    ([_kp("a", "nose", x=-3)], "x in 0..100"),
    ([_kp("a", "nose"), _kp("b", "nose", x=11)], "two 'nose' points"),
    ([{**_kp("a", "nose"), "to_name": "image"}], "to_name"),
    ([{"id": "r", "from_name": "box", "to_name": "img", "type": "rectanglelabels",
       "value": {"x": 1, "y": 1, "width": 5, "height": 5, "rotation": 30, "rectanglelabels": ["head"]}}], "unrotated"),
    ([{"id": "r", "from_name": "box", "to_name": "img", "type": "polygonlabels", "value": {}}], "unexpected"),
    ([{"id": "a", "from_name": "visibility", "to_name": "img", "type": "choices", "value": {"choices": ["hidden"]}}],
     "expected one of"),
])
def test_invalid_results_are_refused(result: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(InvalidAnnotation, match=message):
        parse_result(result, WIDTH, HEIGHT)


def test_conversion_round_trip_without_a_server() -> None:
    rec = record(persons=2, heads=2)
    heads, persons = parse_result(prediction_result(rec), WIDTH, HEIGHT)
    want_heads, want_persons = expected(rec)
    from sync.review import ReviewedLabel

    assert_label(ReviewedLabel("x", WIDTH, HEIGHT, heads, persons, "t", "j", 0.0), want_heads, want_persons)
    assert parse_result([], WIDTH, HEIGHT) == ((), ())
    config = label_config()
    assert config.count("<Label value=") == 2 + 19 and 'perRegion="true"' in config


def test_image_links_survive_url_characters_in_the_store_path(tmp_path: Path) -> None:
    """A store under a folder with "+", "&", "#" or "%" in its name gave broken image links:
    Label Studio reads the path from the query string, which those characters cut or change."""
    from urllib.parse import parse_qs, urlsplit

    from sync.review import ReviewItem

    odd = tmp_path / "lab +&#% 1" / "images" / "ab"
    odd.mkdir(parents=True)
    (odd / "abc").write_bytes(b"jpeg")
    backend = LabelStudioBackend(None, "edge review", tmp_path)  # type: ignore[arg-type]  # no request made
    item = ReviewItem("abc", WIDTH, HEIGHT, record(persons=1), "b1", local_path=odd / "abc")
    url = backend.task("batch-1", item, 1)["data"]["image"]
    assert parse_qs(urlsplit(url).query)["d"] == ["lab +&#% 1/images/ab/abc"]
