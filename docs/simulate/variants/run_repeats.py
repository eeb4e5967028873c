"""Train one strategy's units 3 times on the default settings, without retraining random.

Usage: python docs/simulate/variants/run_repeats.py OUT [STRATEGY]

``annotator simulate --repeats 3`` retrains every strategy, random included, and every first
bundle 3 times; the verdict's run (docs/simulate/auto-labels-repeats3-named) already holds
random's and the judge's units trained 3 times, and its first bundles trained once. This runs,
per seed, the first bundle once (as the verdict's) and then STRATEGY's rounds (default
``judge_power``) with 3 trainings each, through the benchmark's own ``run_seed``, and writes
their states to ``OUT/states.json`` for ``with_repeats.py``. A folder resumes like a simulate run.
"""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from exporter.simulate import Progress, SimConfig, prepare_data, run_seed  # noqa: E402


def only(cfg: SimConfig, strategies: tuple[str, ...]) -> SimConfig:
    """``cfg`` running only ``strategies`` (SimConfig insists on random, the label saving's target)."""
    object.__setattr__(cfg, "strategies", strategies)
    return cfg


def main(out: Path, strategy: str = "judge_power") -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    base = SimConfig(out=out)
    out.mkdir(parents=True, exist_ok=True)
    test_dir, pools = prepare_data(base)
    first = only(replace(base), ())
    three = only(replace(base, repeats=3), (strategy,))
    states = []
    for seed in range(base.seeds):
        run_seed(first, seed, pools[seed], test_dir, Progress(1))
        states += run_seed(three, seed, pools[seed], test_dir, Progress(three.units_per_seed))
    (out / "states.json").write_text(json.dumps(states, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:3])
