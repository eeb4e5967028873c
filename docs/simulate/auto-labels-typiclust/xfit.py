# Run from the repository root: .venv/bin/python docs/simulate/auto-labels-typiclust/xfit.py RUN_DIR random,judge,typiclust OUT.json
"""Diagnostic: how much of each strategy's visibility accuracy is threshold calibration?
Per bundle: accuracy at its own thresholds vs 2-fold cross-fitted global-pair thresholds on the test set."""
import json, sys
from pathlib import Path
import numpy as np
from service.bundle import load_bundle
from exporter.calibrate import collect_visibility_samples, person_category, calibrate_thresholds, apply_rule
from exporter.evaluate import keypoint_mapping, predict_dataset

run = Path(sys.argv[1]); strategies = sys.argv[2].split(",")
test = run / "data" / "test_150"
data = json.loads((test / "annotations.json").read_text())
out = {}
for seed in range(3):
    root = run / "runs" / f"seed{seed}"
    units = [("initial", 0, root / "initial")] + [(s, r, root / s / f"round{r}") for s in strategies for r in (1, 2)]
    for s, r, u in units:
        b = load_bundle(u / "bundle")
        cat = person_category(data); kmap = keypoint_mapping(b, cat["keypoints"]); sig = [b.keypoints.sigmas[i] for i in kmap]
        preds = predict_dataset(b, data, test / "images", progress=False, sheet_images=0)
        ids = sorted(preds.operating_view)
        halves = [ids[0::2], ids[1::2]]
        S = [collect_visibility_samples({i: preds.operating_view[i] for i in h}, data, sigmas=sig, kpt_map=kmap) for h in halves]
        allS = collect_visibility_samples(preds.operating_view, data, sigmas=sig, kpt_map=kmap)
        t = b.thresholds
        own = float(np.mean(apply_rule(allS.main_conf, allS.visible_conf, np.asarray(t.main)[allS.kpt_index], np.asarray(t.visible)[allS.kpt_index]) == allS.gt_flag))
        correct = 0; n = 0
        for a, c in ((0, 1), (1, 0)):
            cal = calibrate_thresholds(S[a], len(kmap), per_keypoint=False)
            g = cal["global"]
            correct += np.sum(apply_rule(S[c].main_conf, S[c].visible_conf, g["main"], g["visible"]) == S[c].gt_flag); n += len(S[c].gt_flag)
        st = json.loads((u / "state.json").read_text())
        out[f"{seed}/{s}/{r}"] = {"own": own, "xfit": correct / n, "reported": st["metrics"]["visibility_acc"],
                                  "global_thr": [float(np.mean(t.main)), float(np.mean(t.visible))]}
        print(seed, s, r, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out[f"{seed}/{s}/{r}"].items()}, flush=True)
json.dump(out, open(sys.argv[3], "w"), indent=1)
