"""A strategy trained 3 times per unit, read against the default's three-training verdict.

Usage: python docs/simulate/variants/with_repeats.py RUN [STRATEGY]

RUN is a ``run_repeats.py`` folder (``states.json``) or an ``annotator simulate`` folder on the
default settings (``results.json``) whose STRATEGY units (default ``judge_power``) were trained
3 times. The random, judge and initial units come from the verdict's run
(``docs/simulate/auto-labels-repeats3-named/results.json``, same seeds and
settings): the benchmark is deterministic on one machine, which this script checks by requiring
that RUN's random units (one training), if any, equal the verdict's first trainings, and that
RUN's STRATEGY units' first trainings equal this folder's one-training run (``results.json``),
to the last digit.
Prints the label saving and the paired gains over random, every unit the mean of 3 trainings, as
markdown and JSON.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from exporter.simulate_report import curves, label_saving, mean3, paired_gains  # noqa: E402

VERDICT = ROOT / "docs/simulate/auto-labels-repeats3-named/results.json"
ONE_TRAINING = Path(__file__).resolve().parent / "results.json"


def main(run: Path, strategy: str = "judge_power") -> dict:
    verdict = [u for u in json.loads(VERDICT.read_text())["units"] if u["strategy"] in ("initial", "random", "judge")]
    mine = (json.loads((run / "states.json").read_text()) if (run / "states.json").is_file()
            else json.loads((run / "results.json").read_text())["units"])
    # RUN's first bundles and one-training random units against the verdict's first trainings
    first = {(u["strategy"], u["seed"], u["round"]): u["metrics_each"][0] for u in verdict if u["strategy"] != "judge"}
    for u in mine:
        key = (u["strategy"], u["seed"], u["round"])
        if key in first and u["metrics"] != first[key]:
            raise SystemExit(f"{run}: {u['strategy']} seed {u['seed']} round {u['round']} differs from the verdict's run")
    ours = [u for u in mine if u["strategy"] == strategy]
    if not ours or any(len(u.get("metrics_each") or []) != 3 for u in ours):
        raise SystemExit(f"{run}: expected {strategy} units trained 3 times")
    once = {(u["seed"], u["round"]): u["metrics"] for u in json.loads(ONE_TRAINING.read_text())["units"]
            if u["strategy"] == strategy}
    for u in ours:
        key = (u["seed"], u["round"])
        if key in once and u["metrics_each"][0] != once[key]:
            raise SystemExit(f"{run}: {strategy} seed {key[0]} round {key[1]}: first training differs from {ONE_TRAINING}")
    states = verdict + ours
    strategies = ["judge", strategy, "random"]
    saving = label_saving(curves(states, strategies))
    gains = paired_gains(states, strategies)
    out = {"target_mean3": round(saving["targets"]["mean3"], 4),
           "needed": {s: saving["strategies"][s]["mean3"] for s in strategies},
           "gains": gains,
           "each": {f"{u['strategy']} seed {u['seed']} round {u['round']}": [round(mean3(m), 4) for m in u["metrics_each"]]
                    for u in ours}}
    print(f"target (random, 80 reviewed, mean of 3 trainings): {out['target_mean3']:.3f}\n")
    print("| strategy | reviewed images needed (mean of the three) | gain over random after 40 | after 80 |")
    print("|---|---:|---:|---:|")
    for s in strategies[:2]:
        n = out["needed"][s]
        need = "not reached" if n["reviewed"] is None else f"{n['reviewed']:.0f} ({100 * n['fraction']:.0f} %)"
        cells = [f"{g['mean']:+.3f} ({', '.join(f'{v:+.3f}' for v in g['per_seed'])})" for g in gains[s]]
        print(f"| {s} | {need} | {' | '.join(cells)} |")
    print("\n" + json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:3])
