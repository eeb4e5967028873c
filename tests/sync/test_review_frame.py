"""The frame a Ground Truth worker sees is the frame of the manifest and of the merge.

Ground Truth's worker UI shows the uploaded object's stored pixels (no EXIF rotation), while
the manifest's sizes and coordinates are the record's, upright. An EXIF-turned JPEG uploaded as
it was came back with answers in the stored frame, and the merge stored them as upright ones.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from gtworker import answer, output_line
from service.keypoints import CABIN19_NAMES
from service.store import Store
from sync.dataset import Dataset
from sync.groundtruth import OUTPUT_MANIFEST, GroundTruthBackend
from sync.merge import Merger
from sync.objectstore import LocalFolderStore
from sync.uploader import Uploader, UploadSettings
from test_reencode import _image

def _turned_jpeg() -> bytes:
    """640x480 upright, stored as 480x640 with EXIF orientation 6; a white square at 560..608,
    400..448 upright."""
    data, centre = _image(640, 480, orientation=6)
    assert centre == (584.0, 424.0)
    return data


def _worker_box(stored: np.ndarray) -> tuple[float, float, float, float]:
    """Where a worker draws the head: around the white square of the pixels shown."""
    ys, xs = np.nonzero(stored[..., 1] > 128)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


@pytest.mark.parametrize("max_side", [None, 320])
def test_a_worker_shown_the_stored_pixels_answers_in_the_records_frame(tmp_path: Path, max_side: int | None) -> None:
    store = Store(tmp_path / "store")
    image_id, _ = store.ingest(_turned_jpeg(), "drop/turned.jpg")
    store.claim("w", 1)
    truth = [560.0, 400.0, 608.0, 448.0]  # the square, upright
    record = {"width": 640, "height": 480, "keypoint_names": list(CABIN19_NAMES),
              "heads": [{"box": [t + 3 for t in truth], "conf": 0.9}], "persons": []}
    store.complete(image_id, "w", record, "b1", "review", 0.4, [], audit=False)
    target = LocalFolderStore(tmp_path / "bucket")
    uploader = Uploader(store, target, UploadSettings("app1", max_side=max_side))
    while uploader.run_once():
        pass

    (key,) = target.list("images/")
    stored = cv2.imdecode(np.frombuffer(target.get(key), np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    (manifest,) = target.list("manifests/")
    line = json.loads(target.get(manifest).decode().splitlines()[0])
    size = line["auto-kpts"]["image_size"]
    assert (size["width"], size["height"]) == (stored.shape[1], stored.shape[0])  # the frame the worker sees
    content = answer([_worker_box(stored)], [], CABIN19_NAMES, size=(stored.shape[1], stored.shape[0]))
    target.put(f"groundtruth/output/j/{OUTPUT_MANIFEST}", (json.dumps(output_line(line, content, "j")) + "\n").encode())

    labels = list(GroundTruthBackend(target, appliance_id="app1").collect())
    dataset = Dataset(tmp_path / "dataset", holdout_fraction=0.0)
    report = Merger(store, dataset).merge(labels)
    assert report.merged == [image_id], report.skipped
    label = dataset.get(image_id).label
    assert (label["width"], label["height"]) == (640, 480)
    assert label["heads"][0] == pytest.approx(truth, abs=2.5 if max_side else 0.5)
    dataset.close()
    store.close()
