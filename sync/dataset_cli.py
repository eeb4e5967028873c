"""``annotator dataset status`` and ``annotator dataset export OUT``.

``register(subparsers)`` adds the ``dataset`` command to the ``annotator`` parser. Both
subcommands first bring the auto-accepted images of the store into the dataset (recording a
new version when that changed it). Errors the user can fix raise ``SyncError`` or
``SyncConfigError`` (the ``annotator`` main turns them into exit code 2 and one line).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

from .propagate import DEFAULT_DISTANCE
from .pull_settings import PullSettings, settings_from

log = logging.getLogger(__name__)


def add_common_options(p: argparse.ArgumentParser) -> None:
    """``--config``, ``--store-root``, ``--dataset-root`` (shared with ``annotator models``)."""
    p.add_argument("--config", type=Path, default=None, help="the appliance's TOML file (default: $ANNOTATOR_CONFIG)")
    p.add_argument("--store-root", type=Path, default=None, help="the daemon's store folder (overrides [store] root)")
    p.add_argument("--dataset-root", type=Path, default=None, help="the dataset folder (default <store root>/dataset)")


def settings(args: argparse.Namespace, **overrides: Any) -> PullSettings:
    """``PullSettings`` from the config file and the command line."""
    from .config import load_sync_config

    cfg = load_sync_config(args.config)
    # cfg.base: the folder of --config or $ANNOTATOR_CONFIG, as the agent joins [sync.*] paths to.
    out = settings_from(cfg.store_root, cfg.tables, cfg.base, {
        "store_root": args.store_root, "dataset_root": getattr(args, "dataset_root", None), **overrides},
        source=cfg.source)
    # reloads go to a daemon that may want its token and speak TLS only
    return dataclasses.replace(out, daemon_token=cfg.daemon_token, daemon_tls=cfg.daemon_tls)


def _open(s: PullSettings) -> tuple[Any, Any]:
    """(store, dataset) of the settings (shared with ``annotator models``); a store or dataset
    this user may not write is one line naming it, not an sqlite3 traceback."""
    import sqlite3

    from service.sqlite import open_failure
    from service.store import Store

    from .dataset import Dataset
    from .errors import SyncConfigError

    if not (s.store_root / "store.sqlite3").is_file():
        raise SyncConfigError(f"store root {s.store_root} holds no store.sqlite3; give --store-root or [store] root")
    try:
        store = Store(s.store_root)
    except sqlite3.OperationalError as exc:
        raise SyncConfigError(open_failure("store", s.store_root, exc)) from exc
    try:
        return store, Dataset(s.dataset_root, holdout_fraction=s.holdout_fraction)
    except sqlite3.OperationalError as exc:
        store.close()
        raise SyncConfigError(open_failure("dataset", s.dataset_root, exc)) from exc


def _refresh(store: Any, dataset: Any) -> None:
    from .merge import Merger

    added = Merger(store, dataset).add_auto_accepted()
    dataset.record_version(f"{added} auto-accepted images added")  # a no-op when nothing changed


def cmd_status(args: argparse.Namespace) -> int:
    store, dataset = _open(settings(args))
    try:
        _refresh(store, dataset)
        st = dataset.status()
    finally:
        dataset.close()
        store.close()
    if args.json:
        sys.stdout.write(json.dumps(st, indent=2) + "\n")
        return 0
    lines = [f"dataset {st['version'][:16]}  ({st['path']})",
             f"images {st['images']}: reviewed {st['reviewed']}, auto-accepted {st['auto']}, "
             f"hold-out {st['holdout']} (fraction {st['holdout_fraction']})",
             f"recorded versions {st['recorded_versions']}"]
    for name, group in st["mistakenness"].items():
        if group["count"]:
            lines.append(f"mistakenness {name:12s} n={group['count']:<5d} mean={group['mean']:.3f} "
                         f"median={group['median']:.3f} p90={group['p90']:.3f} adjusted={group['adjusted']}")
        else:
            lines.append(f"mistakenness {name:12s} n=0")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .coco_export import export_dataset

    store, dataset = _open(settings(args))
    try:
        _refresh(store, dataset)
        res = export_dataset(dataset, store.image_path, Path(args.out), include_holdout=args.include_holdout,
                             row_of=store.get, propagate_distance=args.propagate)
    finally:
        dataset.close()
        store.close()
    sys.stdout.write(f"dataset {res.version[:16]}: {res.images} images ({res.reviewed} reviewed, {res.auto} auto) "
                     f"written to {res.annotations}; {res.holdout_left_out} hold-out images left out"
                     + (f"; {len(res.missing_images)} images missing from the store" if res.missing_images else "")
                     + (f"; {res.propagated} auto images took a reviewed frame's label" if args.propagate is not None
                        else "")
                     + "\n")
    return 0


def _bits(text: str) -> int:
    try:
        bits = int(text)
    except ValueError:
        bits = -1
    if not 0 <= bits <= 64:
        raise argparse.ArgumentTypeError(f"expected dHash bits, an integer in 0..64, got {text!r}")
    return bits


def register(subparsers: Any) -> None:
    """Add ``dataset status`` and ``dataset export`` to an argparse subparsers object."""
    p = subparsers.add_parser("dataset", help="the training dataset: reviewed + auto-accepted labels")
    sub = p.add_subparsers(dest="dataset_command", required=True)
    s = sub.add_parser("status", help="version, counts, and mistakenness of reviewed images (audit vs. judge picks)")
    add_common_options(s)
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_status)
    s = sub.add_parser("export", help="write the dataset as COCO key points (annotations.json + images/) for training")
    add_common_options(s)
    s.add_argument("out", help="output folder")
    s.add_argument("--include-holdout", action="store_true",
                   help="also write the reviewed hold-out images (the gate's validation set)")
    s.add_argument("--propagate", type=_bits, nargs="?", const=DEFAULT_DISTANCE, default=None, metavar="BITS",
                   help="a reviewed frame's label replaces the auto labels of the frames of its capture session "
                        "(gRPC metadata.session or drop/<camera>/<session>/) whose dHash is within BITS of it "
                        f"(default {DEFAULT_DISTANCE} when given; see sync/propagate.py)")
    s.set_defaults(func=cmd_export)
