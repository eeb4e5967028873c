"""``annotator demo``: annotate the shipped sample cabin images with a bundle, no set-up needed.

Writes, under the output folder: ``annotations/<name>.json`` (one record per image, written
atomically), ``annotated/<name>.png`` (solid marks visible, hollow occluded, outside not
drawn) and ``contact_sheet.png``; prints a table to the terminal.
"""
from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import cv2

from .bundle import load_bundle, write_json_atomic
from .draw import contact_sheet, draw_prediction
from .engine import Engine
from .imageio import decode_image

log = logging.getLogger(__name__)
SAMPLES = Path(__file__).resolve().parent / "assets" / "samples"


def _write_png(path: Path, image) -> None:
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"cannot encode {path}")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.tobytes())
    tmp.replace(path)


def run_demo(out: Path, bundle: Path, count: int = 12, seed: int = 2026, samples: Path = SAMPLES) -> int:
    """Annotate up to ``count`` sample images with ``bundle``; returns a process exit code."""
    files = sorted(p for p in samples.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:count]
    if not files:
        raise FileNotFoundError(f"no sample images in {samples}")
    b = load_bundle(bundle)
    engine = Engine(b)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    (out / "annotated").mkdir(parents=True, exist_ok=True)
    rows, tiles, captions = [], [], []
    t_all = time.perf_counter()
    for f in files:
        data = f.read_bytes()
        t0 = time.perf_counter()
        img = decode_image(data)
        pred = engine.predict([img])[0]
        ms = (time.perf_counter() - t0) * 1000
        counts = {"visible": 0, "occluded": 0, "outside": 0}
        for p in pred.persons:
            for k in p.keypoints:
                counts[k.visibility] += 1
        record = {"image_id": hashlib.sha256(data).hexdigest(), "source": str(f), "bundle_id": b.id,
                  **pred.to_json()}
        write_json_atomic(out / "annotations" / f"{f.stem}.json", record)
        drawn = draw_prediction(img.pixels, pred, b.keypoints)
        _write_png(out / "annotated" / f"{f.stem}.png", drawn)
        tiles.append(drawn)
        captions.append(f"{f.stem}: {len(pred.heads)} heads, {len(pred.persons)} persons")
        rows.append((f.name, len(pred.heads), len(pred.persons), counts["visible"], counts["occluded"],
                     counts["outside"], ms))
    _write_png(out / "contact_sheet.png", contact_sheet(tiles, cols=4, captions=captions))
    total = time.perf_counter() - t_all
    head = f"{'image':<28}{'heads':>6}{'persons':>8}{'visible':>8}{'occl.':>7}{'outside':>8}{'ms':>8}"
    print(f"bundle {b.id} ({', '.join(sorted(b.models))}; visibility {b.visibility_mode})")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r[0]:<28}{r[1]:>6}{r[2]:>8}{r[3]:>8}{r[4]:>7}{r[5]:>8}{r[6]:>8.1f}")
    print("-" * len(head))
    print(f"{len(rows)} images in {total:.2f} s ({len(rows) / total:.1f} images/s)")
    print(f"records: {out / 'annotations'}   pictures: {out / 'annotated'}   overview: {out / 'contact_sheet.png'}")
    return 0
