"""How much a doubling of random's reviews is worth, and how far the picks get toward one.

Usage: python docs/simulate/headroom/curve.py [ORACLE_RUN [EXTRA_RUN]]

Reads, all on the default settings and the same three seeds and first bundles (the benchmark is
deterministic on one machine):

- the verdict (``docs/simulate/auto-labels-repeats3-named/results.json``): random and the judge
  after 40 and 80 reviews, two rounds of 40, every unit the mean of 3 trainings;
- ``random-80.json``, ``random-160.json``, ``random-760.json`` in this folder: random with one
  round of 80, 160 and 760 reviews from the first bundle (``annotator simulate --strategies random
  --rounds 1 --per-round N``, one training per unit; 760 is the whole pool, no auto labels left);
- ``oracle3.json`` in this folder (or ORACLE_RUN's ``results.json``): ``oracle_error`` and random,
  every unit trained 3 times; its random units must equal the verdict's to the last digit;
- ``extra_round.json`` in this folder (or collected from EXTRA_RUN, a ``--rounds 1`` run of the
  judge and random on which ``docs/simulate/roof-auto/extra_round.py RUN judge,random 1 3`` trained
  every round-1 bundle one more round on the same reviewed images, no new reviews, 3 trainings):
  the judge's and random's 40 reviews given the second round that random's 80 have.

Writes ``results.md`` and ``curve.png`` here and prints the table. The "label multiplier" of a
strategy after 40 reviews is how many random reviews its accuracy is worth, read on random's
log-linear curve through its 40- and 80-review points (one doubling = random's gain from 40 to
80), divided by 40; the bar of issue 5 needs 2.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
from statistics import fmean as _mean
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT))

from exporter.simulate_report import mean3  # noqa: E402

VERDICT = ROOT / "docs/simulate/auto-labels-repeats3-named/results.json"
ONE_ROUND = (80, 160, 760)


def _units(path: Path) -> list[dict]:
    return json.loads(path.read_text())["units"]


def _curve(units: list[dict], strategy: str) -> dict[int, list[float]]:
    """reviewed -> the per-seed mean of the three (each the mean of the unit's trainings)."""
    out: dict[int, list[float]] = {}
    for u in sorted(units, key=lambda u: u["seed"]):
        if u["strategy"] in (strategy, "initial"):
            out.setdefault(u["n_reviewed"], []).append(mean3(u["metrics"]))
    return out


def _collect_extra(run: Path) -> None:
    """EXTRA_RUN's second rounds without new reviews -> extra_round.json (per seed and strategy)."""
    rows = []
    for unit in sorted(run.glob("runs/seed*/*/round1_again")):
        each = [json.loads((unit / "metrics.json").read_text())]
        each += [json.loads(p.read_text()) for p in sorted(unit.glob("repeat*/metrics.json"))]
        rows.append({"seed": int(unit.parent.parent.name[4:]), "strategy": unit.parent.name, "round": 1,
                     "n_reviewed": 40, "metrics_each": each,
                     "metrics": {k: _mean(m[k] for m in each) for k in each[0]}})
    if not rows or any(len(r["metrics_each"]) != 3 for r in rows):
        raise SystemExit(f"{run}: expected round1_again units trained 3 times")
    (HERE / "extra_round.json").write_text(json.dumps({"units": rows}, indent=1) + "\n")


def main(oracle_run: Path | None = None, extra_run: Path | None = None) -> dict:
    if oracle_run is not None:
        shutil.copyfile(oracle_run / "results.json", HERE / "oracle3.json")
    if extra_run is not None:
        _collect_extra(extra_run)
    verdict = _units(VERDICT)
    oracle = _units(HERE / "oracle3.json")
    verdict_random = {(u["seed"], u["round"]): u["metrics_each"] for u in verdict if u["strategy"] == "random"}
    for u in oracle:
        if u["strategy"] == "random" and u["metrics_each"] != verdict_random[(u["seed"], u["round"])]:
            raise SystemExit(f"oracle3.json: random seed {u['seed']} round {u['round']} differs from the verdict's")
    rand, judge, orc = _curve(verdict, "random"), _curve(verdict, "judge"), _curve(oracle, "oracle_error")
    one = {n: _curve(_units(HERE / f"random-{n}.json"), "random")[n] for n in ONE_ROUND}
    extra = _units(HERE / "extra_round.json")
    again = {s: [mean3(u["metrics"]) for u in sorted(extra, key=lambda u: u["seed"]) if u["strategy"] == s]
             for s in ("judge", "random")}
    slope = _mean(rand[80]) - _mean(rand[40])  # one doubling of random's reviews
    rows = []

    def row(name: str, n: int, ys: list[float], trainings: int, rounds: int) -> None:
        gain = _mean(ys) - _mean(rand[40]) if n == 40 and name != "random" else None
        rows.append({"strategy": name, "reviewed": n, "rounds": rounds, "trainings": trainings,
                     "mean3": round(_mean(ys), 4), "per_seed": [round(y, 4) for y in ys],
                     "gain_over_random_40": None if gain is None else round(gain, 4),
                     "label_multiplier": None if gain is None else round(2 ** (gain / slope), 2)})

    row("first bundle", 0, rand[0], 1, 0)
    for n in (40, 80):
        row("random", n, rand[n], 3, n // 40)
    for n in ONE_ROUND:
        row("random", n, one[n], 1, 1)
    for name, cur in (("judge", judge), ("oracle_error", orc)):
        for n in (40, 80):
            row(name, n, cur[n], 3, n // 40)
    for name in ("random", "judge"):
        row(f"{name}, a second round without new reviews", 40, again[name], 3, 2)
    per_doubling = {f"{a}->{b}": round((_mean(one[b]) - _mean(one[a] if a in one else rand[a])) / math.log2(b / a), 4)
                    for a, b in ((40, 80), (80, 160), (160, 760))}
    # Trained the same two rounds as random's 80: the judge's curve through its 40 reviews with a
    # second round (no new ones) and its 80 reviews, read at random's 80-review accuracy.
    j40, j80, target = _mean(again["judge"]), _mean(judge[80]), _mean(rand[80])
    need = None if j80 < target else (40.0 if j40 >= target else 40 + 40 * (target - j40) / (j80 - j40))
    result = {"slope_40_80_two_rounds": round(slope, 4), "per_doubling_one_round": per_doubling,
              "judge_needs_two_rounds_each": None if need is None else round(need, 1), "rows": rows}
    lines = ["| strategy | reviewed | rounds | trainings per unit | mean of the three (3 seeds) | per seed | "
             "gain over random after 40 | label multiplier |", "|---|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        g = "" if r["gain_over_random_40"] is None else f"{r['gain_over_random_40']:+.3f}"
        m = "" if r["label_multiplier"] is None else f"{r['label_multiplier']:.2f}x"
        lines.append(f"| {r['strategy']} | {r['reviewed']} | {r['rounds']} | {r['trainings']} | {r['mean3']:.3f} | "
                     f"{', '.join(f'{y:.3f}' for y in r['per_seed'])} | {g} | {m} |")
    lines += ["", f"One doubling of random's reviews (40 -> 80, two rounds, 3 trainings): {slope:+.4f}. "
              "Random's gain per doubling with one round from the first bundle: "
              + ", ".join(f"{k} {v:+.4f}" for k, v in per_doubling.items()) + ".",
              "", "Every point trained for two rounds (the judge's 40 reviews with a second round without new "
              f"ones, {j40:.3f}; its 80, {j80:.3f}): the judge needs "
              + ("more than 80" if need is None else f"{need:.0f} ({need / 80:.0%})")
              + f" reviews to reach random's 80-review accuracy ({target:.3f})."]
    text = "\n".join(lines)
    (HERE / "results.md").write_text("# Random's learning curve and the label multiplier after 40 reviews\n\n"
                                     "Written by `curve.py` (its docstring says what each row is).\n\n" + text
                                     + "\n\n![random's learning curve and the first picks' worth](curve.png)\n")
    (HERE / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    _png(rand, one, judge, orc, again)
    print(text)
    return result


def _png(rand: dict, one: dict, judge: dict, orc: dict, again: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    xs = [40, 80]
    ax.plot(xs, [_mean(rand[n]) for n in xs], "o-", color="tab:blue", label="random, rounds of 40 (3 trainings)")
    ax.plot([40, *ONE_ROUND], [_mean(rand[40])] + [_mean(one[n]) for n in ONE_ROUND], "s--", color="tab:blue",
            alpha=0.6, label="random, one round from the first bundle (1 training)")
    ax.plot(xs, [_mean(judge[n]) for n in xs], "o-", color="tab:orange", label="judge (3 trainings)")
    ax.plot(xs, [_mean(orc[n]) for n in xs], "o-", color="tab:red", label="oracle_error (3 trainings)")
    for name, color in (("random", "tab:blue"), ("judge", "tab:orange")):
        ax.plot([40], [_mean(again[name])], "D", mfc="none", color=color, ms=8,
                label=f"{name}: 40 reviews, a second round without new ones (3 trainings)")
    ax.axhline(_mean(rand[80]), ls=":", color="grey", lw=1, label="target: random after 80")
    ax.axvline(40, ls=":", color="black", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks([40, 80, 160, 320, 760], ["40", "80", "160", "320", "760 (all)"])
    ax.set_xlabel("images reviewed after the initial 40 (log scale)")
    ax.set_ylabel("mean of head mAP50, OKS AP50, visibility accuracy")
    ax.set_title("default benchmark, 3 seeds: random's learning curve and what the first 40 picks are worth", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "curve.png", dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main(*(Path(a) for a in sys.argv[1:3]))
