"""Control (session 22): one more round on the same reviewed set (no new reviews) after round 1,
per strategy and seed: does the second round's gain come from its 40 new labels or from 3 more
epochs? Usage: python docs/simulate/roof-auto/extra_round.py RUN_FOLDER judge,random [ROUND [REPEATS]]
(units go to RUN_FOLDER/runs/seedS/STRATEGY/round1_again/metrics.json; REPEATS > 1 (session 26)
trains each again with the run's other training seeds, as ``--repeats``, into repeat1, ... there
and prints the mean; a resumed call trains only what is missing)."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from exporter.simulate import SimConfig, prepare_data, train_and_evaluate
from exporter.simulate_select import pool_predictions


def main(out: Path, strategies: list[str], rnd: int = 1, repeats: int = 1) -> None:
    saved = json.loads((out / "config.json").read_text())
    cfg = SimConfig(**{**saved, "out": out, "strategies": tuple(saved["strategies"]), "repeats": repeats})
    test_dir, pools = prepare_data(cfg)  # the run's rendered folders (rendered already: nothing is drawn again)
    for seed, pool_dir in pools.items():
        root = out / "runs" / f"seed{seed}"
        coco = json.loads((pool_dir / "annotations.json").read_text())
        auto = None
        if cfg.auto_weight > 0:  # the first bundle's records of the pool, cached by the run
            auto = pool_predictions(root / "initial" / "bundle", coco, pool_dir / "images",
                                    root / "initial" / "pool_records.json")
        for s in strategies:
            src, unit = root / s / f"round{rnd}", root / s / f"round{rnd}_again"
            state = json.loads((src / "state.json").read_text())
            m, _ = train_and_evaluate(cfg, unit, coco, state["labelled"], pool_dir, test_dir, str(src / "bundle"),
                                      cfg.epochs, seed, False, auto)
            print(seed, s, f"round{rnd} ->", {k: round(v, 4) for k, v in state["metrics"].items()},
                  "again ->", {k: round(v, 4) for k, v in m.items()}, flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main(Path(sys.argv[1]), sys.argv[2].split(","), *(int(a) for a in sys.argv[3:5]))
