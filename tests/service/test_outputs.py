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


def _review(store: Store, image_id: str, dataset_root: Path) -> None:
    """Merge a review of ``image_id`` the sync agent's way: the reviewer moved the head, the
    person and every point, and saw every point; the label lands in the dataset only."""
    from service.store import REVIEW_PENDING, UPLOADED
    from sync.dataset import Dataset
    from sync.merge import Merger
    from sync.review import ReviewedKeypoint, ReviewedLabel, ReviewedPerson

    assert store.set_state(image_id, (REVIEW_PENDING,), UPLOADED)
    points = tuple(ReviewedKeypoint(20.0 + i, 10.0 + i, "visible") for i in range(COCO17.count))
    label = ReviewedLabel(image_id, 64, 48, ((12.0, 3.0, 28.0, 18.0),), (ReviewedPerson((3.0, 2.0, 58.0, 46.0), points),),
                          "labelstudio", "project-1", 1_790_000_000.0, "ann", None, tuple(COCO17.names))
    dataset = Dataset(dataset_root)  # 19 cabin points: the review is mapped by name, and back on export
    try:
        assert Merger(store, dataset).merge([label]).merged == [image_id]
    finally:
        dataset.close()
    row = store.get(image_id)
    assert row is not None and row.state == "reviewed"


REVIEWED_POINTS = [(20.0 + i, 10.0 + i, 2) for i in range(COCO17.count)]


def test_export_claims_human_only_for_the_reviewers_labels(filled, tmp_path: Path) -> None:
    """A reviewed image's record is still the model's output: an export that has no dataset
    must not call it human, and one that has it writes the reviewer's labels."""
    from service.cli import main

    store, ids = filled
    _review(store, ids[1], tmp_path / "store" / "dataset")

    data = json.loads(export_coco(store, tmp_path / "plain" / "annotations.json").read_text())
    provenance = {im["sha256"]: im["provenance"] for im in data["images"]}
    assert provenance == {i: "auto" for i in ids}  # the model's boxes: never "human"
    assert import_coco(tmp_path / "plain" / "annotations.json")[ids[1]][1] == [pytest.approx((10.0, 2.0, 30.0, 20.0))]

    config = tmp_path / "annotator.toml"
    config.write_text(f"[store]\nroot = {json.dumps(str(tmp_path / 'store'))}\n", encoding="utf-8")
    coco, yolo = tmp_path / "coco" / "annotations.json", tmp_path / "yolo"
    assert main(["export", "--config", str(config), "--coco", str(coco), "--yolo", str(yolo)]) == 0
    data = json.loads(coco.read_text())
    provenance = {im["sha256"]: im["provenance"] for im in data["images"]}
    assert provenance == {ids[0]: "auto", ids[1]: "human", ids[2]: "auto"}
    back = import_coco(coco)
    persons, heads = back[ids[1]]
    assert heads == [pytest.approx((12.0, 3.0, 28.0, 18.0))]
    assert len(persons) == 1 and persons[0].box == pytest.approx((3.0, 2.0, 58.0, 46.0))
    assert [pytest.approx(k) for k in persons[0].keypoints] == REVIEWED_POINTS
    assert [pytest.approx(k) for k in back[ids[0]][0][0].keypoints] == _expected(0)  # auto rows: the model's
    [p] = read_yolo(yolo / "pose" / "labels" / f"{ids[1]}.txt", 64, 48)
    assert p.box == pytest.approx((3.0, 2.0, 58.0, 46.0), abs=1e-3)
    assert [pytest.approx(k, abs=1e-3) for k in p.keypoints] == REVIEWED_POINTS
    [head] = read_yolo(yolo / "head" / "labels" / f"{ids[1]}.txt", 64, 48)
    assert head.box == pytest.approx((12.0, 3.0, 28.0, 18.0), abs=1e-3)

    # [sync.dataset] root names a dataset not made yet: the model's output, "auto"; none is created.
    config.write_text(config.read_text() + "[sync.dataset]\nroot = 'none'\n", encoding="utf-8")
    assert main(["export", "--config", str(config), "--coco", str(coco)]) == 0
    assert {im["provenance"] for im in json.loads(coco.read_text())["images"]} == {"auto"}
    assert not (tmp_path / "none").exists()
    # Given on the command line, a folder without a dataset is a mistake to report.
    assert main(["export", "--config", str(config), "--coco", str(coco), "--dataset-root", str(tmp_path)]) == 2
    assert main(["export", "--config", str(config), "--coco", str(coco),
                 "--dataset-root", str(tmp_path / "store" / "dataset")]) == 0
    assert {im["sha256"]: im["provenance"] for im in json.loads(coco.read_text())["images"]}[ids[1]] == "human"


def test_records_of_two_bundles_with_other_key_points_export_in_one_schema(tmp_path: Path) -> None:
    """A COCO-17 bundle, then a cabin-19 one, on one store: the auto records were written as they
    were, so one category held rows of 17 and 19 points and ultralytics refused the YOLO labels.
    Each record is now mapped by name to the export's schema (its first record's)."""
    from service.keypoints import CABIN19

    store = Store(tmp_path / "store")
    for seed, schema in ((0, COCO17), (1, CABIN19)):
        iid, _ = store.ingest(_jpeg(seed), f"test:{seed}")
        store.claim("w", limit=1)
        kps = [{"x": 5.0 + i, "y": 4.0 + i, "main_conf": 0.9, "visible_conf": 0.9, "visibility": "visible"}
               for i in range(schema.count)]
        record = {"width": 64, "height": 48, "keypoint_names": list(schema.names), "heads": [],
                  "persons": [{"box": [2.0, 1.0, 60.0, 47.0], "conf": 0.9, "keypoints": kps}]}
        store.complete(iid, "w", record, f"bundle-{seed}", "auto_accepted", 0.9, [], audit=False)
    coco = json.loads(export_coco(store, tmp_path / "coco" / "annotations.json").read_text())
    assert len(coco["categories"][0]["keypoints"]) == 17
    rows = [np.array(a["keypoints"]).reshape(-1, 3) for a in coco["annotations"]]
    assert [len(r) for r in rows] == [17, 17]
    # The cabin record's points land under their own names: COCO's nose is the cabin's nose.
    cabin = {n: i for i, n in enumerate(CABIN19.names)}
    for k, name in enumerate(COCO17.names):
        assert tuple(rows[1][k]) == (5.0 + cabin[name], 4.0 + cabin[name], 2)
    export_yolo(store, tmp_path / "yolo")
    lines = [line for f in sorted((tmp_path / "yolo" / "pose" / "labels").glob("*.txt")) for line in f.read_text().splitlines()]
    assert [len(line.split()) for line in lines] == [5 + 17 * 3] * 2
    store.close()
