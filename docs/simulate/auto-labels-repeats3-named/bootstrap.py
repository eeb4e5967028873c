"""How sure is a label-saving figure? A bootstrap over the trainings (and the seeds) of a run.

Reads a results.json of ``annotator simulate --repeats N`` (its ``units`` carry every training's
metrics in ``metrics_each``). Each draw resamples, with replacement, the N trainings of every unit
(``trainings``) or, in addition, the seeds (``seeds and trainings``; random and the strategy
share the drawn seeds, so the pairing is kept), rebuilds the mean-of-the-three curves and reads
the strategy's label saving exactly as the report does (reviewed images needed to reach random's
mean at its full budget, linear between rounds). Prints the 5 / 50 / 95 % points of the fraction
and how often it is <= 50 % (the bar of issue 5), per strategy.

    python bootstrap.py results.json [draws]
"""
import json
import sys

import numpy as np

from exporter.simulate_report import METRICS, needed

res = json.loads(open(sys.argv[1]).read())
draws = int(sys.argv[2]) if len(sys.argv) > 2 else 4000
units = res["units"]
seeds = sorted({u["seed"] for u in units})
strategies = [s for s in res["settings"]["strategies"] if s != "random"]
rounds = sorted({u["round"] for u in units})
each = {(u["seed"], u["strategy"], u["round"]): np.array([np.mean([m[k] for k in METRICS]) for m in u["metrics_each"]])
        for u in units}


def curve(strategy, picked_seeds, rng):
    ys = []
    for r in rounds:
        key = "initial" if r == 0 else strategy
        vals = []
        for s in picked_seeds:
            t = each[(s, key, r)]
            vals.append(t[rng.integers(0, len(t), len(t))].mean() if rng is not None else t.mean())
        ys.append(float(np.mean(vals)))
    return ys


NOT_REACHED = 99.0  # a draw whose curve never reaches the target
rng = np.random.default_rng(0)
x = [r * res["settings"]["per_round"] for r in rounds]
budget = x[-1]
print(f"{res['settings']['out']}: {len(seeds)} seeds, trainings per unit "
      f"{sorted({len(v) for v in each.values()})}, {draws} draws")
print(f"| strategy | resampled | as reported | 5 % | median | 95 % | draws <= 50 % |")
print("|---|---|---:|---:|---:|---:|---:|")
for strategy in strategies:
    point = needed(x, curve(strategy, seeds, None), curve("random", seeds, None)[-1])
    for mode in ("trainings", "seeds and trainings"):
        fr = []
        for _ in range(draws):
            ps = seeds if mode == "trainings" else list(rng.choice(seeds, len(seeds)))
            sub = np.random.default_rng(rng.integers(1 << 62))
            rnd, mine = curve("random", ps, sub), curve(strategy, ps, sub)
            n = needed(x, mine, rnd[-1])
            fr.append(NOT_REACHED if n is None else n / budget)
        fr = np.array(fr)
        q = np.percentile(fr, [5, 50, 95])
        f = lambda v: "not reached" if v >= NOT_REACHED else f"{100 * v:.0f} %"
        print(f"| {strategy} | {mode} | {f(point / budget if point is not None else NOT_REACHED)} | {f(q[0])} | {f(q[1])} | "
              f"{f(q[2])} | {100 * np.mean(fr <= 0.5):.1f} % |")
