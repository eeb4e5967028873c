"""Learning curve: train bundles on growing synthetic training sets, evaluate on one held-out set.

Image ``i`` of a seed depends only on ``(seed, i)``, so the training sets are nested (the
first 100 images are inside the first 300, ...). Every size trains with the same settings;
each finished size is kept in ``root/size-N`` and skipped on a re-run, so the command can be
stopped and resumed. Sizes train in the order given (put the one you need first first); the
table is sorted by size. Results: ``root/curve.json``, ``root/curve.md`` (a table) and
``root/curve.png``.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from service.durable import write_json_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CurveConfig:
    root: Path
    sizes: tuple[int, ...] = (100, 300, 1000, 2000)
    seed: int = 1
    test_seed: int = 9001
    test_count: int = 300
    epochs: int = 12
    imgsz: int = 320
    batch: int = 16
    # > 0: render this many images of ``calibration_seed`` once and recalibrate every size's
    # bundle on them (``annotator calibrate``) before the evaluation: more points for the
    # visibility calibration than the 10 % validation split holds.
    calibration_count: int = 0
    calibration_seed: int = 9100


def _row(n: int, m: dict[str, Any]) -> dict[str, Any]:
    head = m.get("head") or {}
    return {"train_images": n, "head_map50": head.get("map50"), "head_map50_95": head.get("map50_95"),
            "oks_ap": m["keypoints"]["oks_ap"], "oks_ap50": m["keypoints"]["oks_ap50"],
            "oks_ap50_visible_area": (m["keypoints"].get("visible_area") or {}).get("oks_ap50"),
            "visibility_accuracy": m["visibility"]["accuracy"],
            "visibility_matched": m["visibility"].get("accuracy_matched"), "bundle_id": m["bundle_id"]}


def table_markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| training images | head mAP50 | head mAP50-95 | OKS AP | OKS AP50 | OKS AP50 with visible area "
             "| visibility accuracy | over matched people |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    f = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['train_images']:,} | {f(r['head_map50'])} | {f(r['head_map50_95'])} | {f(r['oks_ap'])} | "
                     f"{f(r['oks_ap50'])} | {f(r.get('oks_ap50_visible_area'))} | {f(r['visibility_accuracy'])} | "
                     f"{f(r.get('visibility_matched'))} |")
    return "\n".join(lines) + "\n"


def plot_curve(rows: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["train_images"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for key, label in (("head_map50", "head mAP50"), ("oks_ap50", "OKS AP50"), ("oks_ap", "OKS AP"),
                       ("visibility_accuracy", "visibility accuracy")):
        ax.plot(xs, [r[key] if r[key] is not None else float("nan") for r in rows], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("synthetic training images (log scale)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("Learning curve on a held-out synthetic test set")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_curve(cfg: CurveConfig) -> list[dict[str, Any]]:
    from .evaluate import evaluate
    from .synth import generate
    from .train import TrainConfig, train_bundle

    cfg.root.mkdir(parents=True, exist_ok=True)
    test = cfg.root / f"test-{cfg.test_seed}-{cfg.test_count}"
    if not (test / "annotations.json").is_file():
        generate(test, cfg.test_count, cfg.test_seed)
    cal = cfg.root / f"cal-{cfg.calibration_seed}-{cfg.calibration_count}"
    if cfg.calibration_count > 0 and not (cal / "annotations.json").is_file():
        generate(cal, cfg.calibration_count, cfg.calibration_seed)
    suffix = f"-cal{cfg.calibration_count}" if cfg.calibration_count > 0 else ""
    rows = []
    for n in cfg.sizes:
        d = cfg.root / f"size-{n}"
        metrics_file = d / f"eval{suffix}" / "metrics.json"
        if not metrics_file.is_file():
            if not (d / "data" / "annotations.json").is_file():
                generate(d / "data", n, cfg.seed)
            bundle = d / "bundle"
            if not (bundle / "bundle.json").is_file():
                train_bundle(TrainConfig(annotations=d / "data" / "annotations.json", images=d / "data" / "images",
                                         out=bundle, work=d / "work", epochs=cfg.epochs, imgsz=cfg.imgsz,
                                         batch=cfg.batch))
            if cfg.calibration_count > 0:
                from .calibrate_bundle import recalibrated_copy

                if not (d / f"bundle{suffix}" / "bundle.json").is_file():
                    recalibrated_copy(bundle, cal / "annotations.json", cal / "images", d / f"bundle{suffix}")
                bundle = d / f"bundle{suffix}"
            evaluate(bundle, test / "annotations.json", test / "images", d / f"eval{suffix}", progress=False)
        rows.append(_row(n, json.loads(metrics_file.read_text())))
        log.info("learning curve: %d images -> %s", n, rows[-1])
    rows.sort(key=lambda r: r["train_images"])
    write_json_atomic(cfg.root / "curve.json", {"config": {k: str(v) for k, v in cfg.__dict__.items()}, "rows": rows})
    (cfg.root / "curve.md").write_text(table_markdown(rows))
    plot_curve(rows, cfg.root / "curve.png")
    return rows
