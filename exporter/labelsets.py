"""Derive the three ultralytics label sets from one COCO key-points dataset.

- ``pose_main``: every labelled point (visible and occluded) is a target; outside points are
  unlabelled (ultralytics flag 0, so the point's confidence is trained towards 0 there).
- ``pose_visible``: only visible points are targets; occluded and outside are unlabelled, so
  this model's point confidence learns "can be seen".
- ``head``: head boxes as a one-class detection set.

Each set is a folder ``<role>/{images,labels}/{train,val}`` with ``data.yaml``; images are
symbolic links to the originals (ultralytics finds labels by swapping ``images`` for
``labels`` in the path), named after the original's file name (``link_stems``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Mapping

import numpy as np

from service.keypoints import KeypointSchema

from .mix import image_key, propagation_sources, unit_draw

ROLES = ("head", "pose_main", "pose_visible")


@dataclass(frozen=True)
class LabelSets:
    root: Path
    data_yaml: dict[str, Path]
    schema: KeypointSchema
    train_images: int
    val_images: int
    val_ids: tuple[int, ...] = ()  # COCO image ids of the validation split (calibration reads them)
    propagated_from_val: int = 0  # auto images left out: they took a validation image's label


def load_coco(annotations: Path) -> dict[str, Any]:
    with open(annotations, encoding="utf-8") as f:
        return json.load(f)


def coco_schema(coco: dict[str, Any]) -> tuple[KeypointSchema, int, int | None]:
    """Key-point schema, person category id and head category id (None when absent)."""
    person = next((c for c in coco["categories"] if c.get("keypoints")), None)
    if person is None:
        raise ValueError("dataset: no category with 'keypoints'; expected a COCO key-points dataset")
    head = next((c["id"] for c in coco["categories"] if c.get("name") == "head"), None)
    return KeypointSchema.for_names(person["keypoints"]), int(person["id"]), head


def split_ids(image_ids: list[int], val_fraction: float, seed: int = 0,
              keys: Mapping[int, str] | None = None) -> tuple[list[int], list[int]]:
    """Deterministic train/val split of image ids.

    ``keys`` (image id -> a stable key, ``exporter.mix.image_key``): an image validates when its
    own seeded draw falls below ``val_fraction``, whatever else the dataset holds. A dataset that
    grows between trainings keeps its validation images, and an image that trained the parent
    bundle (a warm start) does not validate the child, which would flatter the checkpoint choice
    and the calibrated thresholds (except where a tiny set's fallback below applied). The count is about ``n * f`` (a binomial draw); a set where no draw
    falls below validates on its lowest draw, and one image always trains.
    Without ``keys``: a seeded permutation of the ids, ``max(1, round(n * f))`` validate."""
    ids = sorted(image_ids)
    if len(ids) < 2:
        return ids, []
    if keys is None:
        order = np.random.default_rng(seed).permutation(len(ids))
        n_val = max(1, int(round(len(ids) * val_fraction)))
        chosen = {ids[i] for i in order[:n_val]}
    else:
        draws = {i: unit_draw(f"val:{keys[i]}", seed) for i in ids}
        by_draw = sorted(ids, key=lambda i: (draws[i], i))
        chosen = {i for i in ids if draws[i] < val_fraction}
        if not chosen:
            chosen = set(by_draw[:1])
        if len(chosen) > len(ids) - 1:
            chosen = set(by_draw[:len(ids) - 1])
    return [i for i in ids if i not in chosen], [i for i in ids if i in chosen]


def link_stems(entries: list[tuple[int, int]], images: Mapping[int, dict[str, Any]]) -> dict[tuple[int, int], str]:
    """(image id, copy) -> stem of its link and label file, unique over the whole label set.

    ultralytics pairs an image with its label by file name, so two images with one stem
    (``camA/0002.jpg`` and ``camB/0002.jpg``, or ``a.jpg`` beside ``a.png``) would share one
    label file. Each image keeps its own stem (copies ``<stem>__r<k>``) unless an image of a
    lower id took it first; the later one then becomes ``<stem>__id<image id>``. A dataset with
    unique stems keeps exactly the names it always had."""
    used: set[str] = set()
    out: dict[tuple[int, int], str] = {}

    def claim(stem: str, iid: int) -> str:
        name, n = stem, 1
        while name in used:
            name = f"{stem}__id{iid}" + (f"_{n}" if n > 1 else "")
            n += 1
        used.add(name)
        return name

    for iid, _ in sorted(e for e in entries if e[1] == 0):  # originals first, so copies never push one aside
        out[(iid, 0)] = claim(Path(images[iid]["file_name"]).stem, iid)
    for iid, copy in sorted(e for e in entries if e[1] > 0):
        out[(iid, copy)] = claim(f"{out[(iid, 0)]}__r{copy}", iid)
    return out


def _numbered(ids: list[int]) -> list[tuple[int, int]]:
    """(image id, copy number) of each entry of ``ids``, in order: the k-th repeat of an id is copy k."""
    seen: dict[int, int] = {}
    out = []
    for iid in ids:
        seen[iid] = seen.get(iid, -1) + 1
        out.append((iid, seen[iid]))
    return out


def _yolo_line(cls: int, box: list[float], w: int, h: int, kpts: np.ndarray | None) -> str:
    x, y, bw, bh = box
    # The box is cut to the frame at its corners: clamping the centre and the size one by one
    # would move a box that crosses the edge (x -10..50 on 100 px: centre 0.2, width 0.6).
    x1, y1 = min(max(x, 0.0), w), min(max(y, 0.0), h)
    x2, y2 = max(min(x + bw, w), x1), max(min(y + bh, h), y1)  # never a negative size (ultralytics drops the file)
    vals = [(x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h]
    parts = [str(cls)] + [f"{v:.6f}" for v in vals]
    if kpts is not None:
        for px, py, v in kpts:
            if v > 0:
                parts += [f"{min(max(px / w, 0.0), 1.0):.6f}", f"{min(max(py / h, 0.0), 1.0):.6f}", "2"]
            else:
                parts += ["0", "0", "0"]
    return " ".join(parts)


def derive_label_sets(
    annotations: Path, images_dir: Path, out_root: Path, val_fraction: float = 0.1, seed: int = 0,
    repeats: Mapping[int, int] | None = None, val_from: Collection[int] | None = None,
) -> LabelSets:
    """Write the three label sets for ``annotations`` (COCO) under ``out_root``.

    ``repeats`` (image id -> count, ``exporter.mix.training_repeats``): images with count 0 are
    left out; the others are split into train/val once, then each training image appears
    ``count`` times (copies ``<stem>__r<k>``). None: every image once.
    ``val_from``: the image ids the validation split is drawn from, a ``val_fraction`` of them
    (the human-reviewed images of a merged dataset: checkpoints are chosen and thresholds
    calibrated on the validation split, and auto labels there would grade the models against
    their own earlier output); the other images all train. None, or fewer than two of them
    left to train on: all images.
    An auto image that took a validation image's label (``exporter.mix.propagation_sources``)
    gets count 0 after the split: it would train on the validation image's own label.
    """
    coco = load_coco(annotations)
    schema, person_cat, head_cat = coco_schema(coco)
    by_image: dict[int, list[dict]] = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    images = {im["id"]: im for im in coco["images"] if repeats is None or repeats.get(im["id"], 1) > 0}
    if not images:
        raise ValueError(f"dataset: {annotations} has no image left to train on (reviewed only, or auto weight 0, "
                         "with no reviewed images?)")
    eligible = [i for i in images if val_from is None or i in val_from]
    if len(eligible) < 2:
        eligible = list(images)
    val = split_ids(eligible, val_fraction, seed, {i: image_key(images[i]) for i in eligible})[1]
    sources = propagation_sources(coco)
    val_set = set(val)
    copies_of_val = {i for i, src in sources.items() if i in images and i not in val_set and src & val_set}
    train = sorted(set(images) - set(val) - copies_of_val)
    train = [iid for iid in train for _ in range(max(1, (repeats or {}).get(iid, 1)))]
    numbered = {split: _numbered(ids) for split, ids in (("train", train), ("val", val))}
    stems = link_stems(numbered["train"] + numbered["val"], images)
    roles = ROLES if head_cat is not None else ROLES[1:]
    yamls: dict[str, Path] = {}
    for role in roles:
        for split in ("train", "val"):
            img_dir = out_root / role / "images" / split
            lbl_dir = out_root / role / "labels" / split
            img_dir.mkdir(parents=True, exist_ok=True)
            lbl_dir.mkdir(parents=True, exist_ok=True)
            for iid, copy in numbered[split]:
                im = images[iid]
                name = Path(im["file_name"])
                stem = stems[(iid, copy)]
                src = (images_dir / im["file_name"]).resolve()
                link = img_dir / (stem + name.suffix)
                if not link.is_symlink():
                    os.symlink(src, link)
                lines = []
                for a in by_image.get(iid, []):
                    if a.get("iscrowd", 0):
                        continue
                    if role == "head" and a["category_id"] == head_cat:
                        lines.append(_yolo_line(0, a["bbox"], im["width"], im["height"], None))
                    elif role != "head" and a["category_id"] == person_cat:
                        k = np.array(a["keypoints"], float).reshape(-1, 3)
                        if role == "pose_visible":
                            k[:, 2] = np.where(k[:, 2] == 2, 2, 0)
                        if (k[:, 2] > 0).sum() == 0 and role == "pose_visible":
                            # A person with no visible point is still a person: keep the box, no points.
                            pass
                        lines.append(_yolo_line(0, a["bbox"], im["width"], im["height"], k))
                (lbl_dir / (stem + ".txt")).write_text("\n".join(lines) + ("\n" if lines else ""))
        y = out_root / role / "data.yaml"
        names = "  0: head\n" if role == "head" else "  0: person\n"
        text = f"path: {(out_root / role).resolve()}\ntrain: images/train\nval: images/val\nnames:\n{names}"
        if role != "head":
            text += f"kpt_shape: [{schema.count}, 3]\nflip_idx: {schema.flip_idx}\n"
        y.write_text(text)
        yamls[role] = y
    return LabelSets(out_root, yamls, schema, len(train), len(val), tuple(val), len(copies_of_val))
