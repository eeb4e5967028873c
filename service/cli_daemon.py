"""The daemon's subcommands of ``annotator``: serve, annotate, submit, export, bench.

``service.cli`` registers them with ``add_daemon_commands``. Output for people goes to stdout;
errors the user can fix raise ``AnnotatorError`` (exit code 2, one line). ``export`` is the one
that reaches into ``sync`` (lazily, like ``service.cli``): reviewed labels live in its dataset.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sqlite3
import sys
from pathlib import Path
from typing import Any, Iterator

from .errors import AnnotatorError, ConfigError, ImageError

log = logging.getLogger(__name__)
DEMO_BUNDLE = Path(__file__).resolve().parent / "assets" / "demo_bundle"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def parse_sets(items: list[str] | None) -> dict[str, str]:
    """``["server.listen=0.0.0.0:1", ...]`` -> ``{"server.listen": "0.0.0.0:1"}``."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set server.listen=127.0.0.1:50051")
        out[key.strip()] = value
    return out


def _config(args: argparse.Namespace) -> Any:
    from .config import load_config

    return load_config(Path(args.config) if args.config else None, os.environ, parse_sets(getattr(args, "set", None)))


def expand_files(items: list[str]) -> Iterator[Path]:
    """Files as given, and image files inside given folders (recursively, sorted)."""
    for item in items:
        p = Path(item)
        if p.is_dir():
            yield from sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            yield p


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import serve

    cfg = _config(args)
    for key, folder in (("store.root", cfg.store.root), ("drop.folder", cfg.drop.folder),
                        ("outputs.sidecar_dir", cfg.outputs.sidecar_dir)):
        # else "[Errno 17] File exists: ..." once the bundle had loaded, naming no key
        if folder is not None and Path(folder).exists() and not Path(folder).is_dir():
            raise ConfigError(f"{key}: {folder} is a file, not a folder; point {key} at a folder")
    cfg.require("engine.bundle", "store.root")  # as serve does first: a bad config makes no folder
    held = _hold_store(Path(cfg.store.root))
    try:
        return serve(cfg, sole=held is not None)  # the only daemon: a killed one's leases are taken at once
    except RuntimeError as exc:
        # grpcio raises RuntimeError for a port it cannot bind (create_server's `if not port` never sees 0)
        if "Failed to bind" not in str(exc):
            raise
        raise ConfigError(f"server.listen: cannot listen on {cfg.server.listen}: the port is in use (another "
                          "daemon? annotator status --server ...) or the address is not this machine's; stop "
                          "that process or choose another server.listen") from exc
    finally:
        if held is not None:
            os.close(held)


SERVE_LOCK = "serve.lock"


def _hold_store(root: Path) -> int | None:
    """One daemon per store: hold ``<store root>/serve.lock`` (``service.lockfile``) while serving.

    A second ``annotator serve`` of the same store (started by hand beside the systemd unit, on
    another port) annotated beside the first, but the judge's near-duplicate memory, review
    budgets and review share live in each daemon (``service.judge``): a capture sequence went
    to review once per daemon. It is refused at once, naming the first one's pid, before it
    loads a bundle or touches the store. A store root this user cannot create or lock (read-only,
    permissions) is left to the daemon's own start-up to report, as before: None."""
    from .lockfile import Held, Unopenable, hold

    try:
        root.mkdir(parents=True, exist_ok=True)
        return hold(root / SERVE_LOCK)
    except Held as exc:
        raise ConfigError(f"store.root: another annotator serve (pid {exc.pid}) is running on the store {root} "
                          f"(it holds {exc.path}); one daemon per store: stop it first (e.g. systemctl stop "
                          f"annotator) or give this one its own [store] root") from None
    except Unopenable as exc:
        # A lock file another user made unreadable (sudo annotator serve with umask 077): the
        # daemon went on without the lock, and a second daemon on the store was not refused.
        raise ConfigError(f"store.root: {exc.advice('daemon')}") from None
    except OSError:
        log.debug("cannot lock %s; the daemon's start-up says what is wrong with it", root / SERVE_LOCK, exc_info=True)
        return None


def cmd_annotate(args: argparse.Namespace) -> int:
    """Label files once with a bundle, without a store or server; one sidecar per image."""
    from .bundle import load_bundle
    from .daemon import record_for
    from .engine import Engine
    from .imageio import read_image
    from .judge import Judgement, load_score_fn
    from .outputs import write_sidecar
    from .store import image_id_of

    bundle = load_bundle(args.bundle)
    engine = Engine(bundle, batch_size=args.batch_size)
    score_fn = load_score_fn(args.score_fn, bundle)
    threshold = float(bundle.judgement.get("score_threshold", 0.5))
    out = Path(args.out)
    side = max(max(m.size) for m in engine.models.values())
    failures = done = 0
    for path in expand_files(args.files):
        try:
            data = path.read_bytes()
            image = read_image(path, max_side_hint=side)
        except (OSError, ImageError) as exc:
            print(f"{path}: skipped: {exc}", file=sys.stderr)
            failures += 1
            continue
        prediction = engine.predict([image])[0]
        score, reasons = score_fn(prediction, bundle)
        verdict = Judgement(float(score), tuple(reasons), "review" if score < threshold else "auto_accepted", False)
        record = record_for(image_id_of(data), str(path), prediction, verdict, bundle)
        sidecar = write_sidecar(out, record)
        done += 1
        print(f"{path}: {len(prediction.persons)} persons, {len(prediction.heads)} heads, "
              f"{verdict.decision} (score {verdict.score:.2f}) -> {sidecar}")
    print(f"annotated {done} images with bundle {bundle.id}; {failures} skipped")
    return 1 if failures and not done else 0


def cmd_submit(args: argparse.Namespace) -> int:
    import grpc

    from .client import AnnotatorClient
    from .dropfolder import text_name

    failures = 0
    with AnnotatorClient(args.server, timeout=args.timeout, token=args.token or os.environ.get("ANNOTATOR_TOKEN")) as c:
        for path in expand_files(args.files):
            try:
                ann = c.annotate(path.read_bytes(), camera_id=args.camera, request_id=text_name(path.name))
            except OSError as exc:
                print(f"{path}: cannot read: {exc}", file=sys.stderr)
                failures += 1
                continue
            except grpc.RpcError as exc:
                print(f"{path}: {exc.code().name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
                failures += 1
                continue
            print(f"{path}: {ann.image_id[:12]} {ann.state} persons={len(ann.persons)} "
                  f"score={ann.judgement.score:.2f} {ann.judgement.decision}")
    return 1 if failures else 0


def dataset_root(cfg: Any, config_path: Path | None) -> Path:
    """Where the sync agent keeps the dataset: ``[sync.dataset] root`` (relative to the config
    file's folder), else ``<store root>/dataset``, by ``sync.pull_settings``'s own rule."""
    try:
        from sync.pull_settings import settings_from
    except ModuleNotFoundError as exc:  # a daemon-only install: no agent, no [sync] tables to read
        if not (exc.name or "").startswith("sync"):
            raise
        return Path(cfg.store.root) / "dataset"
    tables = dict(cfg.extra.get("sync", {}))
    base = config_path.absolute().parent if config_path is not None else Path.cwd()
    return settings_from(Path(cfg.store.root), {"dataset": tables.get("dataset", {})}, base).dataset_root


@contextlib.contextmanager
def reviewed_labels(root: Path) -> Iterator[Any]:
    """``outputs.ReviewedLabels`` of the dataset under ``root`` (None when there is none; none is
    created). Merged reviews live only there: the store's records stay the model's output."""
    from .outputs import ReviewedLabels

    if not (Path(root) / "dataset.sqlite3").is_file():
        yield None
        return
    from sync.dataset import REVIEWED, Dataset  # light: sqlite3 and numpy, as the daemon's own modules

    try:
        dataset = Dataset(Path(root))
    except sqlite3.Error as exc:
        raise AnnotatorError(f"dataset {root}: cannot open: {exc}; run as the service user (or give "
                             "--dataset-root)") from exc
    try:
        def get(image_id: str) -> Any:
            entry = dataset.get(image_id)
            return entry.label if entry is not None and entry.origin == REVIEWED else None

        yield ReviewedLabels(dataset.schema.names, get)
    finally:
        dataset.close()


def _dataset_root_of(args: argparse.Namespace, cfg: Any) -> Path:
    """``--dataset-root``, else the sync agent's dataset folder by the config (``dataset_root``)."""
    if args.dataset_root:
        return Path(args.dataset_root)
    config_path = Path(args.config) if args.config else (
        Path(os.environ["ANNOTATOR_CONFIG"]) if os.environ.get("ANNOTATOR_CONFIG") else None)
    return dataset_root(cfg, config_path)


def cmd_export(args: argparse.Namespace) -> int:
    from .outputs import export_coco, export_yolo
    from .store import open_existing

    cfg = _config(args)
    if not args.coco and not args.yolo:
        raise ConfigError("export: give --coco OUT.json or --yolo DIR")
    root = _dataset_root_of(args, cfg)
    if args.dataset_root and not (root / "dataset.sqlite3").is_file():
        raise ConfigError(f"--dataset-root {root}: no dataset.sqlite3 there; give the sync agent's dataset folder "
                          "([sync.dataset] root, default <store root>/dataset)")
    store = open_existing(Path(cfg.store.root), "export", float(cfg.store.lease_seconds))
    try:
        with reviewed_labels(root) as reviewed:
            if reviewed is None:
                log.info("no dataset at %s: reviewed images are written with the model's labels, as \"auto\"", root)
            if args.coco:
                print(f"COCO key points written to {export_coco(store, Path(args.coco), reviewed=reviewed)}")
            if args.yolo:
                print(f"YOLO labels written to {export_yolo(store, Path(args.yolo), reviewed=reviewed)}")
    finally:
        store.close()
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from .show import cmd_show as run

    cfg = _config(args)
    root = _dataset_root_of(args, cfg)
    return run(args, cfg, lambda: reviewed_labels(root))


def cmd_prune(args: argparse.Namespace) -> int:
    from .retention import cmd_prune as run

    return run(args, _config(args))


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    files = list(expand_files(args.images))
    if not files:
        raise AnnotatorError(f"bench: no images found in {args.images}")
    providers = [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None
    report = run_bench(Path(args.bundle), files[: args.count], repeat=args.repeat, skip_ultralytics=args.no_ultralytics,
                       providers=providers, sets=parse_sets(args.set))
    print(report.text())
    return 0


def add_daemon_commands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register serve, annotate, submit, export, show, prune and bench."""
    samples = Path(__file__).resolve().parent / "assets" / "samples"

    s = sub.add_parser("serve", help="run the daemon in the foreground (gRPC + drop folder)")
    s.add_argument("--config", help="TOML file (default: $ANNOTATOR_CONFIG; see deploy/annotator.example.toml)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key, e.g. server.listen=127.0.0.1:0")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("annotate", help="label image files once without a server; writes JSON sidecars")
    s.add_argument("files", nargs="+", help="image files or folders")
    s.add_argument("--bundle", default=str(DEMO_BUNDLE))
    s.add_argument("--out", default="annotations", help="sidecar folder (default: annotations)")
    s.add_argument("--score-fn", default="default", help="'default' or package.module:function")
    s.add_argument("--batch-size", type=int, default=8)
    s.set_defaults(func=cmd_annotate)

    s = sub.add_parser("submit", help="send image files to a running daemon over gRPC")
    s.add_argument("files", nargs="+", help="image files or folders")
    s.add_argument("--server", required=True, help="HOST:PORT")
    s.add_argument("--camera", default="", help="camera id sent with every image")
    s.add_argument("--token", help="bearer token (default: $ANNOTATOR_TOKEN)")
    s.add_argument("--timeout", type=float, default=60.0)
    s.set_defaults(func=cmd_submit)

    s = sub.add_parser("export", help="export annotated images from the store as COCO key points or YOLO")
    s.add_argument("--config", help="TOML file (default: $ANNOTATOR_CONFIG)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE")
    s.add_argument("--coco", metavar="OUT.json")
    s.add_argument("--yolo", metavar="DIR")
    s.add_argument("--dataset-root", metavar="DIR", help="the sync agent's dataset, whose reviewed labels replace "
                   "the model's (default: [sync.dataset] root, else <store root>/dataset)")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("show", help="draw the store's images with their labels: PNGs, a contact sheet and a table")
    s.add_argument("ids", nargs="*", help="image ids or prefixes (6+ hex digits); none: the newest images")
    s.add_argument("--config", help="TOML file (default: $ANNOTATOR_CONFIG)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE")
    s.add_argument("--latest", type=int, default=16, help="how many of the newest images (default 16)")
    s.add_argument("--state", help="only images in this state (e.g. review_pending, failed)")
    s.add_argument("--decision", choices=("auto_accepted", "review"), help="only images the judge decided so")
    s.add_argument("--camera", help="only images of this camera (the drop folder's first folder name)")
    s.add_argument("--out", default="annotator-show", help="folder for the PNGs (default: annotator-show)")
    s.add_argument("--dataset-root", metavar="DIR", help="the sync agent's dataset, for reviewed labels "
                   "(default: [sync.dataset] root, else <store root>/dataset)")
    s.set_defaults(func=cmd_show)

    s = sub.add_parser("prune", help="remove old processed/ copies, auto-accepted images' bytes and quarantined "
                       "files ([retention])")
    s.add_argument("--config", help="TOML file (default: $ANNOTATOR_CONFIG)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE")
    s.add_argument("--processed-days", type=float, help="override [retention] processed_days")
    s.add_argument("--auto-image-days", type=float, help="override [retention] auto_image_days")
    s.add_argument("--quarantine-days", type=float, help="override [retention] quarantine_days")
    s.add_argument("--dry-run", action="store_true", help="count what would go, remove nothing")
    s.set_defaults(func=cmd_prune)

    s = sub.add_parser("bench", help="images/s: raw ONNX vs the daemon (drop folder, gRPC) vs ultralytics")
    s.add_argument("images", nargs="*", default=[str(samples)], help="images or folders (default: shipped samples)")
    s.add_argument("--bundle", default=str(DEMO_BUNDLE))
    s.add_argument("--count", type=int, default=24, help="images to use")
    s.add_argument("--repeat", type=int, default=1, help="passes over the images for the raw timings")
    s.add_argument("--no-ultralytics", action="store_true", help="skip the ultralytics comparison")
    s.add_argument("--providers", help="onnxruntime execution providers for the daemon, comma separated, e.g. "
                   "CUDAExecutionProvider,CPUExecutionProvider (default: the engine's order); the raw sessions "
                   "run on the CPU too, as the baseline")
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a daemon config key for part (b), e.g. engine.run_batch=8 (as serve --set)")
    s.set_defaults(func=cmd_bench)
