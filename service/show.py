"""``annotator show``: look at what the appliance labelled, as pictures.

The store keeps records as JSON; a perception engineer checks labels by eye. This draws chosen
images of the store (by id prefix, or the newest ones matching a state, decision or camera)
with their heads, persons, skeletons and each point's visibility (``service.draw``), writes
``<out>/<id12>.png`` per image and ``<out>/contact_sheet.png``, and prints a table. An image
with a merged review gets a second picture, the reviewer's label (``<id12>.reviewed.png``),
beside the model's on the contact sheet: what the correction changed is seen at a glance.
It changes nothing in the store or the dataset and does not disturb a running daemon; it opens
the store as every command does (which takes SQLite's write lock for an instant), so run it as a
user who may write the store, e.g. the service user.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from .errors import ConfigError, ImageError, ImageNotFound
from .store import STATES, ImageRow, Store, open_existing

if TYPE_CHECKING:
    import numpy as np

    from .outputs import ReviewedLabels

MAX_SIDE = 1280  # pictures are drawn at most this wide or high (a reduced decode of big images)
MIN_PREFIX = 6


@dataclass
class Shown:
    row: ImageRow
    picture: Path | None  # None: no bytes any more (retention) or not decodable
    reviewed_picture: Path | None = None
    note: str = ""


def pick_rows(store: Store, ids: Sequence[str], latest: int, state: str | None, decision: str | None,
              camera: str | None) -> list[ImageRow]:
    """The rows to show: each id prefix's one image (a prefix must name exactly one), or else the
    ``latest`` newest annotated images that match the filters, newest first."""
    if ids:
        out = []
        for prefix in ids:
            p = prefix.strip().lower()
            if len(p) < MIN_PREFIX or any(c not in "0123456789abcdef" for c in p):
                raise ConfigError(f"show: {prefix!r} is not an image id or a prefix of one "
                                  f"(at least {MIN_PREFIX} hex digits, as `annotator status` and sidecars show)")
            rows = store.find(p, limit=2)
            if not rows:
                raise ConfigError(f"show: no image in the store starts with {p}")
            if len(rows) > 1:
                raise ConfigError(f"show: {p} names more than one image; give more digits")
            out.append(rows[0])
        return out
    return store.newest(latest, state=state, decision=decision, camera=camera)


def _reviewed_prediction(label: Mapping[str, Any], names: Sequence[str], target: Sequence[str]) -> Any:
    from .outputs import reviewed_record
    from .record import Prediction

    rec = reviewed_record(label, names, target)
    for p in rec["persons"]:
        for k in p["keypoints"]:
            k.setdefault("main_conf", 1.0)
            k.setdefault("visible_conf", 1.0)
    return Prediction.from_json(rec)


def draw_rows(store: Store, rows: Sequence[ImageRow], out: Path, reviewed: "ReviewedLabels | None" = None) -> list[Shown]:
    """Draw each row's record (and its merged review, when ``reviewed`` has one) into ``out``."""
    from .draw import contact_sheet, draw_prediction, write_png
    from .imageio import decode_image
    from .outputs import schema_for
    from .record import Prediction

    out.mkdir(parents=True, exist_ok=True)
    shown: list[Shown] = []
    tiles: list["np.ndarray"] = []
    captions: list[str] = []
    for row in rows:
        name = row.image_id[:12]
        if row.record is None:
            shown.append(Shown(row, None, note=f"not annotated ({row.state}{': ' + row.error if row.error else ''})"))
            continue
        try:
            pixels = decode_image(store.image_bytes(row.image_id), max_side_hint=MAX_SIDE).pixels
        except ImageNotFound as exc:
            shown.append(Shown(row, None, note=str(exc).split(": ", 1)[-1]))
            continue
        except ImageError as exc:
            shown.append(Shown(row, None, note=f"cannot decode: {exc}"))
            continue
        schema = schema_for(row.record)
        drawn = draw_prediction(pixels, Prediction.from_json(row.record), schema)
        item = Shown(row, out / f"{name}.png")
        write_png(item.picture, drawn)  # type: ignore[arg-type]
        tiles.append(drawn)
        captions.append(f"{name[:8]} {row.decision or row.state} {row.score or 0:.2f}")
        label = reviewed.get(row.image_id) if reviewed is not None else None
        if label is not None:
            mine = draw_prediction(pixels, _reviewed_prediction(label, reviewed.names, schema.names),  # type: ignore[union-attr]
                                   schema, show_conf=False)
            item.reviewed_picture = out / f"{name}.reviewed.png"
            write_png(item.reviewed_picture, mine)
            tiles.append(mine)
            captions.append(f"{name[:8]} reviewed")
        shown.append(item)
    if tiles:
        write_png(out / "contact_sheet.png", contact_sheet(tiles, cols=4, captions=captions))
    return shown


def _printable(text: str) -> str:
    """``text`` with control and format characters written as escapes: a camera is a folder name a
    capture tool chose, and a newline, tab or escape sequence in it broke the table's rows (or
    recoloured, cleared or retitled the terminal)."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def table(shown: Sequence[Shown]) -> str:
    head = ("image", "camera", "state", "decision", "score", "reasons", "picture")
    rows = [head]
    for s in shown:
        r = s.row
        rows.append((r.image_id[:12], _printable(r.camera or "-"), r.state, r.decision or "-",
                     "-" if r.score is None else f"{r.score:.2f}", ",".join(r.reasons) or "-",
                     str(s.picture) + (" + reviewed" if s.reviewed_picture else "") if s.picture else s.note))
    widths = [max(len(x[i]) for x in rows) for i in range(len(head) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(x[:-1], widths)) + "  " + x[-1] for x in rows)


def cmd_show(args: argparse.Namespace, config: Any, reviewed_labels: Any) -> int:
    if args.state is not None and args.state not in STATES:
        raise ConfigError(f"show: --state must be one of {', '.join(STATES)}, got {args.state!r}")
    if args.latest < 1:
        raise ConfigError(f"show: --latest must be 1 or more, got {args.latest}")
    store = open_existing(Path(config.store.root), "show", float(config.store.lease_seconds))
    try:
        rows = pick_rows(store, args.ids, args.latest + 1, args.state, args.decision, args.camera)
        more = not args.ids and len(rows) > args.latest  # said: 16 of 18 were drawn without a word
        rows = rows if args.ids else rows[:args.latest]
        if not rows:
            print("no image matches")
            return 0
        with reviewed_labels() as reviewed:
            shown = draw_rows(store, rows, Path(args.out), reviewed)
    finally:
        store.close()
    print(table(shown))
    drawn = sum(1 for s in shown if s.picture is not None)
    if drawn:
        print(f"{drawn} pictures and contact_sheet.png in {args.out}")
    if more:
        print(f"the newest {args.latest} shown; more images match: --latest N shows more")
    return 0
