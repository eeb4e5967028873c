"""Control (session 22): one more round on the same reviewed set (no new reviews) after round 1,
per strategy and seed: does the second round's gain come from its 40 new labels or from 3 more
epochs? Usage: python docs/simulate/roof-auto/extra_round.py RUN_FOLDER judge,random [ROUND]
(units go to RUN_FOLDER/runs/seedS/STRATEGY/round1_again/metrics.json)."""
import json, sys, logging
from pathlib import Path
from exporter.simulate import SimConfig, _train_once
from exporter.simulate_select import pool_predictions

logging.basicConfig(level=logging.INFO)
out = Path(sys.argv[1]); strategies = sys.argv[2].split(","); rnd = int(sys.argv[3]) if len(sys.argv) > 3 else 1
saved = json.loads((out / "config.json").read_text()); saved["out"] = Path(saved["out"]); saved["strategies"] = tuple(saved["strategies"])
cfg = SimConfig(**saved)
data = out / "data"
for seed in range(cfg.seeds):
    root = out / "runs" / f"seed{seed}"
    pool_dir = next(p for p in data.glob(f"pool_s{seed}_*"))
    test_dir = next(p for p in data.glob("test_*"))
    coco = json.loads((pool_dir / "annotations.json").read_text())
    auto = pool_predictions(root / "initial" / "bundle", coco, pool_dir / "images", root / "initial" / "pool_records.json") if cfg.auto_weight > 0 else None
    for s in strategies:
        src = root / s / f"round{rnd}"
        unit = root / s / f"round{rnd}_again"
        if (unit / "metrics.json").is_file():
            continue
        state = json.loads((src / "state.json").read_text())
        m = _train_once(cfg, unit, coco, state["labelled"], pool_dir, test_dir, str(src / "bundle"), cfg.epochs, seed, False, auto)
        (unit / "metrics.json").write_text(json.dumps(m))
        print(seed, s, "round1 ->", {k: round(v, 4) for k, v in state["metrics"].items()}, "again ->", {k: round(v, 4) for k, v in m.items()}, flush=True)
