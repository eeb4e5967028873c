"""Write the dataset as a COCO key-points dataset for ``annotator train`` (and for the gate).

Output folder::

    annotations.json    COCO: images, annotations, categories (person with the dataset's key
                        point names and skeleton, id 1; head, id 2)
    images/<image_id>.<ext>   the image bytes (hard link to the store's file when possible)

Each annotation carries the image's provenance in an extra ``provenance`` field (origin human
or auto, bundle, review backend and job, reviewer, time, adjusted); each image carries its
sha256 ``image_id`` as ``sha256``. Key points are ``[x, y, flag]`` with flags 2 visible,
1 occluded, 0 outside (at 0, 0).
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from service.durable import write_json_atomic
from service.keypoints import KeypointSchema

from .dataset import Dataset, DatasetEntry, manifest_version

log = logging.getLogger(__name__)

PERSON_CATEGORY, HEAD_CATEGORY = 1, 2


def categories(schema: KeypointSchema) -> list[dict[str, Any]]:
    """COCO categories: person (key points, 1-based skeleton) and head."""
    return [
        {"id": PERSON_CATEGORY, "name": "person", "supercategory": "person",
         "keypoints": list(schema.names), "skeleton": [[a + 1, b + 1] for a, b in schema.skeleton]},
        {"id": HEAD_CATEGORY, "name": "head", "supercategory": "person"},
    ]


def image_extension(head: bytes) -> str:
    """File extension from the first bytes of an image (".jpg" when unknown)."""
    if head.startswith(b"\x89PNG"):
        return ".png"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return ".tif"
    if head.startswith(b"BM"):
        return ".bmp"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return ".webp"
    return ".jpg"


def coco_dict(entries: Sequence[DatasetEntry], schema: KeypointSchema, info: dict[str, Any],
              file_names: dict[str, str] | None = None) -> dict[str, Any]:
    """A COCO key-points dict of ``entries``. Image ids are 1.. in the given order;
    ``file_names`` maps sha256 image id -> file name (default ``<image_id>.jpg``)."""
    coco: dict[str, Any] = {"info": dict(info), "images": [], "annotations": [], "categories": categories(schema)}
    ann_id = 1
    for num, e in enumerate(entries, 1):
        label = e.label
        name = (file_names or {}).get(e.image_id, f"{e.image_id}.jpg")
        coco["images"].append({"id": num, "file_name": name, "width": label["width"], "height": label["height"],
                               "sha256": e.image_id, "origin": e.origin})
        prov = dict(e.provenance)
        for p in label["persons"]:
            x1, y1, x2, y2 = p["box"]
            flat = [v for kp in p["keypoints"] for v in kp]
            coco["annotations"].append({
                "id": ann_id, "image_id": num, "category_id": PERSON_CATEGORY,
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": max((x2 - x1) * (y2 - y1), 1.0), "iscrowd": 0,
                "keypoints": flat, "num_keypoints": sum(1 for kp in p["keypoints"] if kp[2] > 0),
                "provenance": prov})
            ann_id += 1
        for x1, y1, x2, y2 in label["heads"]:
            coco["annotations"].append({
                "id": ann_id, "image_id": num, "category_id": HEAD_CATEGORY,
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": max((x2 - x1) * (y2 - y1), 1.0), "iscrowd": 0,
                "provenance": prov})
            ann_id += 1
    return coco


@dataclass(frozen=True)
class ExportResult:
    out: Path
    annotations: Path
    version: str
    images: int
    reviewed: int
    auto: int
    holdout_left_out: int
    missing_images: tuple[str, ...]
    propagated: int = 0


def _place(src: Path, dst: Path) -> None:
    """Hard link ``src`` at ``dst`` (copy across file systems); an existing ``dst`` is kept."""
    if dst.exists():
        return
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def export_dataset(dataset: Dataset, image_path: Callable[[str], Path], out: Path,
                   include_holdout: bool = False, row_of: Callable[[str], Any] | None = None,
                   propagate_distance: int | None = None) -> ExportResult:
    """Write ``annotations.json`` and ``images/`` for every dataset image (hold-out reviewed
    images left out unless ``include_holdout``). ``image_path(image_id)`` locates the bytes
    (``Store.image_path``). An image whose bytes are missing is logged and left out.

    ``propagate_distance`` (bits, with ``row_of``: ``Store.get``): a reviewed frame's label
    replaces the auto labels of its session's near-identical frames (``sync.propagate``);
    None: no propagation."""
    out = Path(out)
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    # One read of the labels, and the version worked out from it: read apart (``dataset.version()``
    # then ``entries()``), a merge by the sync agent in between gave ``info.dataset_version`` (which
    # ``annotator train`` writes into the bundle's provenance) of other labels than the ones written.
    entries = dataset.entries()
    version = manifest_version((e.image_id, e.label_hash) for e in entries)
    chosen: list[DatasetEntry] = []
    names: dict[str, str] = {}
    missing: list[str] = []
    left_out = 0
    for e in entries:
        if e.holdout and not include_holdout:
            left_out += 1
            continue
        src = image_path(e.image_id)
        try:
            with open(src, "rb") as f:
                ext = image_extension(f.read(16))
        except FileNotFoundError:
            log.warning("image %s: bytes missing at %s; left out of the export", e.image_id[:12], src)
            missing.append(e.image_id)
            continue
        names[e.image_id] = e.image_id + ext
        _place(src, images_dir / names[e.image_id])
        chosen.append(e)
    info = {"description": "edge-annotator dataset: human-reviewed and auto-accepted labels",
            "dataset_version": version, "holdout_included": include_holdout, "holdout_left_out": left_out,
            "holdout_fraction": dataset.holdout_fraction}
    propagated = 0
    if propagate_distance is not None and row_of is not None:
        from .propagate import file_dhash, propagate, store_frames

        frames = store_frames(chosen, row_of, lambda iid: file_dhash(image_path(iid)))
        chosen, propagated = propagate(chosen, frames, propagate_distance)
        info["propagation"] = {"max_distance": propagate_distance, "images": propagated}
        log.debug("propagation: %d auto images take the label of a reviewed frame of their session", propagated)
    coco = coco_dict(chosen, dataset.schema, info, names)
    ann = out / "annotations.json"
    write_json_atomic(ann, coco)
    reviewed = sum(1 for e in chosen if e.origin == "reviewed")
    # debug: ``dataset export`` prints it, and the training job's pass exports at each check
    log.debug("exported dataset %s to %s: %d images (%d reviewed), %d hold-out left out",
             version[:12], out, len(chosen), reviewed, left_out)
    return ExportResult(out, ann, version, len(chosen), reviewed, len(chosen) - reviewed, left_out, tuple(missing),
                        propagated)
