"""Helpers for the sync tests: a daemon store holding images in every state that matters."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from service.keypoints import COCO17_NAMES
from service.record import Head, Keypoint, Person, Prediction
from service.store import Store


def make_jpeg(index: int, width: int = 64, height: int = 48) -> bytes:
    """A small, distinct JPEG per index (a gradient with the index drawn into it)."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    img = np.concatenate([x + 0 * y, y + 0 * x, np.full((height, width, 1), (index * 37) % 256, np.float32)], axis=2)
    img = np.ascontiguousarray(img.astype(np.uint8))
    cv2.putText(img, str(index), (2, height - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1)
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    return buf.tobytes()


def prediction(width: int, height: int, persons: int = 1) -> Prediction:
    """A plausible record: one head, ``persons`` persons with 17 points in all three states."""
    vis = ("visible", "occluded", "outside")
    people = tuple(Person((0.1 * width, 0.1 * height, 0.9 * width, 0.95 * height), 0.9 - 0.01 * p, tuple(
        Keypoint(width * (0.2 + 0.03 * k), height * (0.1 + 0.04 * k), 0.8, 0.5, vis[k % 3])
        for k in range(len(COCO17_NAMES)))) for p in range(persons))
    return Prediction(width, height, (Head((0.3 * width, 0.1 * height, 0.6 * width, 0.4 * height), 0.77),), people)


def fill_store(root: Path, review: int, auto: int = 0, width: int = 64, height: int = 48,
               start: int = 0) -> tuple[Store, list[str], list[str]]:
    """A store with ``review`` review-pending and ``auto`` auto-accepted images: (store, review ids, auto ids)."""
    store = Store(root)
    ids: dict[str, list[str]] = {"review": [], "auto_accepted": []}
    for n in range(start, start + review + auto):
        decision = "review" if n - start < review else "auto_accepted"
        image_id, _ = store.ingest(make_jpeg(n, width, height), f"drop/{n}.jpg")
        (row,) = store.claim("test-worker", 1)
        record = {**prediction(width, height).to_json(), "keypoint_names": list(COCO17_NAMES),
                  "bundle_id": "bundle-1", "annotated_at": 1_800_000_000.0 + n}
        store.complete(row.image_id, "test-worker", record, "bundle-1", decision, 0.4, ["kpt_near_threshold"],
                       audit=n % 5 == 0)
        ids[decision].append(image_id)
    return store, ids["review"], ids["auto_accepted"]
