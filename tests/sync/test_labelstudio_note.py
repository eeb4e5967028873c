"""A review the agent refuses is said to the reviewer in Label Studio, in the task, against a real server.

Was: a refused review (``InvalidAnnotation``: a new point in the boxes of two persons, a box
deleted alone, ...) was said only in the agent's log; the reviewer saw the task as done and the
image waited for ever. Now the reason is written into the task's ``data["review_note"]``, which
the labelling config's ``Header`` shows above the image; written once per refusal, removed when
a fixed review merges; tasks without a refusal are left as imported. Label Studio Community
1.23 has no comments API.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterator

import pytest

import lsserver
from sync.labelstudio import LabelStudioBackend, label_config
from test_labelstudio_ui import Cabin, point, relation

NOTE = "review_note"  # the task data key the labelling config shows
WRIST = "zQ9_xY8wV7"


def unlinked_wrist(r: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A left wrist added in the overlap of both persons' boxes, linked to neither: refused."""
    return r + point(WRIST, "left_wrist", 315, 300, "occluded")


class Counting:
    """The backend's client, counting the task PATCHes (the notes written or removed)."""

    def __init__(self, client: Any) -> None:
        self.client, self.patches = client, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def patch(self, path: str, body: Any) -> Any:
        if path.startswith("/api/tasks/"):
            self.patches.append(path)
        return self.client.patch(path, body)


def counted(cabin: Cabin) -> Cabin:
    """``cabin`` whose backend's task PATCHes are counted (``cabin.counting.patches``)."""
    cabin.counting = Counting(cabin.backend.client)  # type: ignore[attr-defined]
    cabin.backend.client = cabin.counting  # type: ignore[assignment]
    return cabin


@pytest.fixture
def cabin(ls_server: lsserver.LabelStudioServer, tmp_path: Path) -> Iterator[Cabin]:
    yield from lsserver.opened(counted(Cabin(ls_server, tmp_path, images=3)))


def one_pass(cabin: Cabin, backend: LabelStudioBackend | None = None) -> Any:
    """What the agent's merge task does: collect, merge, hand the report back to the backend."""
    backend = backend or cabin.backend
    report = cabin.merger.merge(list(backend.collect()))
    backend.merged(report)
    return report


def test_a_refused_review_shows_its_reason_in_the_task_until_a_fixed_one_merges(cabin: Cabin) -> None:
    refused, accepted, untouched = cabin.ids
    imported = {i: copy.deepcopy(cabin.task(i)["data"]) for i in cabin.ids}
    cabin.submit(refused, unlinked_wrist)
    cabin.submit(accepted, lambda r: r)
    report = one_pass(cabin)
    assert report.merged == [accepted] and refused in cabin.backend.rejected
    note = cabin.task(refused)["data"].get(NOTE)
    assert note and cabin.backend.rejected[refused] in note and "link it to its person" in note, note
    assert {k: v for k, v in cabin.task(refused)["data"].items() if k != NOTE} == imported[refused]
    for image_id in (accepted, untouched):  # no refusal: the task's data as imported
        assert cabin.task(image_id)["data"] == imported[image_id]
    assert len(cabin.counting.patches) == 1  # type: ignore[attr-defined]
    columns = cabin.client.get("/api/dm/columns/", project=cabin.backend.project_id)["columns"]
    assert NOTE in [c["id"] for c in columns]  # the Data Manager can filter the tasks with a note

    for _ in range(2):  # once per refusal, not at every collection (nor after a restart)
        one_pass(cabin)
    restarted = LabelStudioBackend(cabin.counting, cabin.backend.title, cabin.backend.document_root)  # type: ignore[attr-defined,arg-type]
    one_pass(cabin, restarted)
    assert len(cabin.counting.patches) == 1  # type: ignore[attr-defined]

    # The reviewer reads the note, links the wrist to person 1 and presses Update.
    task = cabin.task(refused)
    (ann,) = task["annotations"]
    cabin.client.patch(f"/api/annotations/{ann['id']}/", {"result": ann["result"] + [relation(WRIST, "p1")]})
    report = one_pass(cabin, restarted)
    assert report.merged == [refused] and refused not in restarted.rejected
    assert cabin.task(refused)["data"] == imported[refused]  # the note gone, the data as imported
    persons = cabin.persons(refused)
    assert persons[1]["keypoints"][9] == pytest.approx([315, 300, 1], abs=0.01)  # person 1's occluded wrist
    one_pass(cabin, restarted)
    assert len(cabin.counting.patches) == 2  # type: ignore[attr-defined]


def test_a_project_made_before_the_note_takes_the_config_and_the_agent_keeps_it(cabin: Cabin) -> None:
    """A project of an older version (its config without the Header, tasks without the key,
    reviews submitted): the server takes the new config; an admin's edit is put back."""
    assert f'value="${NOTE}"' in label_config()
    pid = cabin.backend.project_id
    old = "\n".join(line for line in label_config().splitlines() if "<Header" not in line)
    cabin.client.patch(f"/api/projects/{pid}/", {"label_config": old})
    refused, accepted, _ = cabin.ids
    cabin.submit(refused, unlinked_wrist)
    cabin.submit(accepted, lambda r: r)
    assert NOTE not in cabin.task(refused)["data"]

    upgraded = LabelStudioBackend(cabin.counting, cabin.backend.title, cabin.backend.document_root)  # type: ignore[attr-defined,arg-type]
    assert upgraded.ensure_project() == pid
    assert cabin.client.get(f"/api/projects/{pid}/")["label_config"] == label_config()
    cabin.client.post(f"/api/projects/{pid}/validate/", {"label_config": label_config()})  # no 400
    for image_id in cabin.ids:  # tasks imported before still open
        assert cabin.client.get(f"/api/tasks/{cabin.task(image_id)['id']}/")["data"]["image_id"] == image_id
    report = one_pass(cabin, upgraded)
    assert report.merged == [accepted]
    assert "link it to its person" in cabin.task(refused)["data"][NOTE]

    cabin.client.patch(f"/api/projects/{pid}/", {"label_config": old})  # an admin removes the Header
    one_pass(cabin, upgraded)
    assert cabin.client.get(f"/api/projects/{pid}/")["label_config"] == label_config()
    assert len(cabin.counting.patches) == 1  # type: ignore[attr-defined]


def test_a_note_goes_when_the_refused_review_is_deleted(cabin: Cabin) -> None:
    refused = cabin.ids[0]
    imported = copy.deepcopy(cabin.task(refused)["data"])
    cabin.submit(refused, unlinked_wrist)
    one_pass(cabin)
    task = cabin.task(refused)
    assert task["data"].get(NOTE)
    cabin.client.delete(f"/api/annotations/{task['annotations'][0]['id']}/")
    one_pass(cabin)
    assert cabin.task(refused)["data"] == imported


def test_a_server_refusing_writes_costs_one_try_a_collection(cabin: Cabin) -> None:
    """A server that answers reads but hangs on writes (a locked database): each refused task's
    note waited out a timeout, at every pass (30 s x 20 tasks = 10 minutes of the merge task;
    review). The first failure leaves the others for the next collection."""
    from sync.errors import RetryableError

    class Hanging(Counting):
        def patch(self, path: str, body: Any) -> Any:
            if path.startswith("/api/tasks/"):
                self.patches.append(path)
                raise RetryableError("timed out")
            return self.client.patch(path, body)

    for image_id in cabin.ids:
        cabin.submit(image_id, unlinked_wrist)
    hanging = Hanging(cabin.counting.client)
    cabin.backend.client = hanging  # type: ignore[assignment]
    one_pass(cabin)
    one_pass(cabin)
    assert len(cabin.backend.rejected) == 3 and len(hanging.patches) == 2  # HEAD: 6, one per task each pass
    cabin.backend.client = cabin.counting  # type: ignore[assignment]
    one_pass(cabin)
    assert len(cabin.counting.patches) == 3  # the server writes again: every note goes in
