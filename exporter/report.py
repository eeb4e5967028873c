"""Evaluation outputs: PNG files (written atomically) and the terminal metrics table.

Plots use matplotlib's object API with the Agg canvas (no pyplot, no display, no global state).
"""
from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence, TextIO

import numpy as np

from service.draw import write_png
from service.durable import write_bytes_atomic

__all__ = ["format_metrics_table", "print_metrics_table", "write_confusion_png", "write_png"]


def write_confusion_png(path: Path, confusion: Sequence[Sequence[int]], labels: Sequence[str],
                        title: str = "key point visibility") -> None:
    """Heat map of the row-normalised confusion (rows = ground truth) with the counts."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cm = np.asarray(confusion, dtype=np.float64)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig = Figure(figsize=(5.0, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels=list(labels))
    ax.set_yticks(range(len(labels)), labels=list(labels))
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title(title, fontsize=9)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{int(cm[i, j])}\n{norm[i, j]:.0%}", ha="center", va="center",
                    color="white" if norm[i, j] > 0.5 else "black", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.subplots_adjust(left=0.22, right=0.92, bottom=0.14, top=0.92)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_bytes_atomic(path, buf.getvalue())


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_metrics_table(metrics: Mapping[str, Any]) -> str:
    """Plain-text table of the headline numbers of ``evaluate``'s metrics dict."""
    rows: list[tuple[str, str]] = [("bundle", str(metrics.get("bundle_id", "-"))),
                                   ("images", _fmt(metrics.get("dataset", {}).get("images")))]
    head = metrics.get("head")
    if head:
        rows += [("head box mAP50", _fmt(head["map50"])), ("head box mAP50-95", _fmt(head["map50_95"]))]
    else:
        rows.append(("head box mAP", "- (no heads in dataset or bundle)"))
    kp = metrics.get("keypoints", {})
    rows += [("key point OKS AP", _fmt(kp.get("oks_ap"))), ("key point OKS AP50", _fmt(kp.get("oks_ap50")))]
    if kp.get("visible_area"):
        modal = kp["visible_area"]
        rows.append(("  with the visible area", f"AP {_fmt(modal.get('oks_ap'))}, AP50 {_fmt(modal.get('oks_ap50'))}"))
    vis = metrics.get("visibility", {})
    rows.append(("visibility accuracy", _fmt(vis.get("accuracy"))))
    if vis.get("points"):
        rows.append(("  over matched people", f"{_fmt(vis.get('accuracy_matched'))} "
                     f"({vis.get('matched_points', 0)} of {vis['points']} points)"))
    for lab, rec in vis.get("recall", {}).items():
        rows.append((f"  recall {lab}", _fmt(rec)))
    speed = metrics.get("speed", {})
    rows += [("engine images/s", _fmt(speed.get("engine_images_per_s"))),
             ("end-to-end images/s", _fmt(speed.get("end_to_end_images_per_s")))]
    width = max(len(r[0]) for r in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    if vis.get("confusion"):
        labels = vis["labels"]
        lines.append("")
        lines.append("confusion (rows = truth, columns = predicted)")
        lines.append(" " * 10 + "".join(f"{lab:>10}" for lab in labels))
        for lab, row in zip(labels, vis["confusion"]):
            lines.append(f"{lab:>10}" + "".join(f"{c:>10}" for c in row))
    if vis.get("per_keypoint_accuracy"):
        lines.append("")
        lines.append("per key point visibility accuracy")
        for name, acc in vis["per_keypoint_accuracy"].items():
            lines.append(f"  {name.ljust(16)} {_fmt(acc)}")
    return "\n".join(lines)


def print_metrics_table(metrics: Mapping[str, Any], file: TextIO | None = None) -> None:
    """Write ``format_metrics_table`` to ``file`` (stdout by default)."""
    print(format_metrics_table(metrics), file=file or sys.stdout)
