"""Every refused review reaches its reviewer in Label Studio, against the real 1.23.2 server.

Was: only our checks' refusals (``InvalidAnnotation``) wrote the task's ``review_note``; a review
the merge itself refused (a head box of no area: ``sync.merge``'s geometry check) or one of
another shape was only logged, and the reviewer never learned. A person box turned in the editor
refused the whole review, also by a slip of the rotation handle (the editor keeps -0.2 degrees
as 359.8), with the region's value as the only reason; the config showed the handle. A reviewer
who had submitted and moved on saw a note only by reopening that very task: the label stream
never serves a task to its annotator again (``is_labeled``, overlap: ``next_task.py``), so the
agent gives the project a "Refused reviews" Data Manager tab (a saved view on the note).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

import lsserver
from sync.labelstudio import LabelStudioBackend, label_config
from test_labelstudio_note import NOTE, counted, one_pass
from test_labelstudio_ui import Cabin

REFUSED_VIEW = "Refused reviews"  # the Data Manager tab the agent makes


@pytest.fixture
def cabin(ls_server: lsserver.LabelStudioServer, tmp_path: Path) -> Iterator[Cabin]:
    yield from lsserver.opened(counted(Cabin(ls_server, tmp_path, images=3)))


def _value(rid: str, **value: Any) -> Any:
    """An edit of region ``rid``'s value (x, y, width, height, rotation: percent and degrees)."""
    return lambda r: [dict(x, value={**x["value"], **value}) if x["id"] == rid else x for x in r]


def _fix(cabin: Cabin, image_id: str, rid: str, **value: Any) -> None:
    """The reviewer reads the note, edits the region in the editor and presses Update."""
    (ann,) = cabin.task(image_id)["annotations"]
    cabin.client.patch(f"/api/annotations/{ann['id']}/", {"result": _value(rid, **value)(ann["result"])})


def _tab(cabin: Cabin) -> list[str]:
    """The image ids the project's "Refused reviews" Data Manager tab lists."""
    pid = cabin.backend.project_id
    (view,) = [v for v in cabin.client.get("/api/dm/views/", project=pid) if v["data"]["title"] == REFUSED_VIEW]
    return sorted(t["data"]["image_id"] for t in cabin.client.get("/api/tasks/", project=pid, view=view["id"])["tasks"])


def test_a_review_the_merge_refuses_is_noted_in_its_task_and_listed_in_a_tab(cabin: Cabin) -> None:
    flat, shaped, good = cabin.ids
    cabin.submit(flat, _value("h0", width=0.0))  # a head box of no area: our checks pass it, the merge does not
    cabin.submit(shaped, lambda r: r)
    task = cabin.task(shaped)  # an admin's edit of the task's data
    cabin.client.patch(f"/api/tasks/{task['id']}/", {"data": {**task["data"], "width": "wide"}})
    cabin.submit(good, lambda r: r)
    report = one_pass(cabin)
    assert report.merged == [good] and flat in report.refused
    note = cabin.task(flat)["data"].get(NOTE)  # HEAD: None (logged only)
    assert note and "head box" in note and "has no area" in note, note
    assert "could not be read" in cabin.task(shaped)["data"][NOTE]
    assert NOTE not in cabin.task(good)["data"]
    for _ in range(2):
        one_pass(cabin)
    one_pass(cabin, LabelStudioBackend(cabin.counting, cabin.backend.title,  # type: ignore[attr-defined,arg-type]
                                       cabin.backend.document_root))
    assert len(cabin.counting.patches) == 2  # type: ignore[attr-defined]  # once per refusal

    # The reviewer who moved on finds both in the tab; the project's first tab shows every task.
    views = cabin.client.get("/api/dm/views/", project=cabin.backend.project_id)
    assert [v["data"]["title"] for v in views] == ["Default", REFUSED_VIEW]  # not made again after the restart
    assert "filters" not in views[0]["data"] or not views[0]["data"]["filters"].get("items")
    assert _tab(cabin) == sorted([flat, shaped])

    _fix(cabin, flat, "h0", width=10.0)
    report = one_pass(cabin)
    assert report.merged == [flat] and NOTE not in cabin.task(flat)["data"]
    assert _tab(cabin) == [shaped]
    assert len(cabin.counting.patches) == 3  # type: ignore[attr-defined]


def test_a_project_with_tabs_gets_only_the_refused_tab(cabin: Cabin) -> None:
    pid = cabin.backend.project_id
    cabin.client.post("/api/dm/views/", {"project": pid, "data": {"title": "Mine"}})
    cabin.submit(cabin.ids[0], _value("h0", height=0.0))
    one_pass(cabin)
    assert [v["data"]["title"] for v in cabin.client.get("/api/dm/views/", project=pid)] == ["Mine", REFUSED_VIEW]
    assert _tab(cabin) == [cabin.ids[0]]


def test_the_refused_tab_comes_after_the_tabs_left_when_some_were_deleted(cabin: Cabin) -> None:
    """Review: Label Studio orders a new tab by the project's count of tabs; with tabs 0 and 1
    deleted, "Refused reviews" got order 1 before the remaining tab's 2 and became the first tab,
    whose filter every reviewer's label stream takes (1 task of 3 served)."""
    pid = cabin.backend.project_id
    made = [cabin.client.post("/api/dm/views/", {"project": pid, "data": {
        "title": title, "filters": {"conjunction": "and", "items": []}}})["id"] for title in ("Default", "B", "C")]
    for vid in made[:2]:
        cabin.client.delete(f"/api/dm/views/{vid}/")
    cabin.submit(cabin.ids[0], _value("h0", height=0.0))
    one_pass(cabin)
    views = cabin.client.get("/api/dm/views/", project=pid)
    assert [v["data"]["title"] for v in views] == ["C", REFUSED_VIEW]  # HEAD: [REFUSED_VIEW, "C"]
    first = cabin.client.get("/api/tasks/", project=pid, view=views[0]["id"])["tasks"]
    assert len(first) == len(cabin.ids)


def test_a_box_turned_by_a_slip_merges_a_turned_one_is_noted_with_what_to_do(cabin: Cabin) -> None:
    slip, turned, back = cabin.ids
    cabin.submit(slip, _value("p0", rotation=359.8))  # turned by -0.2 degrees, as the editor stores it
    cabin.submit(turned, _value("p0", rotation=15.0))
    cabin.submit(back, _value("p1", rotation=0.3))
    report = one_pass(cabin)
    assert sorted(report.merged) == sorted([slip, back])  # HEAD: both refused
    assert cabin.persons(slip)[0]["box"] == pytest.approx(cabin.persons(back)[0]["box"])
    note = cabin.task(turned)["data"][NOTE]
    assert "rotated by 15.0 degrees" in note and "set its angle to 0" in note, note
    _fix(cabin, turned, "p0", rotation=0.0)
    assert one_pass(cabin).merged == [turned] and NOTE not in cabin.task(turned)["data"]


def test_the_rotation_handle_is_hidden_and_an_old_project_with_reviews_takes_that(cabin: Cabin) -> None:
    """``canRotate="false"`` (``RectangleLabels``, editor 1.23: ``KonvaRegion.canRotate``) in the
    config; a project made before, with reviews drawn, takes it at the agent's start."""
    assert '<RectangleLabels name="box" toName="img" canRotate="false">' in label_config()
    pid = cabin.backend.project_id
    old = label_config().replace(' canRotate="false"', "")
    cabin.client.patch(f"/api/projects/{pid}/", {"label_config": old})
    cabin.submit(cabin.ids[0], lambda r: r)
    cabin.submit(cabin.ids[1], _value("p0", rotation=20.0))
    upgraded = LabelStudioBackend(cabin.counting, cabin.backend.title, cabin.backend.document_root)  # type: ignore[arg-type]
    assert upgraded.ensure_project() == pid
    assert cabin.client.get(f"/api/projects/{pid}/")["label_config"] == label_config()
    report = one_pass(cabin, upgraded)
    assert report.merged == [cabin.ids[0]] and "rotated by 20.0" in cabin.task(cabin.ids[1])["data"][NOTE]


@pytest.mark.parametrize("rotation, said", [(358.0, "-2.0"), (15.0, "15.0"), (180.0, "180.0"), (-30.0, "-30.0")])
def test_a_turned_box_is_said_by_its_signed_angle(rotation: float, said: str) -> None:
    """The editor keeps angles in 0..360: a turn of -2 degrees read "rotated by 358.0 degrees"."""
    from sync.labelstudio import InvalidAnnotation, _upright

    with pytest.raises(InvalidAnnotation, match=f"rotated by {said} degrees"):
        _upright(rotation, "p0")
    _upright(359.7, "p0")  # a slip: upright
