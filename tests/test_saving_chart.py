"""docs/simulate/saving_chart.py: the README's label-saving chart reads the stored reports."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SIMULATE_DOCS = ROOT / "docs" / "simulate"


@pytest.fixture(scope="module")
def chart():
    spec = importlib.util.spec_from_file_location("saving_chart", SIMULATE_DOCS / "saving_chart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_every_row_reads_its_report_and_the_chart_is_drawn(chart, tmp_path: Path) -> None:
    rows = chart.read_rows()
    assert len(rows) == len(chart.ROWS)
    for r in rows:
        for key in ("as_trained", "equal_training"):
            assert r[key] is None or 0.0 < r[key] <= 1.0, r
        assert r["has_equal"] or r["equal_training"] is None
    # the first row is the verdict: the fraction the report's own bar line read
    verdict = json.loads((SIMULATE_DOCS / chart.ROWS[0][2]).read_text())["bar"]
    assert rows[0]["strategy"] == "judge" and rows[0]["as_trained"] == pytest.approx(verdict["judge_fraction_mean3"])
    pytest.importorskip("matplotlib", reason="draws with matplotlib (the train extra)")
    out = tmp_path / "chart.png"
    assert chart.main([str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = chart.table(rows)
    assert table.count("\n") == len(rows) + 1 and "not reached" not in table.splitlines()[2]
