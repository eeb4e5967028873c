"""Runs with propagated labels side by side: run folders, one table per run, one PNG.

    PYTHONPATH=. python docs/simulate/propagate/weight1.py RUN [RUN ...] [OUT.json]  (and OUT.png)

weight1.json: RUN ``annotator simulate --propagate 64 --propagated-weight 1`` (session 28), then
the same with the propagated images at the auto weight (session 27, ``--propagated-weight -1``).
Both share the verdict's seeds and first bundles, so the units of a strategy and round differ in
the weight alone (the picks of round 1 are the same; later rounds pick with their own bundles).
pool2400.json: RUN the same at ``--pool 2400 --auto-weight 0.0833`` (session 30), then the
session-28 run. The legend names each run's pool and weight (its ``config.json``).
Prints per run, strategy and round the mean of the three accuracies by seed and its 3-seed mean,
the judge's gain over random paired by seed, the label saving: the reviews the judge needs
to reach random's accuracy at its largest budget in that run (``needed``, interpolated), and
how many of the pool's recordings each unit's labelled images show.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from exporter.simulate import composition
from exporter.simulate_report import mean3, needed


def read_states(run: Path) -> list[dict]:
    """Every unit's ``state.json`` of the run (the first bundles' and each round's), read once."""
    paths = sorted((run / "runs").glob("seed*/initial/state.json")) + sorted((run / "runs").glob("seed*/*/round*/state.json"))
    return [json.loads(p.read_text()) for p in paths]


def units(states: list[dict]) -> dict[tuple[str, int], dict[int, float]]:
    """(strategy, round) -> seed -> mean of the three accuracies of the unit's first training."""
    got: dict[tuple[str, int], dict[int, float]] = {}
    for st in states:
        m = st["metrics_each"][0] if st.get("metrics_each") else st["metrics"]
        got.setdefault((st["strategy"], int(st["round"])), {})[int(st["seed"])] = mean3(m)
    return got


def recordings(run: Path, states: list[dict]) -> dict[str, dict[str, int]]:
    """"strategy round" -> seed -> how many of the pool's recordings (scene tags) its labelled
    images (the initial 40 and every review so far) show."""
    got: dict[str, dict[str, int]] = {}
    for seed in sorted({str(st["seed"]) for st in states}):
        pools = sorted((run / "data").glob(f"pool_s{seed}_*/annotations.json"))
        if not pools:
            continue
        coco = json.loads(pools[0].read_text())
        for st in states:
            if str(st["seed"]) == seed:
                got.setdefault(f"{st['strategy']} {st['round']}", {})[seed] = composition(coco, st["labelled"])["scenes"]
    return got


def report(run: Path) -> dict:
    states = read_states(run)
    u = units(states)
    init = u[("initial", 0)]
    out: dict = {"run": str(run), "curves": {}, "gains": {}, "recordings": recordings(run, states)}
    for strategy in ("random", "judge", "oracle_scene"):
        rounds = sorted(r for s, r in u if s == strategy)
        if not rounds:
            continue
        seeds = sorted(init)
        ys = [float(np.mean([init[s] for s in seeds]))]
        for r in rounds:
            if sorted(u[(strategy, r)]) != seeds:
                break
            ys.append(float(np.mean([u[(strategy, r)][s] for s in seeds])))
        out["curves"][strategy] = {"x": [40 * i for i in range(len(ys))], "y": ys,
                                   "by_seed": {str(r): u[(strategy, r)] for r in rounds}}
        if strategy != "random":
            for r in rounds:
                both = sorted(set(u[(strategy, r)]) & set(u.get(("random", r), {})))
                if both:
                    g = [u[(strategy, r)][s] - u[("random", r)][s] for s in both]
                    out["gains"][f"{strategy} after {40 * r}"] = {"mean": float(np.mean(g)), "by_seed": g}
    if "random" in out["curves"]:
        rx, ry = out["curves"]["random"]["x"], out["curves"]["random"]["y"]
        out["target"] = {"reviews": rx[-1], "accuracy": ry[-1]}
        out["needed"] = {s: needed(c["x"], c["y"], ry[-1]) for s, c in out["curves"].items() if s != "random"}
    return out


def label(run: Path) -> str:
    """A run's legend label from its settings: the pool size and the propagated images' weight."""
    cfg = json.loads((run / "config.json").read_text())
    w = cfg.get("propagated_weight", -1.0)
    weight = f"propagated weight {w:g}" if w >= 0 else f"propagated at the auto weight {cfg['auto_weight']:g}"
    return f"pool {cfg['pool']}, {weight}"


def plot(reports: list[dict], labels: list[str], path: Path) -> None:
    """Mean of the three against reviewed images: one line per run and strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"random": "tab:blue", "judge": "tab:orange", "oracle_scene": "tab:green"}
    for rep, name, style in zip(reports, labels, ("-", "--", ":")):
        for s, c in rep["curves"].items():
            ax.plot(c["x"], c["y"], style, marker="o", color=colors.get(s), label=f"{s}, {name}")
    ax.set_xlabel("images reviewed after the initial 40")
    ax.set_ylabel("mean of head mAP50, OKS AP50, visibility accuracy (3 seeds)")
    ax.set_title("propagated labels, one training per unit", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(runs: list[Path], out: Path | None) -> list[dict]:
    reports = [report(r) for r in runs]
    if out:
        plot(reports, [label(r) for r in runs], out.with_suffix(".png"))
    for rep in reports:
        print(f"## {rep['run']}")
        for s, c in rep["curves"].items():
            print(f"{s:13s} " + "  ".join(f"{x}: {y:.4f}" for x, y in zip(c["x"], c["y"])))
        for k, n in rep["recordings"].items():
            print(f"recordings labelled, {k}: {', '.join(f'{v}' for _, v in sorted(n.items()))}")
        for k, g in rep["gains"].items():
            print(f"gain over random, {k}: {g['mean']:+.4f} ({', '.join(f'{x:+.4f}' for x in g['by_seed'])})")
        if "target" in rep:
            print(f"target: random after {rep['target']['reviews']}: {rep['target']['accuracy']:.4f}; needed: "
                  + ", ".join(f"{s} {'not reached' if n is None else f'{n:.0f}'}" for s, n in rep["needed"].items()))
        print()
    if out:
        out.write_text(json.dumps(reports, indent=1))
    return reports


if __name__ == "__main__":
    paths = [Path(a) for a in sys.argv[1:]]
    dest = paths.pop() if paths and paths[-1].suffix == ".json" else None
    main(paths, dest)
