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

from exporter.simulate_report import mean3, needed

res = json.loads(open(sys.argv[1]).read())
draws = int(sys.argv[2]) if len(sys.argv) > 2 else 4000
units = res["units"]
seeds = sorted({u["seed"] for u in units})
strategies = [s for s in res["settings"]["strategies"] if s != "random"]
rounds = sorted({u["round"] for u in units})
each = {(u["seed"], u["strategy"], u["round"]): np.array([mean3(m) for m in u["metrics_each"]]) for u in units}


NOT_REACHED = 99.0  # a draw whose curve never reaches the target


def curve(strategy, picked_seeds, rng):
    """Mean over ``picked_seeds`` of each round's mean of the three, every unit's trainings resampled."""
    ys = []
    for r in rounds:
        key = "initial" if r == 0 else strategy
        trainings = [each[(s, key, r)] for s in picked_seeds]
        ys.append(float(np.mean([t[rng.integers(0, len(t), len(t))].mean() for t in trainings])))
    return ys


def f(v):
    return "not reached" if v is None or v >= NOT_REACHED else f"{100 * v:.0f} %"


rng = np.random.default_rng(0)
x = res["curves"]["random"]["x"]
budget = x[-1]
print(f"{res['settings']['out']}: {len(seeds)} seeds, trainings per unit "
      f"{sorted({len(v) for v in each.values()})}, {draws} draws")
print("| strategy | resampled | as reported | 5 % | median | 95 % | draws <= 50 % |")
print("|---|---|---:|---:|---:|---:|---:|")
for strategy in strategies:
    point = res["label_saving"]["strategies"][strategy]["mean3"]["fraction"]  # the report's own figure
    for mode in ("trainings", "seeds and trainings"):
        fr = []
        for _ in range(draws):
            ps = seeds if mode == "trainings" else list(rng.choice(seeds, len(seeds)))
            sub = np.random.default_rng(rng.integers(1 << 62))
            target = curve("random", ps, sub)[-1]
            # the strategy's own reviews per round: a rule that ran out of candidates sent fewer
            n = needed(res["curves"][strategy]["x"], curve(strategy, ps, sub), target)
            fr.append(NOT_REACHED if n is None else n / budget)
        fr = np.array(fr)
        q = np.percentile(fr, [5, 50, 95])
        print(f"| {strategy} | {mode} | {f(point)} | {f(q[0])} | {f(q[1])} | {f(q[2])} | "
              f"{100 * np.mean(fr <= 0.5):.1f} % |")
