"""Train chosen units of a simulate run N times in all (session 37): the units that decide a label
saving, where ``annotator simulate --repeats N`` would train every unit of the run N times.

    PYTHONPATH=. python docs/simulate/repeats.py RUN N UNIT [UNIT ...]

UNIT is a unit's folder under each seed's ``RUN/runs/seedS/``, the same for every seed of the run:
``random/round2``, ``judge_stream_session/round1``, a ``--settle`` unit such as
``judge_stream_session/round1_again`` or ``initial_again2``. Each unit is trained as the benchmark
trains it (``exporter.simulate.train_and_evaluate``): on its labelled images (``roundR``: its
``state.json``; ``X_againK``: those of ``X``), warm-started from the first training's bundle of the
unit before it (``roundR`` from ``round{R-1}``, round 1 from ``initial``; ``X_againK`` from
``X_again{K-1}``, ``X_again`` from ``X``), for the run's epochs a round. The extra trainings take the
training seeds ``seed + k * 1000`` and go to ``UNIT/repeat1``, ... beside the first, as ``--repeats``
puts them, so ``annotator simulate`` resumes the run as before and ``docs/simulate/units3x.py``
reads each unit at the mean of its trainings. A call trains only the trainings a unit lacks (a
killed call loses at most the training in progress). Prints each unit's trainings.
"""
from __future__ import annotations

import json
import logging
import re
import sys
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from exporter.simulate import SimConfig, prepare_data, train_and_evaluate  # noqa: E402
from exporter.simulate_select import pool_predictions  # noqa: E402

AGAIN = re.compile(r"^(?P<start>.+?)_again(?P<k>\d*)$")


def previous(root: Path, unit: str) -> tuple[Path, Path]:
    """(the unit whose labelled images ``unit`` trains on, the unit whose bundle it starts from)."""
    m = AGAIN.match(unit)
    if m:
        k = int(m["k"] or 1)
        start = root / m["start"]
        return start, (start if k == 1 else root / f"{m['start']}_again{k - 1 if k > 2 else ''}")
    m = re.fullmatch(r"(?P<strategy>[a-z0-9_]+)/round(?P<r>\d+)", unit)
    if not m or int(m["r"]) < 1:
        raise SystemExit(f"{unit}: expected STRATEGY/roundR (R >= 1) or a --settle unit X_againK")
    r = int(m["r"])
    return root / unit, root / ("initial" if r == 1 else f"{m['strategy']}/round{r - 1}")


def run_config(run: Path, **changes: object) -> SimConfig:
    """The settings RUN was made with (its ``config.json``), out = RUN, with ``changes``."""
    saved = json.loads((run / "config.json").read_text())
    saved = {k: v for k, v in saved.items() if k in {f.name for f in fields(SimConfig)}}
    return SimConfig(**{**saved, "out": run, "strategies": tuple(saved["strategies"]), **changes})


def main(run: Path, repeats: int, units: list[str]) -> None:
    cfg = run_config(run, repeats=repeats)
    test_dir, pools = prepare_data(cfg)  # the run's rendered folders (rendered already: nothing is drawn again)
    for seed, pool_dir in pools.items():
        root = run / "runs" / f"seed{seed}"
        coco = json.loads((pool_dir / "annotations.json").read_text())
        auto = None
        if cfg.auto_weight > 0:  # the first bundle's records of the pool, cached by the run
            auto = pool_predictions(root / "initial" / "bundle", coco, pool_dir / "images",
                                    root / "initial" / "pool_records.json")
        for unit in units:
            labels, start = previous(root, unit)
            for need in (labels / "state.json", start / "bundle"):
                if not need.exists():
                    raise SystemExit(f"{need} is missing: run annotator simulate on {run} to finish that unit first")
            labelled = json.loads((labels / "state.json").read_text())["labelled"]
            mean, each = train_and_evaluate(cfg, root / unit, coco, labelled, pool_dir, test_dir, str(start / "bundle"),
                                            cfg.epochs, seed, False, auto)
            print(f"seed {seed} {unit}: mean of the three", [round(sum(m.values()) / 3, 4) for m in each],
                  "->", {k: round(v, 4) for k, v in mean.items()}, flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 4:
        raise SystemExit(__doc__)
    logging.basicConfig(level=logging.INFO)
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])
