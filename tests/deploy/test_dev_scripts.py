"""``deploy/dev/gpu_simulate.sh`` (the benchmark on a borrowed GPU machine): it reaches
``annotator simulate`` with the GPU flags, and where polars is missing it writes the stand-in
whose ``read_csv`` raises, which ultralytics' trainer turns into an empty results table."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "dev" / "gpu_simulate.sh"


def test_gpu_simulate_reaches_the_benchmark_and_stands_in_for_polars(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("ultralytics")
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "polars.py").write_text('raise ImportError("hidden: the machine has no polars")\n')
    py = tmp_path / "python"  # this Python, without polars
    py.write_text(f'#!/bin/sh\nPYTHONPATH="${{PYTHONPATH:+$PYTHONPATH:}}{hide}" exec {sys.executable} "$@"\n')
    py.chmod(0o755)
    site = tmp_path / "site"
    env = {**os.environ, "PYTHON": str(py), "SITE": str(site), "DEVICE": "cpu", "WORKERS": "0"}
    env.pop("PYTHONPATH", None)
    run = subprocess.run([str(SCRIPT), str(tmp_path / "out"), "--help"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "polars missing: stand-in" in run.stdout and "--device" in run.stdout and "--workers" in run.stdout
    assert "ultralytics 8." in run.stdout
    stub = site / "polars" / "__init__.py"
    assert stub.is_file()
    # ultralytics' own use of it: the trainer's results table becomes {} (its try/except), no crash
    csv = tmp_path / "results.csv"
    csv.write_text("epoch,loss\n1,0.5\n")
    probe = subprocess.run(
        [str(py), "-c", "import pathlib, polars\nfrom ultralytics.engine.trainer import BaseTrainer\n"
                        f"class T: csv = pathlib.Path({str(csv)!r})\n"
                        "print(polars.__doc__)\nprint(BaseTrainer.read_results_csv(T()))"],
        env={**env, "PYTHONPATH": f"{site}"}, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert probe.returncode == 0 and "Stand-in" in probe.stdout and probe.stdout.strip().endswith("{}"), probe.stderr
