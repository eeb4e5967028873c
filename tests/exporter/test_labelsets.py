"""The three label sets derived from one COCO key-points dataset."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

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
