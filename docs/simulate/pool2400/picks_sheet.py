"""Contact sheet of one seed's first-round picks, judge above random (thumbnails, tags on each).

    python docs/simulate/pool2400/picks_sheet.py RUN_DIR SEED OUT.{png,jpg}
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np


def tile(run: Path, seed: int, strategy: str, tags: dict, size: int = 120, cols: int = 10) -> np.ndarray:
    state = json.loads((run / "runs" / f"seed{seed}" / strategy / "round1" / "state.json").read_text())
    pool = next((run / "data").glob(f"pool_s{seed}_*"))
    cells = []
    for name in state["selected"]:
        im = cv2.resize(cv2.imread(str(pool / "images" / name)), (size, size))
        t = tags[name]
        label = ("IR " if t.get("ir") else "") + str(t.get("camera", ""))[:8]
        cv2.rectangle(im, (0, 0), (size, 14), (0, 0, 0), -1)
        cv2.putText(im, label, (2, 11), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (255, 255, 255), 1, cv2.LINE_AA)
        cells.append(im)
    rows = [np.hstack(cells[i:i + cols] + [np.zeros_like(cells[0])] * (cols - len(cells[i:i + cols])))
            for i in range(0, len(cells), cols)]
    head = np.zeros((24, rows[0].shape[1], 3), np.uint8)
    cv2.putText(head, f"seed {seed}, round 1: {strategy}'s {len(cells)} picks", (4, 17), cv2.FONT_HERSHEY_SIMPLEX,
                0.55, (255, 255, 255), 1, cv2.LINE_AA)
    return np.vstack([head, *rows])


def main(run: Path, seed: int, out: Path) -> None:
    pool = next((run / "data").glob(f"pool_s{seed}_*"))
    tags = {im["file_name"]: im.get("tags", {}) for im in json.loads((pool / "annotations.json").read_text())["images"]}
    sheet = np.vstack([tile(run, seed, s, tags) for s in ("judge", "random")])
    cv2.imwrite(str(out), sheet, [cv2.IMWRITE_JPEG_QUALITY, 85] if out.suffix.lower() in (".jpg", ".jpeg")
                else [cv2.IMWRITE_PNG_COMPRESSION, 9])


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
