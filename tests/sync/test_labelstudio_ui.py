"""What a reviewer does in Label Studio's editor, posted as the editor posts it, into the merge.

The annotations are in the shape the installed editor serializes (``libs/editor`` of Label
Studio 1.23: ``Result.serialize``, ``RelationStore.serialize``): every region with ``origin``,
``original_width``/``original_height``/``image_rotation``, the prediction's ids kept, ids the
editor makes up (``nanoid(10)``) for what the reviewer adds, a per-region visibility ``choices``
item under its point's id (with the point's x, y, width), ``parentID`` when the region has a
parent, and a relation the reviewer draws (Alt+R) as ``{from_id, to_id, type: "relation",
direction}`` with no id and no names. Two persons sit side by side, their boxes overlapping.

Was: a relation refused the whole review (``to_name`` None); a point added for one person in the
overlap, or for a person whose box the reviewer did not draw, was merged into the other person;
``parentID`` was ignored; a person's box deleted alone (its points left, as the editor leaves
them) was refused as "two 'nose' points" of the neighbour, and so was a box deleted and drawn
again.
"""
from __future__ import annotations

import copy
import uuid
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np
import pytest

import lsserver
from service.keypoints import COCO17_NAMES
from service.store import Store
from sync.dataset import Dataset
from sync.labelstudio import InvalidAnnotation, LabelStudioBackend, parse_result, prediction_result
from sync.labelstudio_client import LabelStudioClient
from sync.merge import Merger

W, H = 640, 480
BOXES = [(40.0, 60.0, 330.0, 470.0), (300.0, 50.0, 620.0, 470.0)]  # seat neighbours: x 300..330 is both
NOSE, LEFT_WRIST = 0, 9  # left_wrist is outside (not placed) for both persons


def record() -> dict[str, Any]:
    persons = []
    for x1, y1, x2, y2 in BOXES:
        kps = [{"x": x1 + 20 + 12 * k, "y": y1 + 20 + 20 * k, "main_conf": 0.8, "visible_conf": 0.6,
                "visibility": "outside" if k in (9, 10) else "visible"} for k in range(17)]
        persons.append({"box": [x1, y1, x2, y2], "conf": 0.9, "keypoints": kps})
    heads = [{"box": [x1 + 60, y1 + 5, x1 + 160, y1 + 110], "conf": 0.8} for x1, y1, _, _ in BOXES]
    return {"width": W, "height": H, "heads": heads, "persons": persons, "keypoint_names": list(COCO17_NAMES),
            "bundle_id": "bundle-1", "annotated_at": 1_800_000_000.0}


def jpeg(n: int) -> bytes:
    img = np.full((H, W, 3), (n * 37) % 256, np.uint8)
    cv2.putText(img, str(n), (20, 40), cv2.FONT_HERSHEY_SIMPLEX, 1, (255, 255, 255), 2)
    return cv2.imencode(".jpg", img)[1].tobytes()


def point(rid: str, name: str, x: float, y: float, visibility: str | None = None,
          parent: str | None = None) -> list[dict[str, Any]]:
    """A key point the reviewer placed (pixels in, percent out), with its visibility choice."""
    common: dict[str, Any] = {"original_width": W, "original_height": H, "image_rotation": 0, "id": rid,
                              "to_name": "img", "origin": "manual"}
    if parent:
        common["parentID"] = parent
    where = {"x": 100 * x / W, "y": 100 * y / H, "width": 0.6}
    items = [{**common, "from_name": "kp", "type": "keypointlabels", "value": {**where, "keypointlabels": [name]}}]
    if visibility:
        items.append({**common, "from_name": "visibility", "type": "choices",
                      "value": {**where, "choices": [visibility]}})
    return items


def person_box(rid: str, x1: float, y1: float, x2: float, y2: float) -> dict[str, Any]:
    return {"original_width": W, "original_height": H, "image_rotation": 0, "id": rid, "from_name": "box",
            "to_name": "img", "type": "rectanglelabels", "origin": "manual",
            "value": {"x": 100 * x1 / W, "y": 100 * y1 / H, "width": 100 * (x2 - x1) / W,
                      "height": 100 * (y2 - y1) / H, "rotation": 0, "rectanglelabels": ["person"]}}


def relation(a: str, b: str, direction: str = "right") -> dict[str, Any]:
    return {"from_id": a, "to_id": b, "type": "relation", "direction": direction}


class Cabin:
    """Images of two seat neighbours: store -> uploader -> Label Studio -> merge into a dataset."""

    def __init__(self, server: lsserver.LabelStudioServer, tmp_path: Path, images: int) -> None:
        self.client = LabelStudioClient(server.url, server.token)
        self.store = Store(server.document_root / f"store-{uuid.uuid4().hex[:8]}")
        self.ids = []
        for n in range(images):
            image_id, _ = self.store.ingest(jpeg(n), f"drop/{n}.jpg")
            (row,) = self.store.claim("w", 1)
            self.store.complete(row.image_id, "w", record(), "bundle-1", "review", 0.4, ["kpt_near_threshold"],
                                audit=False)
            self.ids.append(image_id)
        self.backend = LabelStudioBackend(self.client, f"editor {uuid.uuid4().hex[:8]}", server.document_root)
        self.uploader = lsserver.submit_all(self.store, self.backend, tmp_path / "outbox")
        self.dataset = Dataset(tmp_path / "dataset", holdout_fraction=0.0)
        self.merger = Merger(self.store, self.dataset)

    def task(self, image_id: str) -> dict[str, Any]:
        (tid,) = [t["id"] for t in self.client.pages("/api/tasks/", "tasks", project=self.backend.project_id)
                  if t["data"]["image_id"] == image_id]
        return self.client.get(f"/api/tasks/{tid}/")

    def submit(self, image_id: str, edit: Any) -> None:
        """The reviewer opens the task (the prediction's regions, ids kept), edits, submits."""
        task = self.task(image_id)
        shown = copy.deepcopy(task["predictions"][0]["result"])
        for r in shown:
            r["origin"] = "prediction"
        self.client.post(f"/api/tasks/{task['id']}/annotations/", {
            "result": edit(shown), "was_cancelled": False, "lead_time": 41.2, "draft_id": 0,
            "parent_prediction": task["predictions"][0]["id"]})

    def persons(self, image_id: str) -> list[dict[str, Any]]:
        entry = self.dataset.get(image_id)
        assert entry is not None and entry.origin == "reviewed", (image_id, self.backend.rejected.get(image_id))
        return list(entry.label["persons"])

    def close(self) -> None:
        lsserver.close_all(self.dataset, self.uploader, self.store)


@pytest.fixture
def cabin(ls_server: lsserver.LabelStudioServer, tmp_path: Path) -> Iterator[Cabin]:
    yield from lsserver.opened(Cabin(ls_server, tmp_path, images=9))


def without(*prefixes: str, exact: bool = False) -> Any:
    def keep(r: dict[str, Any]) -> bool:
        rid = str(r.get("id"))
        return not any(rid == p if exact else rid.startswith(p) for p in prefixes)
    return keep


def test_what_a_reviewer_does_in_the_editor_lands_on_the_right_person(cabin: Cabin) -> None:
    wrist = point("Qw8_zz1LmN", "left_wrist", 320, 300, "occluded")  # in the overlap of both boxes
    edits = {
        "relation to the box": lambda r: r + wrist + [relation("Qw8_zz1LmN", "p1")],
        "relation to a point": lambda r: r + wrist + [relation("p1k7", "Qw8_zz1LmN", "left")],
        "parentID": lambda r: r + point("Qw8_zz1LmN", "left_wrist", 320, 300, "occluded", parent="p1"),
        "unlinked in the overlap": lambda r: r + wrist,
        "points of a person without a box": lambda r: [x for x in r if without("p1")(x)]
        + point("aB3xY_9k01", "left_wrist", 560, 300) + point("aB3xY_9k02", "nose", 450, 90),
        "a box deleted alone": lambda r: [x for x in r if without("p1", exact=True)(x)],
        "a box deleted and drawn again": lambda r: [x for x in r if without("p1", exact=True)(x)]
        + [person_box("Rb0x_new01", 305, 45, 625, 475)],
        "a relation between boxes": lambda r: r + [relation("h0", "p0", "bi")],
        "a missing point inside one box": lambda r: r + point("Zx9-LmQ0pA", "left_wrist", 60, 300),
    }
    images = dict(zip(edits, cabin.ids))
    for name, edit in edits.items():
        cabin.submit(images[name], edit)
    report = cabin.merger.merge(list(cabin.backend.collect()))
    refused = cabin.backend.rejected
    assert sorted(n for n, i in images.items() if i in refused) == [
        "a box deleted alone", "points of a person without a box", "unlinked in the overlap"], refused
    assert "link it to its person" in refused[images["unlinked in the overlap"]]
    assert "draw the box of the person it belongs to" in refused[images["points of a person without a box"]]
    assert "p1's box was deleted" in refused[images["a box deleted alone"]]
    assert sorted(report.merged) == sorted(i for i in cabin.ids if i not in refused)
    for name in ("relation to the box", "relation to a point", "parentID"):
        first, second = cabin.persons(images[name])
        assert first["keypoints"][LEFT_WRIST][2] == 0, name  # not person 0's
        assert second["keypoints"][LEFT_WRIST] == pytest.approx([320, 300, 1], abs=0.01), name  # occluded
    first, second = cabin.persons(images["a box deleted and drawn again"])
    assert second["box"] == pytest.approx([305, 45, 625, 475], abs=0.01)
    assert second["keypoints"][NOSE] == pytest.approx([320, 70, 2], abs=0.01)  # person 1's points kept
    assert first["keypoints"][NOSE] == pytest.approx([60, 80, 2], abs=0.01)
    assert len(cabin.persons(images["a relation between boxes"])) == 2
    first, second = cabin.persons(images["a missing point inside one box"])
    assert first["keypoints"][LEFT_WRIST] == pytest.approx([60, 300, 2], abs=0.01)
    assert second["keypoints"][LEFT_WRIST][2] == 0


def _parse(result: list[dict[str, Any]]) -> Any:
    return parse_result(prediction_result({**record(), "keypoint_names": list(COCO17_NAMES)}, COCO17_NAMES)
                        + result, W, H, COCO17_NAMES)


def test_a_relation_moves_a_predicted_point_to_another_person_and_two_links_are_refused() -> None:
    """Without a server: a relation from a prediction's point to the other person's box fixes the
    model's grouping; a point tied to two persons, or a name twice, is refused with what to do."""
    _, (first, second) = parse_result(
        [r for r in prediction_result(record(), COCO17_NAMES) if r["id"] != "p1k0"]
        + [relation("p0k0", "p1")], W, H, COCO17_NAMES)
    assert first.keypoints[NOSE].visibility == "outside" and second.keypoints[NOSE].x == pytest.approx(60)
    with pytest.raises(InvalidAnnotation, match="linked to 2 person boxes"):
        _parse(point("n", "left_wrist", 320, 300) + [relation("n", "p0"), relation("p1", "n")])
    with pytest.raises(InvalidAnnotation, match="two 'nose' points"):
        _parse([relation("p0k0", "p1")])
    with pytest.raises(InvalidAnnotation, match="has one already"):
        _parse(point("n", "nose", 100, 200))  # inside person 0's box only, who has a nose


@pytest.mark.parametrize("ids", [("Ab3dE5gH7j", "zQ9_xY8wV7"), ("zQ9_xY8wV7", "Ab3dE5gH7j")])
def test_added_points_land_the_same_whatever_ids_the_editor_gave_them(ids: tuple[str, str]) -> None:
    """p0's left wrist added at x=100 (p0's box only), p1's at x=315 (both boxes): merged or
    refused by the order of the editor's random ids (review of the change). Placed in rounds,
    the one point only p0 holds first, both land."""
    a, b = ids
    result = prediction_result(record(), COCO17_NAMES) + point(a, "left_wrist", 100, 300) + \
        point(b, "left_wrist", 315, 300)
    _, persons = parse_result(result, W, H, COCO17_NAMES)
    wrist = COCO17_NAMES.index("left_wrist")
    assert round(persons[0].keypoints[wrist].x) == 100 and round(persons[1].keypoints[wrist].x) == 315
