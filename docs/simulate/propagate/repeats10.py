"""Propagation at the product's gate (10 bits), every unit trained 3 times, against the verdict.

    PYTHONPATH=. python docs/simulate/propagate/repeats10.py RUN [OUT.json]

RUN: an ``annotator simulate --propagate 10 --repeats 3`` folder (the verdict's seeds and first
bundles). Reads every finished training of every unit (``metrics.json`` of the unit and of its
``repeat{k}``, so a unit still training counts what it has) and the verdict's units
(``docs/simulate/auto-labels-repeats3-named/results.json``, the same settings without
propagation, also three trainings), and prints per strategy and round the mean of the three
accuracies by seed and training, the 3-seed mean, its gain from propagation and the judge's
gain over random paired by seed.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from exporter.simulate_report import mean3

VERDICT = Path(__file__).resolve().parents[1] / "auto-labels-repeats3-named" / "results.json"


def trainings(unit: Path) -> list[float]:
    """The mean of the three of each finished training of ``unit`` (first, then the repeats)."""
    where = [unit, *sorted(unit.glob("repeat*"))]
    return [mean3(json.loads((w / "metrics.json").read_text())) for w in where if (w / "metrics.json").is_file()]


def collect(run: Path) -> dict[tuple[str, int], dict[int, list[float]]]:
    got: dict[tuple[str, int], dict[int, list[float]]] = {}
    for seed_dir in sorted((run / "runs").glob("seed*")):
        seed = int(seed_dir.name[4:])
        for unit in sorted(seed_dir.glob("*/round*")):
            runs = trainings(unit)
            if runs:
                got.setdefault((unit.parent.name, int(unit.name[5:])), {})[seed] = runs
    return got


def verdict() -> dict[tuple[str, int], dict[int, list[float]]]:
    got: dict[tuple[str, int], dict[int, list[float]]] = {}
    for u in json.loads(VERDICT.read_text())["units"]:
        got.setdefault((u["strategy"], u["round"]), {})[u["seed"]] = [mean3(m) for m in u["metrics_each"]]
    return got


def main(run: Path, out: Path | None) -> dict:
    new, old = collect(run), verdict()
    rows, report = [], {"run": str(run), "units": {}, "gains": {}}
    print("| unit | seed 0 | seed 1 | seed 2 | mean (trainings) | without propagation (verdict) | propagation's gain |")
    print("|---|---|---|---|---:|---:|---:|")
    for (strategy, rnd), by_seed in sorted(new.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        means = {s: float(np.mean(v)) for s, v in by_seed.items()}
        complete = sorted(by_seed) == [0, 1, 2]
        m = float(np.mean(list(means.values())))
        ref = old.get((strategy, rnd), {})
        ref_m = float(np.mean([np.mean(ref[s]) for s in by_seed])) if ref else float("nan")
        cells = [" / ".join(f"{x:.3f}" for x in by_seed.get(s, [])) or "-" for s in range(3)]
        n = sum(len(v) for v in by_seed.values())
        print(f"| {strategy} after {rnd * 40} | {' | '.join(cells)} | {m:.3f} ({n}){'' if complete else ' partial'} "
              f"| {ref_m:.3f} | {m - ref_m:+.3f} |")
        report["units"][f"{strategy}/round{rnd}"] = {"by_seed": {str(s): v for s, v in by_seed.items()},
                                                      "mean": m, "verdict_mean": ref_m}
        rows.append((strategy, rnd, means))
    print()
    for rnd in sorted({r for _, r, _ in rows}):
        j = next((m for s, r, m in rows if s == "judge" and r == rnd), None)
        r_ = next((m for s, r, m in rows if s == "random" and r == rnd), None)
        if j and r_:
            seeds = sorted(set(j) & set(r_))
            g = [j[s] - r_[s] for s in seeds]
            print(f"judge - random after {rnd * 40}: {np.mean(g):+.3f} ({', '.join(f'{x:+.3f}' for x in g)})")
            report["gains"][str(rnd * 40)] = {"mean": float(np.mean(g)), "by_seed": g}
    if out:
        out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None)
