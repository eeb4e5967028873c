"""Does session 31's equal-training result hold with more training and with three trainings? (session 32)

    PYTHONPATH=. python docs/simulate/propagate/settle.py RUN train   # trains what is missing, in order
    PYTHONPATH=. python docs/simulate/propagate/settle.py RUN [OUT.json]  # prints (and stores) the tables

The report ends with a bootstrap of the three-training comparison (session 33): the trainings of
each compared unit resampled with replacement (and, in a second mode, the seeds too, the rule and
random sharing the drawn seeds), the label saving read as above: how sure is "<= 50 %"?

RUN: session 31's ``/work/runs/pw1b`` (``--propagate 64 --propagated-weight 1``, 3 seeds):
``oracle_scene`` (one review per recording) round 1 and ``round1_again`` (its 40 reviews trained a
second round), ``random`` rounds 1 and 2 and ``round1_again`` (``extra_round.py``). Session 31
found the rule's 40 reviews trained twice level with random's 80 (two rounds as well), one
training per unit. ``train`` adds, in this order (each unit resumes; stop it any time):

1. a third round on the same labels: the rule's 40 (``round1_again2`` from ``round1_again``) and
   random's 80 (``round2_again`` from ``round2``): is the rule still level when both have had
   three rounds, i.e. closer to training to convergence?
2. three trainings (``--repeats 3``: the unit's training seed + 1000 k, the same picks and the
   same starting bundle) of the two-round units the comparison reads: the rule's
   ``round1_again``, random's ``round2``, then random's ``round1_again``.
3. random's 40 a third round (``round1_again2``): what random's second 40 labels are worth after
   three rounds.
4. (session 33, after ``annotator simulate --strategies oracle_scene,random,judge --settle`` on the
   folder trained the product's ``judge``, dHash near-duplicates only, and its ``round1_again``)
   three trainings of the judge's ``round1_again``, then the first bundle a third round
   (``initial_again3``: the three-round curves' 0-review point).

Every comparison is printed for each rule (``RULES``) that has its units.
"""
from __future__ import annotations

import itertools
import json
import logging
import sys
from pathlib import Path

import numpy as np

from exporter.simulate import SimConfig, prepare_data, train_and_evaluate
from exporter.simulate_report import mean3, needed
from exporter.simulate_select import pool_predictions

REPEATS = 3
# (strategy, unit trained, the unit whose bundle it starts from, the unit whose picks it trains on, repeats)
PLAN = [
    ("oracle_scene", "round1_again2", "round1_again", "round1", 1),
    ("random", "round2_again", "round2", "round2", 1),
    ("oracle_scene", "round1_again", "round1", "round1", REPEATS),
    ("random", "round2", "round1", "round2", REPEATS),
    ("random", "round1_again", "round1", "round1", REPEATS),
    ("random", "round1_again2", "round1_again", "round1", 1),
    ("judge", "round1_again", "round1", "round1", REPEATS),
    ("", "initial_again3", "initial_again2", "initial", 1),  # "": the first bundle's units sit in the seed's folder
]
RULES = ("oracle_scene", "judge")  # the strategies compared with random
# what each compared point is: (strategy, unit, reviews, training rounds)
POINTS = [("oracle_scene", "round1_again", 40, 2), ("random", "round1_again", 40, 2), ("random", "round2", 80, 2),
          ("oracle_scene", "round1_again2", 40, 3), ("random", "round1_again2", 40, 3),
          ("random", "round2_again", 80, 3), ("judge", "round1_again", 40, 2)]


def train(out: Path) -> None:
    saved = json.loads((out / "config.json").read_text())
    base = {**saved, "out": out, "strategies": tuple(saved["strategies"])}
    test_dir, pools = prepare_data(SimConfig(**base))  # rendered already: nothing is drawn again
    cached = {}
    for strategy, unit, start, picks, repeats in PLAN:
        cfg = SimConfig(**{**base, "repeats": repeats})
        for seed, pool_dir in pools.items():
            root = out / "runs" / f"seed{seed}"
            if seed not in cached:
                coco = json.loads((pool_dir / "annotations.json").read_text())
                auto = pool_predictions(root / "initial" / "bundle", coco, pool_dir / "images",
                                        root / "initial" / "pool_records.json") if cfg.auto_weight > 0 else None
                cached[seed] = coco, auto
            coco, auto = cached[seed]
            labelled = json.loads((root / strategy / picks / "state.json").read_text())["labelled"]
            m, each = train_and_evaluate(cfg, root / strategy / unit, coco, labelled, pool_dir, test_dir,
                                         str(root / strategy / start / "bundle"), cfg.epochs, seed, False, auto)
            print(seed, strategy, unit, f"from {start}, picks of {picks}:", f"{mean3(m):.4f}",
                  f"({len(each)} trainings)", flush=True)


def trainings(unit: Path) -> list[float]:
    """Mean of the three of each finished training of a unit (``metrics.json``, ``repeat*/metrics.json``)."""
    files = [unit / "metrics.json", *sorted(unit.glob("repeat*/metrics.json"))]
    return [mean3(json.loads(f.read_text())) for f in files if f.is_file()]


def report(out: Path) -> dict:
    seeds = sorted(int(p.name[len("seed"):]) for p in (out / "runs").glob("seed*"))
    rep: dict = {"run": str(out), "seeds": seeds, "points": {}, "compare": {}}
    for strategy, unit, n, rounds in POINTS:
        by_seed = {s: trainings(out / "runs" / f"seed{s}" / strategy / unit) for s in seeds}
        if all(by_seed.values()):
            rep["points"][f"{strategy} {unit}"] = {"reviews": n, "rounds": rounds, "by_seed": by_seed}

    def seed_means(key: str, first_only: bool) -> list[float] | None:
        p = rep["points"].get(key)
        if not p:
            return None
        if first_only or any(len(v) < REPEATS for v in p["by_seed"].values()):
            return [p["by_seed"][s][0] for s in seeds] if first_only else None
        return [float(np.mean(p["by_seed"][s][:REPEATS])) for s in seeds]

    def first(rounds: int) -> float:
        """The first bundle's point: trained ``rounds`` rounds on its own labels where ``--settle`` did
        it (``initial_again2`` for two), else as trained (the curve's slope is then steeper)."""
        unit = f"initial_again{rounds if rounds > 1 else ''}"
        if not all((out / "runs" / f"seed{s}" / unit / "metrics.json").is_file() for s in seeds):
            unit = "initial"
        return float(np.mean([mean3(json.loads((out / "runs" / f"seed{s}" / unit / "metrics.json").read_text()))
                              for s in seeds]))

    readings = (("two rounds, one training", 2, True), (f"two rounds, {REPEATS} trainings", 2, False),
                ("three rounds, one training", 3, True))
    for name, (label, rounds, first_only) in itertools.product(RULES, readings):
        unit40 = "round1_again" if rounds == 2 else "round1_again2"
        unit80 = "round2" if rounds == 2 else "round2_again"
        rule, r40, r80 = (seed_means(f"{s} {u}", first_only) for s, u in
                          ((name, unit40), ("random", unit40), ("random", unit80)))
        if rule is None or r80 is None:
            continue
        y0 = first(rounds)
        row = {"rule_40": rule, "random_80": r80, "rule_minus_random_80": [a - b for a, b in zip(rule, r80)],
               "first": y0, "needed": needed([0, 40], [y0, float(np.mean(rule))], float(np.mean(r80)))}
        if r40 is not None:
            row["random_40"] = r40
            row["rule_minus_random_40"] = [a - b for a, b in zip(rule, r40)]
            row["random_second_40"] = [b - a for a, b in zip(r40, r80)]
        rep["compare"][f"{name}: {label}"] = row
    rep["bootstrap"] = {name: b for name in RULES if (b := bootstrap(rep, name, first(2)))}
    return rep


def bootstrap(rep: dict, name: str, first: float, draws: int = 4000) -> dict:
    """Rule ``name``'s three-training comparison, resampled (see the module's docstring): the
    5 / 50 / 95 % points of the needed share of random's 80 and how often it is <= 50 %."""
    seeds = rep["seeds"]
    pts = [rep["points"].get(k) for k in (f"{name} round1_again", "random round2")]
    if not all(pts) or any(len(p["by_seed"][s]) < REPEATS for p in pts for s in seeds):
        return {}
    rule, r80 = ([np.array(p["by_seed"][s][:REPEATS]) for s in seeds] for p in pts)
    rng = np.random.default_rng(0)
    out = {}
    for mode in ("trainings", "seeds and trainings"):
        shares, gains = [], []
        for _ in range(draws):
            picked = range(len(seeds)) if mode == "trainings" else rng.integers(0, len(seeds), len(seeds))
            a = np.mean([rng.choice(rule[i], REPEATS).mean() for i in picked])
            b = np.mean([rng.choice(r80[i], REPEATS).mean() for i in picked])
            n = needed([0, 40], [first, float(a)], float(b))
            shares.append(2.0 if n is None else n / 80)  # 2.0: not reached with 40
            gains.append(a - b)
        shares = np.array(shares)
        out[mode] = {"draws": draws, "share_5_50_95": [float(q) for q in np.percentile(shares, [5, 50, 95])],
                     "at_most_half": float(np.mean(shares <= 0.5)),
                     "gain_5_50_95": [float(q) for q in np.percentile(gains, [5, 50, 95])]}
    return out


def main(out: Path, dest: Path | None) -> dict:
    rep = report(out)
    seeds = rep["seeds"]
    for key, p in rep["points"].items():
        each = "; ".join(f"seed {s}: " + ", ".join(f"{v:.4f}" for v in p["by_seed"][s]) for s in seeds)
        print(f"{key:28s} {p['reviews']} reviews, {p['rounds']} rounds: {each}")

    def fmt(xs: list[float], sign: str = "") -> str:
        return f"{np.mean(xs):{sign}.4f} ({', '.join(f'{x:{sign}.4f}' for x in xs)})"

    for label, row in rep["compare"].items():
        n = row["needed"]
        print(f"\n{label}: rule's 40 {fmt(row['rule_40'])}, random's 80 {fmt(row['random_80'])}; "
              f"rule - random's 80 {fmt(row['rule_minus_random_80'], '+')}; needed "
              f"{'not reached with 40' if n is None else f'{n:.1f} of 80 ({n / 80:.0%})'} (0 reviewed: {row['first']:.4f})")
        if "random_40" in row:
            print(f"  random's 40 {fmt(row['random_40'])}; rule - random's 40 {fmt(row['rule_minus_random_40'], '+')}; "
                  f"random's second 40 labels {fmt(row['random_second_40'], '+')}")
    for name, modes in rep["bootstrap"].items():
        for mode, b in modes.items():
            lo, mid, hi = (f"{q:.0%}" if q <= 1 else "not reached" for q in b["share_5_50_95"])
            print(f"{name} bootstrap ({mode}, {b['draws']} draws): needed {lo} / {mid} / {hi} (5 / 50 / 95 %), "
                  f"<= 50 % in {b['at_most_half']:.1%} of draws; rule - random's 80 "
                  + " / ".join(f"{g:+.4f}" for g in b["gain_5_50_95"]))
    if dest:
        dest.write_text(json.dumps(rep, indent=1))
    return rep


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    if sys.argv[2:3] == ["train"]:
        train(Path(sys.argv[1]))
    else:
        main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None)
