"""Float16 weight storage: half the bytes, the same outputs within float16 rounding."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.bundle import load_bundle
from service.engine import Engine


def test_compact_bundle_keeps_predictions(tmp_path: Path, coco17_bundle, coco_people_photos) -> None:
    pytest.importorskip("onnx")
    from exporter.compact import compact_bundle

    small = compact_bundle(coco17_bundle.path, tmp_path / "small")
    assert small.id != coco17_bundle.id and small.lineage["parent_bundle"] == coco17_bundle.id
    big_bytes = sum((coco17_bundle.path / m.file).stat().st_size for m in coco17_bundle.models.values())
    small_bytes = sum((small.path / m.file).stat().st_size for m in small.models.values())
    assert small_bytes < 0.6 * big_bytes
    assert load_bundle(small.path).id == small.id
    from service.imageio import read_image

    images = [read_image(p) for p in coco_people_photos[:3]]
    a, b = Engine(coco17_bundle).predict(images), Engine(small).predict(images)
    for pa, pb in zip(a, b):
        assert len(pa.persons) == len(pb.persons)
        for x, y in zip(pa.persons, pb.persons):
            assert np.allclose(x.box, y.box, atol=2.0)
