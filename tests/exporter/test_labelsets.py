"""The three label sets derived from one COCO key-points dataset."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from exporter.labelsets import derive_label_sets, split_ids
from exporter.synth import generate


def _labels(root: Path, role: str) -> list[np.ndarray]:
    out = []
    for split in ("train", "val"):
        for f in sorted((root / role / "labels" / split).glob("*.txt")):
            for line in f.read_text().splitlines():
                out.append(np.array(line.split(), float))
    return out


def test_split_is_deterministic_and_disjoint() -> None:
    ids = list(range(1, 51))
    tr, va = split_ids(ids, 0.2, seed=1)
    assert split_ids(ids, 0.2, seed=1) == (tr, va)
    assert not set(tr) & set(va) and sorted(tr + va) == ids and len(va) == 10
    assert split_ids([], 0.2) == ([], [])


def test_main_labels_visible_and_occluded_visible_only_labels_visible(tmp_path: Path) -> None:
    d = generate(tmp_path / "d", 12, seed=21)
    sets = derive_label_sets(d / "annotations.json", d / "images", tmp_path / "sets", val_fraction=0.25)
    assert set(sets.data_yaml) == {"head", "pose_main", "pose_visible"}
    assert sets.train_images + sets.val_images == 12
    coco = json.loads((d / "annotations.json").read_text())
    gt = [np.array(a["keypoints"]).reshape(-1, 3)[:, 2] for a in coco["annotations"] if a["category_id"] == 1]
    n_gt_labelled = sum(int((g > 0).sum()) for g in gt)
    n_gt_visible = sum(int((g == 2).sum()) for g in gt)
    main = _labels(sets.root, "pose_main")
    vis = _labels(sets.root, "pose_visible")
    heads = _labels(sets.root, "head")
    assert len(main) == len(vis) == len(gt)
    assert all(len(r) == 5 + 19 * 3 for r in main) and all(len(r) == 5 for r in heads)
    assert sum(int((r[5:].reshape(-1, 3)[:, 2] > 0).sum()) for r in main) == n_gt_labelled
    assert sum(int((r[5:].reshape(-1, 3)[:, 2] > 0).sum()) for r in vis) == n_gt_visible
    assert n_gt_visible < n_gt_labelled  # occluded points exist and are dropped from the visible set
    yaml = (sets.root / "pose_main" / "data.yaml").read_text()
    assert "kpt_shape: [19, 3]" in yaml and "flip_idx" in yaml
    # Images are links to the originals, found by ultralytics through images/ -> labels/.
    link = next((sets.root / "head" / "images" / "train").iterdir())
    assert link.is_symlink() and link.resolve().parent == (d / "images").resolve()


def test_images_with_one_file_name_in_two_folders_keep_their_own_labels(tmp_path: Path) -> None:
    """``camA/0002.jpg`` and ``camB/0002.jpg``: ultralytics pairs image and label by file name,
    so the later image (by id) gets ``__id<image id>``; the validation images are found by id.
    Unique names stay as they were."""
    from exporter.train import _val_subset
    from service.keypoints import CABIN19_NAMES

    k = len(CABIN19_NAMES)
    files = ["camA/0000.jpg", "camB/0001.jpg", "camA/0001.jpg", "camB/0002.jpg", "camA/0002.jpg", "camA/0002.png",
             "camC/0003.jpg"]
    images, anns = [], []
    for i, fn in enumerate(files, 1):
        (tmp_path / "imgs" / fn).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "imgs" / fn).write_bytes(fn.encode())
        images.append({"id": i, "file_name": fn, "width": 100, "height": 100})
        anns.append({"id": i, "image_id": i, "category_id": 1, "bbox": [i * 10, 0, 5, 5], "iscrowd": 0,
                     "keypoints": [i * 10 + 1, 1, 2] * k, "num_keypoints": k})
    coco = {"images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "person", "keypoints": list(CABIN19_NAMES)}]}
    (tmp_path / "a.json").write_text(json.dumps(coco))
    for seed in range(4):
        sets = derive_label_sets(tmp_path / "a.json", tmp_path / "imgs", tmp_path / f"s{seed}", 0.3, seed)
        links = {}
        for split in ("train", "val"):
            for link in (sets.root / "pose_main" / "images" / split).iterdir():
                label = sets.root / "pose_main" / "labels" / split / (link.stem + ".txt")
                iid = files.index(str(link.resolve().relative_to((tmp_path / "imgs").resolve()))) + 1
                x = float(label.read_text().split()[1]) * 100  # the box centre: 10 * id + 2.5
                assert x == pytest.approx(iid * 10 + 2.5), (link.name, iid)
                links[link.name] = (split, iid)
        assert sorted(iid for _, iid in links.values()) == list(range(1, 8))  # every image once, none dropped
        assert {n for n, (_, i) in links.items()} == {
            "0000.jpg", "0001.jpg", "0001__id3.jpg", "0002.jpg", "0002__id5.jpg", "0002__id6.png", "0003.jpg"}
        val = sorted(i for split, i in links.values() if split == "val")
        assert list(sets.val_ids) == val and sets.val_images == len(val) and sets.train_images == 7 - len(val)
        sub, paths = _val_subset(coco, sets, tmp_path / "imgs")
        assert [im["id"] for im in sub["images"]] == val and [a["image_id"] for a in sub["annotations"]] == val
        assert paths == [tmp_path / "imgs" / files[i - 1] for i in val]


def test_repeated_copies_and_unique_names_keep_their_names() -> None:
    from exporter.labelsets import link_stems

    images = {1: {"file_name": "a/x.jpg"}, 2: {"file_name": "b/y.jpg"}, 3: {"file_name": "x__r1.jpg"}}
    assert link_stems([(1, 0), (2, 0), (2, 1), (2, 2)], images) == {
        (1, 0): "x", (2, 0): "y", (2, 1): "y__r1", (2, 2): "y__r2"}
    # a copy never pushes an image out of its own name
    assert link_stems([(1, 0), (1, 1), (3, 0)], images) == {(1, 0): "x", (3, 0): "x__r1", (1, 1): "x__r1__id1"}


def test_split_by_key_keeps_its_members_as_the_dataset_grows() -> None:
    """Membership follows each image's own key: the ids an export numbers 1.. do not matter, an
    image that trained the parent bundle never validates the child, and the parent's validation
    images stay there."""
    keys = {i: f"sha-{i:04d}" for i in range(200)}
    tr1, va1 = split_ids(list(range(100)), 0.1, seed=0, keys=keys)
    tr2, va2 = split_ids(list(range(200)), 0.1, seed=0, keys=keys)
    assert not set(tr1) & set(va2) and set(va1) <= set(va2)
    renumbered = {i + 500: keys[i] for i in range(100)}
    assert split_ids(list(renumbered), 0.1, seed=0, keys=renumbered)[1] == [i + 500 for i in va1]
    assert 3 <= len(va2) <= 40 and sorted(tr2 + va2) == list(range(200))
    # A set too small for the draw still validates on one image and trains on one.
    for n in (2, 3, 5):
        tr, va = split_ids(list(range(n)), 0.1, seed=0, keys=keys)
        assert len(va) >= 1 and len(tr) >= 1


def test_a_grown_dataset_does_not_validate_on_what_trained_before(tmp_path: Path) -> None:
    d = generate(tmp_path / "d", 40, seed=5)
    coco = json.loads((d / "annotations.json").read_text())

    def subset(names: set[str], path: Path) -> Path:
        """The images named, numbered afresh from 1 in reverse order (a new export's ids)."""
        ims = [im for im in coco["images"] if im["file_name"] in names][::-1]
        new_id = {im["id"]: k for k, im in enumerate(ims, 1)}
        path.write_text(json.dumps({**coco, "images": [{**im, "id": new_id[im["id"]]} for im in ims],
                                    "annotations": [{**a, "image_id": new_id[a["image_id"]]}
                                                    for a in coco["annotations"] if a["image_id"] in new_id]}))
        return path

    def split_names(ann: Path, out: Path) -> tuple[set[str], set[str]]:
        sets = derive_label_sets(ann, d / "images", out, val_fraction=0.2)
        names = {im["id"]: im["file_name"] for im in json.loads(ann.read_text())["images"]}
        val = {names[i] for i in sets.val_ids}
        return set(names.values()) - val, val

    all_names = sorted(im["file_name"] for im in coco["images"])
    tr1, va1 = split_names(subset(set(all_names[:24]), tmp_path / "a.json"), tmp_path / "s1")
    tr2, va2 = split_names(subset(set(all_names), tmp_path / "b.json"), tmp_path / "s2")
    assert va1 and not tr1 & va2 and va1 <= va2


def test_a_box_that_crosses_the_frame_is_cut_at_its_corners() -> None:
    """Clamping the centre and the size one by one moved such a box: x -10..50 on a 100 px wide
    image came out as centre 0.2, width 0.6 (reaching -0.1) instead of 0.25, 0.5."""
    from exporter.labelsets import _yolo_line

    cls, cx, cy, bw, bh = _yolo_line(0, [-10.0, 80.0, 60.0, 40.0], 100, 100, None).split()
    assert (float(cx), float(bw)) == (0.25, 0.5) and (float(cy), float(bh)) == (0.9, 0.2)
    inside = _yolo_line(0, [10.0, 20.0, 30.0, 40.0], 100, 100, None).split()
    assert [float(v) for v in inside[1:]] == [0.25, 0.4, 0.3, 0.4]
    for box in ([120.0, 10.0, 30.0, 30.0], [40.0, 10.0, -5.0, 30.0]):  # beyond the frame; a negative width
        assert all(float(v) >= 0 for v in _yolo_line(0, box, 100, 100, None).split()[1:])
