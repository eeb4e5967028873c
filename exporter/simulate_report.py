"""Results of ``annotator simulate``: curves, label saving, table, results.{json,md}, accuracy.png.

Curves: per strategy and metric, the mean and standard deviation over seeds of the test
accuracy after each round, against the number of images the strategy sent to review (round 0,
the shared random initial set, is x = 0 for every strategy; its size is reported apart).

Label saving: the target of a metric is what ``random`` reaches with its full budget (mean over
seeds); a strategy's need is the first point where its mean curve reaches the target, linearly
interpolated between the round below the target and the round that reaches it, as a fraction
of random's budget (None: not reached). ``mean3`` is the mean of the three accuracies and is
what the bar is read on; the per-metric fractions are reported next to it.
"""
from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)

METRICS = ("head_map50", "oks_ap50", "visibility_acc")
LABELS = {"head_map50": "head mAP50", "oks_ap50": "OKS AP50", "visibility_acc": "visibility accuracy",
          "mean3": "mean of the three"}
BAR = 0.5
UNIT_KEYS = ("seed", "strategy", "round", "n_reviewed", "metrics", "composition", "seconds")


def mean3(metrics: dict[str, float]) -> float:
    """The mean of the three accuracies, what the bar is read on."""
    return float(np.mean([metrics[k] for k in METRICS]))


def mean_reviewed(states: Sequence[dict[str, Any]]) -> float:
    """The reviews of a round's units, the seeds' mean (a rule that runs out of candidates sends
    fewer in some seeds)."""
    return round(float(np.mean([s["n_reviewed"] for s in states])), 1)


def curves(states: Sequence[dict[str, Any]], strategies: Sequence[str]) -> dict[str, dict[str, Any]]:
    """strategy -> {"x": [...], metric -> {"mean": [...], "std": [...], "n": [...]}} (round 0 shared)."""
    out: dict[str, dict[str, Any]] = {}
    initial = [s for s in states if s["strategy"] == "initial"]
    for strategy in strategies:
        mine = initial + [s for s in states if s["strategy"] == strategy]
        rounds = sorted({s["round"] for s in mine})
        entry: dict[str, Any] = {"x": [], "rounds": rounds}
        for m in (*METRICS, "mean3"):
            entry[m] = {"mean": [], "std": [], "n": []}
        for r in rounds:
            at = [s for s in mine if s["round"] == r]
            entry["x"].append(mean_reviewed(at))
            for m in (*METRICS, "mean3"):
                vals = np.array([mean3(s["metrics"]) if m == "mean3"
                                 else s["metrics"][m] for s in at])
                entry[m]["mean"].append(float(vals.mean()))
                entry[m]["std"].append(float(vals.std()))
                entry[m]["n"].append(int(len(vals)))
        out[strategy] = entry
    return out


def needed(x: Sequence[float], y: Sequence[float], target: float) -> float | None:
    """First x where the curve reaches ``target``, interpolated linearly; None if it never does."""
    for i, (xi, yi) in enumerate(zip(x, y)):
        if yi >= target - 1e-12:
            if i == 0:
                return float(xi)
            x0, y0 = x[i - 1], y[i - 1]
            return float(x0 + (target - y0) / (yi - y0) * (xi - x0)) if yi > y0 else float(xi)
    return None


def label_saving(cur: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Targets (random at its full budget) and each strategy's need, as reviewed images and fraction."""
    rnd = cur["random"]
    budget = rnd["x"][-1]
    targets = {m: rnd[m]["mean"][-1] for m in (*METRICS, "mean3")}
    out: dict[str, Any] = {"budget": budget, "targets": targets, "strategies": {}}
    for strategy, c in cur.items():
        row = {}
        for m in (*METRICS, "mean3"):
            # a rule that ran out of candidates sent fewer reviews than the budget; one given more is not compared
            n = needed(c["x"], c[m]["mean"], targets[m]) if c["x"][-1] <= budget else None
            row[m] = {"reviewed": n, "fraction": (n / budget if n is not None and budget else None)}
        out["strategies"][strategy] = row
    return out


def paired_gains(states: Sequence[dict[str, Any]], strategies: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """strategy -> per round: the mean of the three accuracies minus random's, seed by seed.

    Paired by seed (same pool, same first bundle), so the spread between seeds, which is mostly
    the first bundle's, cancels out: ``{"round", "reviewed", "per_seed": [...], "mean"}``.
    """
    rnd = {(s["seed"], s["round"]): mean3(s["metrics"]) for s in states if s["strategy"] == "random"}
    out: dict[str, list[dict[str, Any]]] = {}
    for strategy in strategies:
        if strategy == "random":
            continue
        mine = sorted((s for s in states if s["strategy"] == strategy), key=lambda s: (s["round"], s["seed"]))
        for r in sorted({s["round"] for s in mine}):
            at = [s for s in mine if s["round"] == r and (s["seed"], r) in rnd]
            if not at:
                continue
            diffs = [round(mean3(s["metrics"]) - rnd[(s["seed"], r)], 4) for s in at]
            out.setdefault(strategy, []).append({"round": r, "reviewed": mean_reviewed(at), "per_seed": diffs,
                                                 "mean": round(float(np.mean(diffs)), 4)})
    return out


def training_noise(states: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """How much one training's mean of the three varies with the training seed alone (same picks).

    Pooled over the units trained more than once (``--repeats``): ``sd`` is the square root of the
    mean of their variances (ddof 1), ``sd_gain`` the standard error that leaves on a paired gain
    over random averaged over the seeds (two independent means of ``trainings`` trainings each).
    None when no unit was trained twice.
    """
    many = [[mean3(m) for m in s["metrics_each"]]
            for s in states if len(s.get("metrics_each") or []) > 1]
    if not many:
        return None
    trainings = min(len(v) for v in many)
    seeds = len({s["seed"] for s in states})
    sd = float(np.sqrt(np.mean([np.var(v, ddof=1) for v in many])))
    return {"units": len(many), "trainings": trainings, "sd": round(sd, 4),
            "sd_gain": round(sd * float(np.sqrt(2.0 / (trainings * seeds))), 4)}


def _fmt(v: float | None, pct: bool = False) -> str:
    if v is None:
        return "not reached"
    return f"{100 * v:.0f} %" if pct else f"{v:.3f}"


def table_lines(results: dict[str, Any], notes: bool = True) -> list[str]:
    """Markdown tables: accuracy per round (mean ± sd over seeds), label saving, paired gains, and
    (``notes``) the training noise and the picks' make-up."""
    cur, sav = results["curves"], results["label_saving"]
    lines = ["| strategy | reviewed | " + " | ".join(LABELS[m] for m in (*METRICS, "mean3")) + " |",
             "|---|---:|" + "---:|" * (len(METRICS) + 1)]
    for strategy, c in cur.items():
        for i, x in enumerate(c["x"]):
            cells = [f"{c[m]['mean'][i]:.3f} ± {c[m]['std'][i]:.3f}" for m in (*METRICS, "mean3")]
            lines.append(f"| {strategy if i else strategy + ' (initial)'} | {x:g} | " + " | ".join(cells) + " |")
    lines += ["", f"Label saving: reviewed images needed to reach what random reaches with its full budget "
                  f"({sav['budget']:g} images), as a fraction of that budget (bar: judge <= {BAR:.0%} on the mean).", "",
              "| strategy | " + " | ".join(LABELS[m] for m in (*METRICS, "mean3")) + " |",
              "|---|" + "---:|" * (len(METRICS) + 1),
              "| target (random, full budget) | " + " | ".join(f"{sav['targets'][m]:.3f}" for m in (*METRICS, "mean3")) + " |"]
    for strategy, row in sav["strategies"].items():
        cells = [("not reached" if row[m]["reviewed"] is None else
                  f"{row[m]['reviewed']:.0f} ({_fmt(row[m]['fraction'], True)})") for m in (*METRICS, "mean3")]
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    gains = results.get("paired_gains", {})
    if gains:
        rounds = sorted({g["round"] for rows in gains.values() for g in rows})
        random_x = dict(zip(cur["random"]["rounds"], cur["random"]["x"])) if "random" in cur else {}
        lines += ["", "Gain over random, paired by seed: mean of the three accuracies minus random's after the same "
                      "round (seed by seed in brackets; the seeds' own spread cancels out; a strategy that sent "
                      "fewer reviews than random in a round says how many):", "",
                  "| strategy | " + " | ".join(f"{random_x.get(r, r):g} reviewed" for r in rounds) + " |",
                  "|---|" + "---:|" * len(rounds)]
        for strategy, rows in gains.items():
            by_r = {g["round"]: g for g in rows}
            cells = [(f"{by_r[r]['mean']:+.3f} ({', '.join(f'{d:+.3f}' for d in by_r[r]['per_seed'])})"
                      + (f" with {by_r[r]['reviewed']:g} reviews" if by_r[r]["reviewed"] != random_x.get(r, by_r[r]["reviewed"]) else "")
                      if r in by_r else "") for r in rounds]
            lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    if not notes:
        return lines
    noise = results.get("training_noise")
    if noise:
        lines += ["", f"Training noise: trained {noise['trainings']} times with other training seeds on the same "
                      f"picks, one training's mean of the three varies by sd {noise['sd']:.4f} (pooled over "
                      f"{noise['units']} units); that leaves a standard error of {noise['sd_gain']:.4f} on the mean "
                      f"paired gain above (training noise alone, not the pools' sampling)."]
    elif gains:
        lines += ["", "One training per unit: the gains above include one training's noise, which is the size of "
                      "the gains themselves (sd 0.0078 of one training's mean of the three on the default "
                      "settings, 0.004 with reviewed images only, measured with `--repeats 3`: "
                      "docs/simulate/auto-labels-repeats3-named, docs/simulate/repeats3); `--repeats 3` averages it out."]
    comp = results.get("composition", {})
    if comp:
        share = float(results.get("settings", {}).get("shift_share", 1.0))
        camera = results.get("settings", {}).get("shift_camera", "overhead")
        varied = results.get("settings", {}).get("lengths", "fixed") == "varied"
        lines += ["", "Make-up of the reviewed picks (share of all picks over seeds and rounds; the pool's "
                      f"{'scenes are drawn with' if varied else 'images have'} about {15 * share:.0f} % {camera} "
                      f"camera, {25 * share:.0f} % IR, 15 % crowded"
                      f"{' (its images: as long as the scenes happen to be)' if varied else ''}; new scenes: picks "
                      "that show a scene no earlier review showed, one per scene):", "",
                  f"| strategy | picks | {camera} camera | IR | crowded | with children | new scenes |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for strategy, c in comp.items():
            n = max(c["picks"], 1)
            lines.append(f"| {strategy} | {c['picks']} | {c['new_camera'] / n:.0%} | {c['ir'] / n:.0%} | "
                         f"{c['crowded'] / n:.0%} | {c['children'] / n:.0%} | {c['scenes'] / n:.0%} |")
    return lines


def write_png(path: Path, cur: dict[str, dict[str, Any]], targets: dict[str, float], title: str,
              gains: dict[str, list[dict[str, Any]]] | None = None) -> None:
    """Three panels (head mAP50, OKS AP50, visibility accuracy) vs reviewed images, mean ± sd,
    and a fourth with the gain over random paired by seed (mean of the three; dots: seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    colors: dict[str, Any] = {}
    for ax, m in zip(axes, METRICS):
        for strategy, c in cur.items():
            x, mu, sd = np.array(c["x"]), np.array(c[m]["mean"]), np.array(c[m]["std"])
            line, = ax.plot(x, mu, marker="o", label=strategy)
            colors[strategy] = line.get_color()
            ax.fill_between(x, mu - sd, mu + sd, alpha=0.15, color=line.get_color())
        ax.axhline(targets[m], ls="--", color="grey", lw=1, label="target (random, full budget)")
        ax.set_title(LABELS[m])
        ax.set_xlabel("images reviewed after the initial set")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    ax = axes[3]
    ax.axhline(0.0, color=colors.get("random", "grey"), lw=1.5, label="random")
    for strategy, rows in (gains or {}).items():
        x = [0] + [g["reviewed"] for g in rows]
        ax.plot(x, [0.0] + [g["mean"] for g in rows], marker="o", color=colors.get(strategy), label=strategy)
        for g in rows:
            ax.scatter([g["reviewed"]] * len(g["per_seed"]), g["per_seed"], s=10, color=colors.get(strategy), alpha=0.5)
    ax.set_title("gain over random, paired by seed (mean of the three)")
    ax.set_xlabel("images reviewed after the initial set")
    ax.grid(alpha=0.3)
    # The settings line is long: wrapped to the figure's width (about 190 characters at this size).
    fig.suptitle(textwrap.fill(title, 190), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


INITIAL_DOMAIN_TEXT = {"source": "the source domain (no IR, not the {} camera)", "pool": "the whole pool"}


def judge_bar(sav: dict[str, Any]) -> dict[str, Any]:
    """The bar read on a label saving: the judge's share of random's budget on the mean of the three."""
    judge = sav["strategies"].get("judge", {}).get("mean3", {}).get("fraction")
    return {"judge_fraction_mean3": judge, "limit": BAR, "met": judge is not None and judge <= BAR}


def settled_results(states: Sequence[dict[str, Any]], strategies: Sequence[str]) -> dict[str, Any] | None:
    """``--settle``: curves, label saving, paired gains and the bar on the points that have all had
    the last round's training rounds (the settled states of the earlier rounds and the last
    round's states as they are); None without settled states."""
    settled = [s for s in states if s.get("settled")]
    if not settled:
        return None
    last = max(s["round"] for s in states)
    points = settled + [s for s in states if not s.get("settled") and s["round"] == last]
    cur = curves(points, strategies)
    sav = label_saving(cur)
    return {"rounds": last, "curves": cur, "label_saving": sav, "paired_gains": paired_gains(points, strategies),
            "bar": judge_bar(sav)}


def write_results(cfg: Any, states: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """Aggregate the states, write results.json, results.md and accuracy.png (and with ``--settle``
    accuracy_settled.png); return the results."""
    settled = settled_results(states, cfg.strategies)
    unit_minutes = sum(float(s.get("seconds", 0.0)) for s in states) / 60  # the settled units' time included
    states = [s for s in states if not s.get("settled")]
    cur = curves(states, cfg.strategies)
    sav = label_saving(cur)
    comp: dict[str, dict[str, int]] = {}
    for s in states:
        if s["strategy"] != "initial":
            c = comp.setdefault(s["strategy"], {"picks": 0, "new_camera": 0, "ir": 0, "crowded": 0, "children": 0,
                                                "scenes": 0})
            c["picks"] += len(s["selected"])
            for k in ("ir", "crowded", "children"):
                c[k] += s["composition"][k]
            c["new_camera"] += s["composition"].get("new_camera", s["composition"].get("overhead", 0))  # old runs
            c["scenes"] += s["composition"].get("scenes", len(s["selected"]))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()} if hasattr(cfg, "__dict__") \
        else {}
    results = {"settings": settings, "curves": cur, "label_saving": sav, "composition": comp,
               "paired_gains": paired_gains(states, cfg.strategies), "training_noise": training_noise(states),
               "bar": judge_bar(sav),
               "settled": settled, "seconds": round(seconds, 1),
               "units": [{**{k: s[k] for k in UNIT_KEYS}, **{k: s[k] for k in ("metrics_each",) if k in s}}
                         for s in states]}
    out = Path(cfg.out)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    frames = int(getattr(cfg, "frames", 1))
    camera = str(getattr(cfg, "shift_camera", "overhead"))
    varied = str(getattr(cfg, "lengths", "fixed")) == "varied"
    pool = f"pool {cfg.pool}" + ((f" (capture sequences of 1 to {4 * frames} frames, mean about {frames})" if varied
                                  else f" ({frames}-frame capture sequences)") if frames > 1 else "")
    title = (f"{cfg.seeds} seeds, {pool}, initial {cfg.initial}, {cfg.rounds} x {cfg.per_round} reviewed, "
             f"{cfg.epochs} epochs/round, {cfg.imgsz} px, test {cfg.test}, "
             f"new camera: {camera}, "
             f"initial images from {INITIAL_DOMAIN_TEXT[cfg.initial_domain].format(camera)}"
             + (f", rounds train on the reviewed images and the auto labels of the rest at weight {aw:g}"
                if (aw := float(getattr(cfg, "auto_weight", 0.0))) > 0 else ", rounds train on the reviewed images only")
             + (f" (auto labels only of the {trusted:.0%} of the pool the first bundle is most sure of)"
                if aw > 0 and (trusted := float(getattr(cfg, "auto_trusted", 1.0))) < 1.0 else "")
             + ((", a reviewed frame's labels replace the auto labels of its capture sequence"
                 + (f" within {bits} dHash bits" if bits < 64 else "")
                 + (f" (those images at weight {pw:g})" if (pw := float(getattr(cfg, "propagated_weight", -1))) >= 0
                    else ""))
                if aw > 0 and (bits := int(getattr(cfg, "propagate", -1))) >= 0 else "")
             + (f", mean of {repeats} trainings per unit" if (repeats := int(getattr(cfg, "repeats", 1))) > 1 else "")
             + (f", the pool's shift (IR, {camera} camera) x{share:g} of the test set's"
                if (share := float(getattr(cfg, "shift_share", 1.0))) != 1.0 else "")
             + (f", trained on device {dev}" if (dev := str(getattr(cfg, "device", "cpu"))) != "cpu" else ""))
    write_png(out / "accuracy.png", cur, sav["targets"], title, results["paired_gains"])
    if settled:
        write_png(out / "accuracy_settled.png", settled["curves"], settled["label_saving"]["targets"],
                  f"{title}; every point trained {settled['rounds']} rounds (--settle)", settled["paired_gains"])
    md = ["# Active-learning benchmark (`annotator simulate`)", "", f"Settings: {title}; "
          f"audit fraction {cfg.audit_fraction}. Mean ± standard deviation over seeds. Time: {unit_minutes:.0f} min "
          f"for all units (training, scoring, evaluation), {seconds / 60:.0f} min for this invocation (finished units "
          f"of earlier invocations are reused).",
          "", *table_lines(results), "",
          f"Bar (judge reaches random's full-budget mean accuracy with <= {BAR:.0%} of the reviews): "
          f"{bar_verdict(results)}.", "", "![accuracy](accuracy.png)", "",
          *settled_lines(results)]
    (out / "results.md").write_text("\n".join(md))
    return results


def bar_verdict(results: dict[str, Any]) -> str:
    """'met (44 %)', 'NOT met (not reached)', or that the run has no judge to read the bar on."""
    if "judge" not in results["label_saving"]["strategies"]:
        return "not read (no `judge` in this run)"
    bar = results["bar"]
    return f"{'met' if bar['met'] else 'NOT met'} ({_fmt(bar['judge_fraction_mean3'], True)})"


def settled_lines(results: dict[str, Any], png: bool = True) -> list[str]:
    """The ``--settle`` section of results.md: the tables again on curves whose every point has had
    the last round's training rounds, and the bar read there; nothing without ``--settle``."""
    st = results.get("settled")
    if not st:
        return []
    return [f"## At equal training (`--settle`): every point trained {st['rounds']} rounds", "",
            f"The points before the last round trained the rounds they lacked on their own labels, without new "
            f"reviews (the first bundle on its initial set), so that every point has had {st['rounds']} rounds and "
            f"the curves differ by their labels only. Above, as the loop trained them, a point after round r has "
            f"had r rounds.", "", *table_lines(st, notes=False), "",
            f"Bar read at equal training: {bar_verdict(st)}.", "",
            *(["![accuracy, every point trained as long](accuracy_settled.png)", ""] if png else [])]


def print_table(results: dict[str, Any]) -> None:
    """The results table on the terminal (the same Markdown as results.md)."""
    print("\n".join(table_lines(results)))
    bar = results["bar"]
    print(f"\nbar (judge <= {bar['limit']:.0%} of random's budget on the mean of the three): "
          f"{bar_verdict(results)}")
    if results.get("settled"):
        print("\n" + "\n".join(settled_lines(results, png=False)))
