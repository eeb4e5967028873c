"""Read a simulate run with some units trained 3 times: every unit at the mean of its trainings.

    PYTHONPATH=. python docs/simulate/units3x.py RUN OUT STRATEGY [STRATEGY ...]

``annotator simulate --repeats 3`` trains every unit of a run 3 times, the first bundles and
every strategy included; to measure only the units that decide the label saving (a rule's
40-review point and random's 80-review point, session 36), their extra trainings were added
beside the first in ``UNIT/repeat1`` and ``UNIT/repeat2`` with the benchmark's own
``exporter.simulate.train_and_evaluate`` (the same picks, training seeds ``seed + k * 1000``,
as ``--repeats`` trains them): ``docs/simulate/repeats.py RUN 3 UNIT ...`` (session 37; it
retrained one of session 36's trainings to the same metrics). This reads RUN's states of ``initial``, ``random`` and each
STRATEGY, sets each unit's metrics to the mean over the trainings it has (its ``metrics.json``
and ``repeat*/metrics.json``), and writes the benchmark's own report (``results.md``,
``results.json``, ``accuracy.png``) to OUT, with a line above the tables that lists how many
trainings each unit has. Nothing in RUN is changed.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from exporter.simulate_report import write_results  # noqa: E402
from repeats import run_config  # noqa: E402  (docs/simulate/repeats.py)


def unit_states(run: Path, strategies: list[str]) -> list[dict]:
    """RUN's states of the first bundles, random and ``strategies``, each at its trainings' mean."""
    states = []
    for seed_dir in sorted((run / "runs").glob("seed*")):
        for strategy in ["initial", "random", *strategies]:
            units = [seed_dir / "initial"] if strategy == "initial" else sorted((seed_dir / strategy).glob("round[0-9]"))
            for unit in units:
                state = json.loads((unit / "state.json").read_text())
                each = [json.loads(f.read_text()) for f in [unit / "metrics.json", *sorted(unit.glob("repeat*/metrics.json"))]]
                if each[0] != state["metrics"] and len(state.get("metrics_each") or []) == 1:
                    raise SystemExit(f"{unit}: metrics.json is not the state's training")
                state["metrics_each"] = each
                state["metrics"] = {k: float(np.mean([m[k] for m in each])) for k in each[0]}
                states.append(state)
    return states


def main(run: Path, out: Path, strategies: list[str]) -> None:
    cfg = run_config(run, out=out, strategies=("random", *strategies), settle=False)
    states = unit_states(run, strategies)
    out.mkdir(parents=True, exist_ok=True)
    write_results(cfg, states, 0.0)
    counts: dict[str, list[int]] = {}
    for s in states:
        counts.setdefault(f"{s['strategy']} round {s['round']}" if s["round"] else "first bundle", []).append(
            len(s["metrics_each"]))
    seeds = ", ".join(str(s) for s in sorted({s["seed"] for s in states}))
    line = f"Trainings per unit (seeds {seeds}): " + "; ".join(
        f"{name} {'/'.join(map(str, n))}" for name, n in counts.items()) + "."
    md = (out / "results.md").read_text().split("\n")
    (out / "results.md").write_text("\n".join([*md[:3], line, "", *md[3:]]))
    print("\n".join([line, *md[3:]]))


if __name__ == "__main__":
    if len(sys.argv) < 4:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
