"""``annotator bench`` on the demo bundle: every part runs and reports, config overrides reach
the daemon, bad ones are a clear error. Rates are printed, never asserted (noisy machines)."""
from __future__ import annotations

from pathlib import Path

import pytest

from service.bench import run_bench
from service.cli_daemon import DEMO_BUNDLE
from service.errors import ConfigError

SAMPLES = sorted((Path(DEMO_BUNDLE).parent / "samples").glob("*.jpg"))


def test_bench_runs_every_part_with_the_daemon_settings_given() -> None:
    report = run_bench(DEMO_BUNDLE, SAMPLES[:4], skip_ultralytics=True, sets={"engine.run_batch": "2"},
                       providers=["CPUExecutionProvider"])
    assert {"daemon drop folder", "daemon gRPC stream", "daemon gRPC unary (sequential)",
            "raw onnx sessions"} <= set(report.rates)
    assert all(rate > 0 for rate in report.rates.values())
    assert report.gpu_rate is None  # no GPU provider asked for: (a) ran on the CPU only
    assert "daemon engine runs on CPUExecutionProvider, 2 image(s) per session.run" in report.notes
    text = report.text()
    assert "ratio daemon drop folder / raw onnx sessions:" in text and "p99" in text


def test_bench_rejects_an_unknown_config_key() -> None:
    with pytest.raises(ConfigError, match="engine.nope: unknown key"):
        run_bench(DEMO_BUNDLE, SAMPLES[:2], skip_ultralytics=True, sets={"engine.nope": "1"})
