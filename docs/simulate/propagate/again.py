"""One review per recording given the training rounds random's 80 reviews get (session 31).

    PYTHONPATH=. python docs/simulate/propagate/again.py RUN [REF.json] [OUT.json]

RUN: ``annotator simulate --propagate 64 --propagated-weight 1 --strategies oracle_scene,random
--rounds 1`` (first bundles and round 1), then ``docs/simulate/roof-auto/extra_round.py RUN
oracle_scene[,random] 1``: each round-1 bundle trained one more round of ``--epochs`` on the
same labelled images (``STRATEGY/round1_again/metrics.json``), so that its 40 reviews have had
the two trainings random's 80 reviews had. REF: ``weight1.json`` (session 28-29's run of the
same settings on the same seeds, whose random after 80 is the target; its run folder is gone).

Prints and stores per seed: the first bundle and each unit of RUN beside REF's unit of the same
strategy and round (how well this box reproduces REF), each ``round1_again`` unit against random
after 80 (REF's, and RUN's own where its ``random`` round 2 is there: ``--strategies random
--rounds 2`` on RUN), their paired differences, and the reviews each needs to reach that target
on the curve first bundle -> 40 reviews trained twice -> REF's 80 (``needed``); with
``extra_round.py RUN random 1`` as well, the rule's gain over random with both 40s trained twice.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from exporter.simulate_report import mean3, needed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from weight1 import units  # noqa: E402  (a sibling script, not a package)


def again_units(run: Path) -> dict[str, dict[int, float]]:
    """strategy -> seed -> mean of the three of its ``round1_again`` training."""
    got: dict[str, dict[int, float]] = {}
    for f in sorted((run / "runs").glob("seed*/*/round1_again/metrics.json")):
        seed, strategy = int(f.parents[2].name[len("seed"):]), f.parents[1].name
        got.setdefault(strategy, {})[seed] = mean3(json.loads(f.read_text()))
    return got


def report(run: Path, ref_path: Path) -> dict:
    u, again = units(run), again_units(run)
    ref = json.loads(ref_path.read_text())[0]["curves"]
    seeds = sorted(u[("initial", 0)])
    target = {s: ref["random"]["by_seed"]["2"][str(s)] for s in seeds}
    out: dict = {"run": str(run), "ref": str(ref_path), "seeds": seeds,
                 "initial": u[("initial", 0)], "units": {}, "again": again, "target_by_seed": target,
                 "vs_target": {}, "needed": {}}
    for (strategy, r), by_seed in sorted(u.items()):
        if r == 0:
            continue
        theirs = ref.get(strategy, {}).get("by_seed", {}).get(str(r), {})
        out["units"][f"{strategy} {r}"] = {"here": by_seed, "ref": {int(k): v for k, v in theirs.items()}}
    first = float(np.mean([out["initial"][s] for s in seeds]))
    targets = {"ref": target}
    if sorted(u.get(("random", 2), {})) == seeds:  # this run's own random after 80: the same box
        targets["here"] = u[("random", 2)]
    goals = out["targets"] = {where: float(np.mean([tgt[s] for s in seeds])) for where, tgt in targets.items()}
    for strategy, by_seed in again.items():
        if sorted(by_seed) != seeds:
            continue
        mean = float(np.mean([by_seed[s] for s in seeds]))
        later = ref.get(strategy, {}).get("y", [])[2:3]  # REF's round 2 (80 reviews, two trainings as well)
        for where, tgt in targets.items():
            d = [by_seed[s] - tgt[s] for s in seeds]
            out["vs_target"][f"{strategy} vs {where}"] = {"mean": mean, "diff": float(np.mean(d)), "by_seed": d,
                                                         "target": goals[where]}
            out["needed"][f"{strategy} vs {where}"] = needed([0, 40, 80][:2 + len(later)], [first, mean, *later],
                                                             goals[where])
    if all(sorted(again.get(k, {})) == seeds for k in ("oracle_scene", "random")):
        g = [again["oracle_scene"][s] - again["random"][s] for s in seeds]  # both 40 reviews, two rounds
        out["gain_trained_twice"] = {"mean": float(np.mean(g)), "by_seed": g}
    return out


def main(run: Path, ref: Path, dest: Path | None) -> dict:
    rep = report(run, ref)
    seeds = rep["seeds"]
    init, tgt = rep["initial"], rep["target_by_seed"]
    print(f"first bundle: {np.mean([init[s] for s in seeds]):.4f} ({', '.join(f'{init[s]:.4f}' for s in seeds)})")
    for k, v in rep["units"].items():
        here = ", ".join(f"{v['here'].get(s, float('nan')):.4f}" for s in seeds)
        there = ", ".join(f"{v['ref'].get(s, float('nan')):.4f}" for s in seeds)
        print(f"{k:16s} here {here}  |  {ref.name} {there}")
    print(f"target (REF random after 80): {rep['targets']['ref']:.4f} ({', '.join(f'{tgt[s]:.4f}' for s in seeds)})")
    for k, v in rep["vs_target"].items():
        n = rep["needed"][k]
        print(f"{k}: round 1 trained again {v['mean']:.4f}, against random after 80 ({v['target']:.4f}) "
              f"{v['diff']:+.4f} ({', '.join(f'{x:+.4f}' for x in v['by_seed'])}); needed: "
              f"{'not reached' if n is None else f'{n:.0f} ({n / 80:.0%})'}")
    if "gain_trained_twice" in rep:
        g = rep["gain_trained_twice"]
        print(f"oracle_scene over random, 40 reviews each trained twice: {g['mean']:+.4f} "
              f"({', '.join(f'{x:+.4f}' for x in g['by_seed'])})")
    if dest:
        dest.write_text(json.dumps(rep, indent=1))
    return rep


if __name__ == "__main__":
    args = [Path(a) for a in sys.argv[1:]]
    out = args.pop() if len(args) == 3 else None
    ref = args[1] if len(args) > 1 else Path(__file__).with_name("weight1.json")
    main(args[0], ref, out)
