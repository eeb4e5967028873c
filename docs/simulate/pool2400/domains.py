"""The pool-2400 run's bundles evaluated on the test set's two halves: source-domain images
(daylight RGB, the first bundle's cameras) and shifted ones (IR or the overhead camera).

    python docs/simulate/pool2400/domains.py RUN_DIR > docs/simulate/pool2400/domains.json

Mean of the three accuracies per (strategy, reviewed), mean over seeds, and the judge's gain
over random paired by seed on each half.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from exporter.evaluate import evaluate
from exporter.simulate import headline, in_source_domain


def main(run: Path) -> None:
    test = next((run / "data").glob("test_*"))
    coco = json.loads((test / "annotations.json").read_text())
    halves = {}
    for name, keep in (("source", True), ("shifted", False)):
        ids = {im["id"] for im in coco["images"] if in_source_domain(im.get("tags", {})) == keep}
        halves[name] = {**coco, "images": [im for im in coco["images"] if im["id"] in ids],
                        "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]}
    rows: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, sub in halves.items():
            (Path(tmp) / f"{name}.json").write_text(json.dumps(sub))
        for state in sorted(run.glob("runs/seed*/**/state.json")):
            s = json.loads(state.read_text())
            for name in halves:
                m = headline(evaluate(state.parent / "bundle", Path(tmp) / f"{name}.json", test / "images",
                                      Path(tmp) / "eval", progress=False))
                key = f"{s['strategy']}@{s['n_reviewed']}:{name}"
                rows.setdefault(key, {})[str(s["seed"])] = float(np.mean(list(m.values())))
    out = {"images": {k: len(v["images"]) for k, v in halves.items()}, "mean_of_three": rows, "summary": {}}
    for key, by_seed in sorted(rows.items()):
        out["summary"][key] = round(float(np.mean(list(by_seed.values()))), 4)
    for key in rows:
        if key.startswith("judge@"):
            rand = rows.get(key.replace("judge@", "random@"), {})
            gains = [rows[key][sd] - rand[sd] for sd in rows[key] if sd in rand]
            if gains:
                out["summary"][key.replace("judge@", "gain@")] = [round(float(np.mean(gains)), 4),
                                                                    [round(g, 4) for g in gains]]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
