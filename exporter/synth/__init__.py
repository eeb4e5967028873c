"""Synthetic in-cabin scenes with exact ground truth, written as a COCO key-points dataset.

``generate(out_dir, count, seed, knobs)`` renders ``count`` images; image ``i`` of seed ``s``
depends only on ``(s, i)``, so any subset can be re-made and runs are reproducible. With
``frames=f`` the images come as capture sequences: image ``i`` is frame ``i % f`` of scene
``i // f`` (``sequence.py``: same scene, the occupants moved a little, fresh sensor noise);
with ``lengths`` the scenes have those numbers of frames instead (``sequence.varied_lengths``).
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np

from service.durable import write_json_atomic
from service.keypoints import CABIN19

from .render import OUT_H, OUT_W, Knobs, render_image, sample_spec
from .sequence import frame_rng, scene_frame

log = logging.getLogger(__name__)
PERSON_CATEGORY, HEAD_CATEGORY = 1, 2
# Heads hidden more than this (by seats, other people) are not labelled: nobody could box them.
MIN_HEAD_VISIBLE = 0.25


def categories() -> list[dict[str, Any]]:
    return [
        {"id": PERSON_CATEGORY, "name": "person", "supercategory": "person",
         "keypoints": list(CABIN19.names), "skeleton": [[a + 1, b + 1] for a, b in CABIN19.skeleton]},
        {"id": HEAD_CATEGORY, "name": "head", "supercategory": "person"},
    ]


def _render_one(args: tuple[int, int, Knobs, str, int, int, float, tuple[int, ...] | None]) -> dict[str, Any]:
    seed, index, knobs, images_dir, quality, frames, motion, lengths = args
    scene, frame = scene_frame(index, lengths) if lengths else divmod(index, frames)
    rng = frame_rng(seed, scene, frame, motion)
    spec = sample_spec(rng, knobs)
    img, persons = render_image(rng, spec)
    name = f"cabin_{seed}_{index:06d}.jpg"
    q = int(rng.integers(max(quality - 20, 50), quality + 1))
    cv2.imwrite(os.path.join(images_dir, name), img, [cv2.IMWRITE_JPEG_QUALITY, q])
    anns = []
    for p in persons:
        kp = p.keypoints
        labelled = kp[:, 2] > 0
        pts = kp[labelled, :2]
        boxes = [pts] if len(pts) else []
        if p.head_box is not None:
            boxes.append(np.array([p.head_box[:2], p.head_box[2:]]))
        allp = np.concatenate(boxes) if boxes else np.zeros((0, 2))
        x1, y1 = allp.min(0)
        x2, y2 = allp.max(0)
        pad = 0.04 * max(x2 - x1, y2 - y1)
        x1, y1 = max(x1 - pad, 0), max(y1 - pad, 0)
        x2, y2 = min(x2 + pad, OUT_W), min(y2 + pad, OUT_H)
        anns.append({"category_id": PERSON_CATEGORY, "bbox": [x1, y1, x2 - x1, y2 - y1],
                     "area": max(p.area, 1.0), "iscrowd": 0,
                     "keypoints": [round(float(v), 2) if i % 3 < 2 else int(v) for i, v in enumerate(kp.ravel())],
                     "num_keypoints": int(labelled.sum()),
                     "attributes": {"slot": p.slot, "pose": p.pose, "child": p.child,
                                    "visible_area": round(p.visible_area, 1)}})
        if p.head_box is not None and p.head_visible_fraction >= MIN_HEAD_VISIBLE:
            hx1, hy1, hx2, hy2 = p.head_box
            anns.append({"category_id": HEAD_CATEGORY, "bbox": [hx1, hy1, hx2 - hx1, hy2 - hy1],
                         "area": (hx2 - hx1) * (hy2 - hy1), "iscrowd": 0})
    image = {"file_name": name, "width": OUT_W, "height": OUT_H,
             "tags": {"camera": spec.camera, "ir": spec.ir, "crowded": spec.crowded,
                      "occupants": len(persons), "children": len(spec.children),
                      **({"scene": scene, "frame": frame} if frames > 1 or lengths else {})}}
    return {"image": image, "annotations": anns}


def generate(
    out_dir: str | os.PathLike[str],
    count: int,
    seed: int,
    knobs: Knobs = Knobs(),
    start: int = 0,
    workers: int = 1,
    quality: int = 92,
    progress: Callable[[int, int], None] | None = None,
    frames: int = 1,
    motion: float = 0.1,
    lengths: Sequence[int] | None = None,
) -> Path:
    """Render images ``start .. start+count-1`` of ``seed`` into ``out_dir`` (images/ + annotations.json).

    ``frames`` > 1: capture sequences of that many frames per scene, each continuous parameter
    moved by ``motion`` times its spread from frame to frame 0 (``sequence.SequenceRng``).
    ``lengths``: the scenes' numbers of frames in order (they must cover ``start + count``
    images); ``frames`` is then ignored.
    """
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    lens = tuple(int(n) for n in lengths) if lengths is not None else None
    if lens is not None and (min(lens, default=0) < 1 or sum(lens) < start + count):
        raise ValueError(f"lengths must be >= 1 and cover {start + count} images, got {sum(lens or ())} frames")
    out = Path(out_dir)
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(seed, i, knobs, str(images_dir), quality, frames, motion, lens) for i in range(start, start + count)]
    coco: dict[str, Any] = {
        "info": {"description": "edge-annotator synthetic cabin scenes", "seed": seed, "start": start,
                 "count": count, "knobs": asdict(knobs),
                 **({"frames": frames, "motion": motion} if frames > 1 and lens is None else {}),
                 **({"lengths": list(lens), "motion": motion} if lens is not None else {})},
        "images": [], "annotations": [], "categories": categories(),
    }
    results: list[dict[str, Any]] = []
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            for n, r in enumerate(pool.map(_render_one, jobs, chunksize=8), 1):
                results.append(r)
                if progress:
                    progress(n, count)
    else:
        for n, job in enumerate(jobs, 1):
            results.append(_render_one(job))
            if progress:
                progress(n, count)
    ann_id = 1
    for img_id, r in enumerate(results, 1):
        coco["images"].append({"id": img_id, **r["image"]})
        for a in r["annotations"]:
            coco["annotations"].append({"id": ann_id, "image_id": img_id, **a})
            ann_id += 1
    write_json_atomic(out / "annotations.json", coco)
    log.info("wrote %d images, %d annotations to %s", count, ann_id - 1, out)
    return out
