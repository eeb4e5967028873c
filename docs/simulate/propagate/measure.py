"""Why propagation: how good a reviewed frame's label is for the other frames of its recording.

    PYTHONPATH=. python docs/simulate/propagate/measure.py RUN [OUT.json]

RUN: an ``annotator simulate`` folder with ``data/pool_s{seed}_*`` and ``runs/seed{seed}/initial``
(the first bundles). Per seed it prints and writes:

- ``auto_error``: the first bundle's auto labels: the share of each pool image's ground-truth
  key points whose visibility class they get wrong (``pool_errors``, the error oracle's key),
  its mean, and how it correlates with the mean of the other frames of the same recording;
- ``neighbour``: a recording's frames against its first frame (ground truth only): the share of
  key points of the same seat with the same visibility flag, and the median point distance in
  units of the person's sqrt(area) (what a propagated label gets wrong);
- ``dhash``: the share of same-camera frame pairs within 6 / 10 / 14 / 18 bits, of one
  recording and of two recordings (what the dHash gate of ``sync.propagate`` lets through).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from exporter.simulate_select import pool_errors
from sync.propagate import file_dhash

BITS = (6, 10, 14, 18)


def measure(run: Path, seed: int) -> dict:
    pool_dir = next((run / "data").glob(f"pool_s{seed}_*"))
    coco = json.loads((pool_dir / "annotations.json").read_text())
    init = run / "runs" / f"seed{seed}" / "initial"
    err = pool_errors(init / "bundle", coco, pool_dir / "images", init / "pool_errors.json")
    scene = {im["file_name"]: (im["tags"]["camera"], im["tags"]["scene"]) for im in coco["images"]}
    by_scene: dict = {}
    for n, s in scene.items():
        by_scene.setdefault(s, []).append(n)
    e = np.array([err[n] for n in scene])
    loo = np.array([(sum(err[m] for m in by_scene[scene[n]]) - err[n]) / (len(by_scene[scene[n]]) - 1)
                    for n in scene])
    anns: dict = {}
    for a in coco["annotations"]:
        if "keypoints" in a:
            anns.setdefault(a["image_id"], []).append(a)
    ims = {im["file_name"]: im for im in coco["images"]}
    agree, dist = [], []
    for names in by_scene.values():
        names = sorted(names, key=lambda n: ims[n]["tags"]["frame"])
        first = {a.get("attributes", {}).get("slot"): a for a in anns.get(ims[names[0]]["id"], [])}
        for n in names[1:]:
            for a in anns.get(ims[n]["id"], []):
                b = first.get(a.get("attributes", {}).get("slot"))
                if b is None:
                    continue
                k0, k1 = np.array(b["keypoints"]).reshape(-1, 3), np.array(a["keypoints"]).reshape(-1, 3)
                agree.append(float(np.mean(k0[:, 2] == k1[:, 2])))
                both = (k0[:, 2] > 0) & (k1[:, 2] > 0)
                if both.any():
                    dist.append(float(np.mean(np.linalg.norm(k0[both, :2] - k1[both, :2], axis=1)) / np.sqrt(b["area"])))
    hashes = {n: file_dhash(pool_dir / "images" / n) for n in scene}
    names = list(scene)
    same, other = [], []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if scene[a][0] == scene[b][0]:
                (same if scene[a] == scene[b] else other).append(bin(hashes[a] ^ hashes[b]).count("1"))
    same_a, other_a = np.array(same), np.array(other)
    return {
        "seed": seed,
        "auto_error": {"mean": round(float(e.mean()), 3),
                       "corr_with_recording": round(float(np.corrcoef(e, loo)[0, 1]), 3)},
        "neighbour": {"visibility_agreement": round(float(np.mean(agree)), 3),
                      "median_distance_per_size": round(float(np.median(dist)), 4)},
        "dhash": {str(t): {"same_recording": round(float(np.mean(same_a <= t)), 3),
                           "other_recordings": round(float(np.mean(other_a <= t)), 4)} for t in BITS},
    }


def main() -> None:
    run = Path(sys.argv[1])
    seeds = sorted(int(p.name[4:]) for p in (run / "runs").glob("seed*"))
    out = [measure(run, s) for s in seeds]
    for m in out:
        print(json.dumps(m))
    if len(sys.argv) > 2:
        Path(sys.argv[2]).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
