"""Outputs: COCO and YOLO exports keep visibility through a round trip; sidecars are atomic."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from service.keypoints import COCO17
from service.outputs import export_coco, export_yolo, import_coco, read_yolo, sidecar_record, write_sidecar
from service.record import Head, Keypoint, Person, Prediction
from service.store import Store

VIS = ("visible", "occluded", "outside")


def _jpeg(seed: int, w: int = 64, h: int = 48) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", pixels)
    assert ok
    return buf.tobytes()


def _prediction(seed: int, w: int = 64, h: int = 48) -> Prediction:
    """One person whose 17 points cycle through visible, occluded, outside; one head."""
    kps = tuple(Keypoint(5.0 + 3 * i, 4.0 + 2 * i + seed, 0.9, 0.5, VIS[(i + seed) % 3]) for i in range(COCO17.count))
    return Prediction(w, h, (Head((10.0, 2.0, 30.0, 20.0), 0.8),), (Person((2.0, 1.0, 60.0, 47.0), 0.9, kps, 0.7),))


@pytest.fixture()
def filled(tmp_path: Path):
    store = Store(tmp_path / "store")
    ids = []
    for seed, decision in ((0, "auto_accepted"), (1, "review"), (2, "auto_accepted")):
        iid, _ = store.ingest(_jpeg(seed), f"test:{seed}", {"camera": "cam"})
        store.claim("w", limit=1)
        record = {**_prediction(seed).to_json(), "image_id": iid, "keypoint_names": list(COCO17.names)}
        store.complete(iid, "w", record, "bundle-1", decision, 0.7, [], audit=False)
        ids.append(iid)
    iid, _ = store.ingest(_jpeg(9), "test:unfinished")  # received only: not exported
    yield store, ids
    store.close()


def _expected(seed: int) -> list[tuple[float, float, int]]:
    out = []
    for kp in _prediction(seed).persons[0].keypoints:
        out.append((kp.x, kp.y, kp.flag) if kp.flag else (0.0, 0.0, 0))
    return out


def test_coco_round_trip_keeps_visibility(filled, tmp_path: Path) -> None:
    store, ids = filled
    path = export_coco(store, tmp_path / "coco" / "annotations.json")
    data = json.loads(path.read_text())
    person_cat = [c for c in data["categories"] if c["name"] == "person"][0]
    assert person_cat["keypoints"] == list(COCO17.names)
    assert min(min(e) for e in person_cat["skeleton"]) == 1  # 1-based
    assert {c["name"] for c in data["categories"]} == {"person", "head"}
    assert len(data["images"]) == 3
    for im in data["images"]:
        assert (tmp_path / "coco" / "images" / im["file_name"]).read_bytes() == store.image_bytes(im["sha256"])
    back = import_coco(path)
    assert sorted(back) == sorted(ids)
    for seed, iid in enumerate(ids):
        persons, heads = back[iid]
        assert len(persons) == 1 and heads == [pytest.approx((10.0, 2.0, 30.0, 20.0))]
        assert persons[0].visibilities() == tuple(VIS[(i + seed) % 3] for i in range(COCO17.count))
        assert [pytest.approx(k) for k in persons[0].keypoints] == _expected(seed)


def test_yolo_round_trip_keeps_visibility(filled, tmp_path: Path) -> None:
    store, ids = filled
    out = export_yolo(store, tmp_path / "yolo")
    data = json.loads((out / "pose" / "data.yaml").read_text())
    assert data["kpt_shape"] == [17, 3] and len(data["flip_idx"]) == 17
    for seed, iid in enumerate(ids):
        [p] = read_yolo(out / "pose" / "labels" / f"{iid}.txt", 64, 48)
        assert p.visibilities() == tuple(VIS[(i + seed) % 3] for i in range(COCO17.count))
        assert [pytest.approx(k, abs=1e-3) for k in p.keypoints] == _expected(seed)
        assert p.box == pytest.approx((2.0, 1.0, 60.0, 47.0), abs=1e-3)
        [head] = read_yolo(out / "head" / "labels" / f"{iid}.txt", 64, 48)
        assert head.box == pytest.approx((10.0, 2.0, 30.0, 20.0), abs=1e-3) and head.keypoints == ()
        assert (out / "pose" / "images" / f"{iid}.jpg").is_file()
    assert len(list((out / "pose" / "labels").iterdir())) == 3


def test_export_of_empty_store(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    data = json.loads(export_coco(store, tmp_path / "c.json").read_text())
    assert data["images"] == [] and data["annotations"] == []
    assert (export_yolo(store, tmp_path / "y") / "head" / "data.yaml").is_file()
    store.close()


def test_sidecar_is_complete_and_atomic(filled, tmp_path: Path) -> None:
    store, ids = filled
    out = tmp_path / "sidecars"
    row = store.get(ids[1])
    assert row is not None
    path = write_sidecar(out, row)
    assert path == out / f"{ids[1]}.json"
    rec = json.loads(path.read_text())
    assert rec["image_id"] == ids[1] and rec["source"] == "test:1" and (rec["width"], rec["height"]) == (64, 48)
    assert rec["judgement"] == {"score": 0.7, "reasons": [], "decision": "review", "audit": False}
    assert rec["bundle_id"] == "bundle-1" and rec["received_at"].endswith("Z")
    kp = rec["persons"][0]["keypoints"][0]
    assert set(kp) == {"x", "y", "main_conf", "visible_conf", "visibility"}
    assert rec == sidecar_record(row)
    before = path.read_bytes()
    with pytest.raises(TypeError):  # not JSON-serialisable: the old sidecar must survive intact
        write_sidecar(out, {"image_id": ids[1], "bad": object()})
    assert path.read_bytes() == before
    assert [p.name for p in out.iterdir()] == [path.name]  # no temporary files left behind
    with pytest.raises(ValueError):
        write_sidecar(out, {"image_id": "../escape"})
