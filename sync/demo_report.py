"""What ``annotator demo`` shows: a progress bar, the per-image table, the summary, the pictures.

Everything here reads what the appliance wrote (the store's rows and image bytes, the bucket
folder); it computes no annotation itself. Pictures: ``<out>/annotated/<name>.png`` (solid marks
visible, hollow occluded, outside not drawn; ``service.draw``) and ``<out>/contact_sheet.png``.
"""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from service.store import ImageRow, Store

log = logging.getLogger(__name__)

REVIEW = "review"
SENT = ("uploaded", "reviewed")  # states of images that went to the bucket


@dataclass(frozen=True)
class ImageLine:
    """One row of the table: a sample image and what the appliance decided about it."""

    name: str
    state: str
    decision: str
    audit: bool
    score: float | None
    reasons: tuple[str, ...]
    heads: int
    persons: int
    visible: int
    occluded: int
    outside: int


def progress_bar(label: str, done: int, total: int, width: int = 30) -> None:
    """Redraw a one-line progress bar on stderr (the caller ends the line). Where stderr is not a
    terminal (a log file, journald) it is written at each quarter only, one line each: every
    redraw went into one line of the log (200 frames)."""
    filled = int(width * done / max(total, 1))
    bar = f"{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}"
    if sys.stderr.isatty():
        sys.stderr.write("\r" + bar)
    elif done == total or (done * 4) // max(total, 1) != ((done - 1) * 4) // max(total, 1):
        sys.stderr.write(bar + ("" if done == total else "\n"))
    else:
        return
    sys.stderr.flush()


def line_for(name: str, row: "ImageRow | None") -> ImageLine:
    """The table row of a stored image (record, decision, score, reasons); "missing" without one."""
    if row is None:
        return ImageLine(name, "missing", "-", False, None, (), 0, 0, 0, 0, 0)
    record = row.record or {}
    counts = {"visible": 0, "occluded": 0, "outside": 0}
    for p in record.get("persons", []):
        for k in p.get("keypoints", []):
            state = k.get("visibility", "outside")
            counts[state] = counts.get(state, 0) + 1
    return ImageLine(name, row.state, row.decision or "-", row.audit, row.score, row.reasons,
                     len(record.get("heads", [])), len(record.get("persons", [])),
                     counts["visible"], counts["occluded"], counts["outside"])


def format_table(lines: list[ImageLine]) -> str:
    """The per-image table as text (fixed-width columns, as wide as their longest entry: an
    audit pick sent for review, "review (audit) -> bucket", ran into the score)."""
    rows = []
    for ln in lines:
        decision = {"auto_accepted": "auto-accepted"}.get(ln.decision, ln.decision)
        decision += " (audit)" if ln.audit else ""
        decision += " -> bucket" if ln.state in SENT else ""
        reasons = ", ".join(ln.reasons[:3]) or "-"
        if len(reasons) > 39:
            reasons = reasons[:36] + "..."
        rows.append((ln, decision, f"{ln.score:.2f}" if ln.score is not None else "-", reasons))
    wn = max([len("image"), *(len(ln.name) for ln, *_ in rows)]) + 2
    wd = max([len("decision"), *(len(d) for _, d, *_ in rows)]) + 2
    head = (f"{'image':<{wn}}{'decision':<{wd}}{'score':>6}  {'main reasons':<40}{'heads':>6}{'persons':>8}"
            f"{'visible':>8}{'occl.':>6}{'outside':>8}")
    out = [head, "-" * len(head)]
    for ln, decision, score, reasons in rows:
        out.append(f"{ln.name:<{wn}}{decision:<{wd}}{score:>6}  {reasons:<40}{ln.heads:>6}{ln.persons:>8}"
                   f"{ln.visible:>8}{ln.occluded:>6}{ln.outside:>8}")
    out.append("-" * len(head))
    return "\n".join(out)


def bucket_objects(bucket: Path) -> set[str]:
    """Keys of the objects in the local bucket folder (writes in progress left out)."""
    from .objectstore import LocalFolderStore

    return set(LocalFolderStore(bucket).list(""))


def write_pictures(out: Path, store: "Store", ids: Mapping[str, Path], bundle: Path,
                   lines: list[ImageLine]) -> int:
    """``annotated/<name>.png`` per annotated image and ``contact_sheet.png``; returns how many."""
    from service.bundle import load_bundle
    from service.draw import contact_sheet, draw_prediction, write_png
    from service.imageio import decode_image
    from service.record import Prediction

    schema = load_bundle(bundle).keypoints
    folder = out / "annotated"
    folder.mkdir(parents=True, exist_ok=True)
    tiles, captions = [], []
    for (image_id, sample), ln in zip(ids.items(), lines):
        row = store.get(image_id)
        if row is None or row.record is None:
            continue
        pixels = decode_image(store.image_bytes(image_id)).pixels
        drawn = draw_prediction(pixels, Prediction.from_json(row.record), schema)
        write_png(folder / f"{sample.stem}.png", drawn)
        tiles.append(drawn)
        captions.append(f"{sample.stem[-6:]}: {ln.decision} {ln.score or 0:.2f}")
    write_png(out / "contact_sheet.png", contact_sheet(tiles, cols=4, captions=captions))
    return len(tiles)


def _manifest_lines(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def summary(lines: list[ImageLine], bucket: Path, before: set[str], appliance_id: str) -> str:
    """Decisions, and what this run sent to the bucket (object counts, manifest paths)."""
    review = [ln for ln in lines if ln.decision == REVIEW]
    auto = [ln for ln in lines if ln.decision == "auto_accepted"]
    failed = [ln for ln in lines if ln.state == "failed"]
    audits = sum(1 for ln in review if ln.audit)
    text = [f"{len(lines)} images: {len(auto)} auto-accepted, {len(review)} to review "
            f"({audits} of them random audit picks){f', {len(failed)} failed' if failed else ''}"]
    after = bucket_objects(bucket)
    groups = (("images/", "image(s)"), (f"preannotations/{appliance_id}/", "pre-annotation(s)"),
              (f"manifests/{appliance_id}/", "manifest(s)"))
    new = after - before
    added = ", ".join(f"{sum(1 for k in new if k.startswith(p))} {what}" for p, what in groups)
    total = ", ".join(f"{sum(1 for k in after if k.startswith(p))} {what}" for p, what in groups)
    text.append(f"bucket {bucket} (a local folder standing in for the S3 bucket):")
    text.append(f"  this run added {added}" if new else "  this run added nothing (everything was there already)")
    text.append(f"  in the bucket now: {total}")
    for key in sorted(k for k in after if k.startswith(f"manifests/{appliance_id}/")):
        marker = "new" if key in new else "earlier run"
        text.append(f"  Ground Truth input manifest ({marker}): {bucket / key} "
                    f"({_manifest_lines(bucket / key)} lines)")
    return "\n".join(text)


def report(out: Path, store_root: Path, ids: Mapping[str, Path], bundle: Path, bucket: Path,
           before: set[str], appliance_id: str) -> list[ImageLine]:
    """Print the table and the summary, write the pictures; returns the table's rows."""
    from service.store import Store

    store = Store(store_root)
    try:
        lines = [line_for(sample.name, store.get(image_id)) for image_id, sample in ids.items()]
        pictures = write_pictures(out, store, ids, bundle, lines)
    finally:
        store.close()
    print(format_table(lines))
    print(summary(lines, bucket, before, appliance_id))
    print(f"pictures: {out / 'annotated'}/*.png ({pictures}; solid marks visible, hollow occluded)   "
          f"overview: {out / 'contact_sheet.png'}")
    print(f"records: {out / 'annotations'}/<sha256>.json   store: {store_root}   config: {out / 'annotator.toml'}")
    log.debug("demo report: %s", json.dumps([ln.__dict__ for ln in lines])[:2000])
    return lines
