"""A relative OUT (or --work), as every command in the README gives it, trains where it names."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest


def test_a_relative_work_folder_is_where_ultralytics_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           ultralytics_offline: None) -> None:
    """ultralytics 8.4.190 puts a relative ``project`` under its settings' ``runs_dir/<task>/``
    (the runs folder of whichever checkout first made the settings), so ``annotator train DATA
    runs/b`` trained into ``<runs_dir>/detect/runs/b.work/runs/head`` and then stopped with
    "model file runs/b.work/runs/head/weights/best.pt does not exist" (``simulate --quick`` too)."""
    pytest.importorskip("ultralytics")
    from ultralytics.cfg import get_save_dir

    from exporter.train import TrainConfig, train_args

    monkeypatch.chdir(tmp_path)
    data_yaml = tmp_path / "data.yaml"
    data_yaml.write_text("path: .\ntrain: images\nnames: {0: head}\n")
    cfg = TrainConfig(annotations=Path("d/annotations.json"), images=Path("d/images"), out=Path("runs/b"),
                      work=Path("runs/b.work"), epochs=1)
    _, args = train_args(cfg, "head", data_yaml)
    save_dir = get_save_dir(SimpleNamespace(**{**args, "task": "detect", "mode": "train"}))
    assert save_dir == (tmp_path / "runs" / "b.work" / "runs" / "head").resolve()
