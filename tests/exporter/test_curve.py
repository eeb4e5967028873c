"""``annotator learning-curve``: one bundle per training-set size, evaluated on one test set."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from exporter.curve import CurveConfig, run_curve, table_markdown


def test_table_markdown_formats_missing_values() -> None:
    row = {"train_images": 1000, "head_map50": None, "head_map50_95": 0.5, "oks_ap": 0.25, "oks_ap50": 0.75,
           "visibility_accuracy": 0.8}
    line = table_markdown([row]).splitlines()[-1]
    assert line == "| 1,000 | n/a | 0.500 | 0.250 | 0.750 | n/a | 0.800 | n/a |"


@pytest.mark.slow
def test_learning_curve_trains_each_size_once(tmp_path: Path, ultralytics_offline: Path) -> None:
    cfg = CurveConfig(root=tmp_path / "curve", sizes=(16, 8), test_count=4, epochs=1, imgsz=96, batch=8)
    rows = run_curve(cfg)
    assert [r["train_images"] for r in rows] == [8, 16]  # sorted by size
    for r in rows:
        assert all(0.0 <= r[k] <= 1.0 for k in ("oks_ap50", "visibility_accuracy"))
        assert json.loads((cfg.root / f"size-{r['train_images']}" / "bundle" / "bundle.json").read_text())["id"] \
            == r["bundle_id"]
        coco = json.loads((cfg.root / f"size-{r['train_images']}" / "data" / "annotations.json").read_text())
        assert len(coco["images"]) == r["train_images"]
    saved = json.loads((cfg.root / "curve.json").read_text())
    assert saved["rows"] == rows
    assert (cfg.root / "curve.png").stat().st_size > 0
    assert (cfg.root / "curve.md").read_text() == table_markdown(rows)
    # A re-run reuses the finished sizes: nothing is trained or evaluated again.
    stamps = {n: (cfg.root / f"size-{n}" / "eval" / "metrics.json").stat().st_mtime for n in (8, 16)}
    again = run_curve(CurveConfig(root=cfg.root, sizes=(8, 16), test_count=4, epochs=1, imgsz=96, batch=8))
    assert again == rows
    assert {n: (cfg.root / f"size-{n}" / "eval" / "metrics.json").stat().st_mtime for n in (8, 16)} == stamps
