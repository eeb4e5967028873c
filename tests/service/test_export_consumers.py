"""``annotator export`` as its consumers read it: pycocotools (COCO, COCOeval) and ultralytics (YOLO).

The exports leave the appliance: an engineer copies them to a training machine, diffs two of
them, and makes them while the daemon and the sync agent keep moving images along.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from service.keypoints import CABIN19
from service.outputs import export_coco, export_yolo
from service.record import Head, Keypoint, Person, Prediction
from service.store import REVIEW_PENDING, UPLOADED, Store

VIS = ("visible", "occluded", "outside")
W, H = 96, 64


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (H, W, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", pixels)
    assert ok
    return buf.tobytes()


def _record(image_id: str, seed: int, persons: int = 1) -> dict:
    people = tuple(Person((4.0 + p, 2.0, 90.0 - p, 60.0), 0.9, tuple(
        Keypoint(6.0 + 4 * i + p, 3.0 + 3 * i, 0.9, 0.5, VIS[(i + seed + p) % 3]) for i in range(CABIN19.count)), 0.7)
        for p in range(persons))
    heads = (Head((30.0, 3.0, 50.0, 20.0), 0.8),) if persons else ()
    return {**Prediction(W, H, heads, people).to_json(), "image_id": image_id, "keypoint_names": list(CABIN19.names)}


class _Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


def _add(store: Store, clock: _Clock, seed: int, decision: str, persons: int = 1) -> str:
    clock.t += 1.0
    iid, _ = store.ingest(_jpeg(seed), f"test:{seed}")
    store.claim("w", limit=1)
    store.complete(iid, "w", _record(iid, seed, persons), "bundle-1", decision, 0.5, [], audit=False)
    return iid


@pytest.fixture()
def world(tmp_path: Path):
    clock = _Clock()
    store = Store(tmp_path / "store", clock=clock)
    for seed, decision, persons in ((0, "auto_accepted", 1), (1, "review", 2), (2, "auto_accepted", 0),
                                    (3, "review", 1), (4, "auto_accepted", 1)):
        _add(store, clock, seed, decision, persons)
    yield store, clock
    store.close()


def test_coco_export_evaluates_perfectly_against_itself(world, tmp_path: Path) -> None:
    """COCOeval of the export against itself is 1.0 for head boxes and person key points (ids,
    areas and key-point counts agree), with the 19-point sigmas a 19-point category needs."""
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    store, _ = world
    path = export_coco(store, tmp_path / "coco" / "annotations.json")
    data = json.loads(path.read_text())
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(path))
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        assert a["area"] == pytest.approx(w * h, abs=0.05) and a["iscrowd"] == 0
        if "keypoints" in a:
            assert len(a["keypoints"]) == 3 * CABIN19.count
            assert a["num_keypoints"] == sum(1 for v in a["keypoints"][2::3] if v > 0)
    for im in data["images"]:
        assert (path.parent / "images" / im["file_name"]).is_file()
    for iou_type, category in (("bbox", 2), ("keypoints", 1)):
        dets = [{**{k: v for k, v in a.items() if k in ("image_id", "category_id", "bbox", "keypoints")},
                 "score": 1.0} for a in data["annotations"] if a["category_id"] == category]
        with contextlib.redirect_stdout(io.StringIO()):
            ev = COCOeval(gt, gt.loadRes(copy.deepcopy(dets)), iou_type)
            ev.params.catIds = [category]
            if iou_type == "keypoints":
                ev.params.kpt_oks_sigmas = np.array(CABIN19.sigmas)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        assert ev.stats[0] == pytest.approx(1.0), iou_type


def test_yolo_export_loads_in_ultralytics_where_it_was_copied(world, tmp_path: Path, ultralytics_offline) -> None:
    """An engineer copies the YOLO export to a training machine: ultralytics must find its
    images there. ``data.yaml`` named the appliance's absolute folder (``path``), so the copy
    failed with "images not found" once the original was gone."""
    from ultralytics.cfg import get_cfg
    from ultralytics.data.dataset import YOLODataset
    from ultralytics.data.utils import check_det_dataset

    store, _ = world
    out = export_yolo(store, tmp_path / "appliance" / "yolo")
    copied = tmp_path / "workstation" / "yolo"
    shutil.copytree(out, copied)
    shutil.rmtree(tmp_path / "appliance")
    for task, instances in (("pose", 5), ("head", 4)):
        data = check_det_dataset(str(copied / task / "data.yaml"))
        assert Path(data["val"]) == (copied / task / "images").resolve()
        assert data["names"] == {0: "person" if task == "pose" else "head"}
        if task == "pose":
            assert data["kpt_shape"] == [CABIN19.count, 3] and data["flip_idx"] == CABIN19.flip_idx
        ds = YOLODataset(img_path=data["val"], data=data, task="pose" if task == "pose" else "detect",
                         hyp=get_cfg(overrides={"task": "pose" if task == "pose" else "detect"}), augment=False,
                         imgsz=96, cache=False, rect=False, batch_size=2)
        assert len(ds.labels) == 5 and sum(len(lb["cls"]) for lb in ds.labels) == instances
        if task == "pose":
            assert all(lb["keypoints"].shape[1:] == (CABIN19.count, 3) for lb in ds.labels if len(lb["cls"]))


class _AgentMovesImagesMidExport(Store):
    """The store as the export reads it while the sync agent uploads: right after the export's
    first page that holds a review-pending image, another connection moves every review-pending
    image to ``uploaded``."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.agent: Store | None = Store(root)

    def list(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201 - Store.list's signature
        page = super().list(*args, **kwargs)
        if self.agent is not None and any(r.state == REVIEW_PENDING for r in page[0]):
            rows, _ = self.agent.list(state=REVIEW_PENDING, limit=1000)
            for row in rows:
                assert self.agent.set_state(row.image_id, (REVIEW_PENDING,), UPLOADED)
            self.agent.close()
            self.agent = None
        return page


def test_an_image_that_moves_on_during_the_export_is_written_once(world, tmp_path: Path) -> None:
    """Read state after state, an image the agent moved from review_pending to uploaded between
    two pages was exported twice (3079 image entries for 3000 images, with a real agent process):
    two COCO images of one file, and twice the weight in training."""
    store, _ = world
    store.close()
    racing = _AgentMovesImagesMidExport(tmp_path / "store")
    try:
        data = json.loads(export_coco(racing, tmp_path / "coco" / "annotations.json").read_text())
    finally:
        racing.close()
    names = [im["file_name"] for im in data["images"]]
    assert len(names) == len(set(names)) == 5
    assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])


def test_ids_stay_put_when_images_arrive_or_move_on(world, tmp_path: Path) -> None:
    """Two exports of a store that got a new image and moved one image along name the earlier
    images and their annotations with the same ids (an engineer diffs them). Grouped by state,
    every image after the new auto-accepted one or the moved one was renumbered."""
    store, clock = world
    first = json.loads(export_coco(store, tmp_path / "a" / "annotations.json").read_text())
    _add(store, clock, 7, "auto_accepted")
    pending, _ = store.list(state=REVIEW_PENDING)
    assert store.set_state(pending[0].image_id, (REVIEW_PENDING,), UPLOADED)
    second = json.loads(export_coco(store, tmp_path / "b" / "annotations.json").read_text())
    ids = {im["sha256"]: im["id"] for im in second["images"]}
    assert {im["sha256"]: im["id"] for im in first["images"]}.items() <= ids.items()
    assert len(second["images"]) == len(first["images"]) + 1
    assert first["annotations"] == second["annotations"][:len(first["annotations"])]
