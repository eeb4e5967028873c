"""``annotator train``: arguments, ``--init current`` resolution, training mix, publishing.

::

    annotator train DATASET OUT [--reviewed-only | --auto-weight W] [--init pretrained|scratch|current|BUNDLE]
                    [--int8] [--publish REGISTRY [--sign-key KEY.pem] [--registry-endpoint URL]] [--config F]
                    [--allow-holdout]

``DATASET`` is a COCO key-points json or a folder with ``annotations.json`` and ``images/``,
e.g. the output of ``annotator dataset export`` (reviewed + auto-accepted labels with
provenance; ``exporter.mix`` explains the weighting). ``--init current`` starts from the
weights of the bundle in use: ``<models root>/current`` of the sync agent's model slots
(``[sync.models] root``, default ``<store root>/models``), else the daemon's
``[engine] bundle``. ``--publish`` copies the finished bundle to a registry folder or
``s3://bucket/prefix`` (``sync.publish``) where ``annotator sync`` pulls it; with ``--int8``
its int8 copy (``OUT.int8``, ``exporter.quantize``) goes instead, so that a box running int8
bundles keeps them through the loop. An export made with
``--include-holdout`` is refused unless ``--allow-holdout`` (``exporter.train.check_holdout``).
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

INIT_CHOICES = ("pretrained", "scratch", "current")


def add_train_arguments(s: argparse.ArgumentParser) -> None:
    """The options of ``annotator train`` (``service.cli`` builds the parser)."""
    s.add_argument("dataset", help="COCO key-points json, or a folder with annotations.json and images/ "
                                   "(e.g. from `annotator dataset export`)")
    s.add_argument("out", help="bundle directory to write")
    s.add_argument("--images", help="images folder (default: images/ beside the json)")
    s.add_argument("--work", help="working folder for label sets and runs (default: OUT.work); re-run to resume")
    s.add_argument("--epochs", type=int, default=30)
    s.add_argument("--imgsz", type=int, default=320)
    s.add_argument("--batch", type=int, default=16)
    s.add_argument("--device", default="cpu", help="cpu, 0 (first GPU), ...")
    s.add_argument("--workers", type=int, default=2, help="data-loader worker processes (0: in the main process)")
    s.add_argument("--init", default="pretrained",
                   help="pretrained (COCO YOLO11n-pose), scratch, current (the bundle in use on this box), "
                        "or a bundle directory whose weights/ to continue from")
    s.add_argument("--val-fraction", type=float, default=0.1)
    s.add_argument("--roles", default="head,pose_main,pose_visible")
    s.add_argument("--seed", type=int, default=0)
    mix = s.add_mutually_exclusive_group()
    mix.add_argument("--reviewed-only", action="store_true", help="train on human-reviewed images only")
    mix.add_argument("--auto-weight", type=float, default=1.0,
                     help="weight of auto-accepted images, 0..10 (reviewed: 1); realised as a deterministic "
                          "per-image repeat count with that expectation (default 1)")
    s.add_argument("--propagated-weight", type=float, default=1.0, metavar="W",
                   help="weight of the auto images that took a reviewed frame's label (`annotator dataset export "
                        "--propagate`), 0..10 (default 1: as a reviewed image)")
    s.add_argument("--allow-holdout", action="store_true",
                   help="train on an export made with --include-holdout (refused otherwise: its hold-out images "
                        "are the model-pull gate's validation set); the lineage records it")
    s.add_argument("--config", type=Path, default=None,
                   help="the appliance's TOML file, to find the bundle in use for --init current "
                        "(default $ANNOTATOR_CONFIG)")
    s.add_argument("--models-root", type=Path, default=None, help="model slots folder (overrides the config)")
    s.add_argument("--int8", action="store_true", help="also write OUT.int8, an int8 copy for faster CPU inference "
                   "(annotator quantize, ranges from the dataset's images), and publish that one")
    s.add_argument("--publish", metavar="REGISTRY", help="publish the bundle to a registry folder or s3://bucket/prefix")
    s.add_argument("--sign-key", type=Path, help="ed25519 private key (PEM): write bundle.sig when publishing")
    s.add_argument("--registry-endpoint", help="S3 endpoint URL of the registry (default: AWS / $AWS_ENDPOINT_URL)")


def models_root_from_config(config: Path | None, env: Any = os.environ) -> tuple[Path, Path | None]:
    """(models root, the daemon's engine.bundle) from the appliance's TOML file."""
    from service.config import load_config

    path = config if config is not None else (Path(env["ANNOTATOR_CONFIG"]) if env.get("ANNOTATOR_CONFIG") else None)
    cfg = load_config(Path(path).resolve() if path is not None else None, env=env)
    models = dict(dict(cfg.extra.get("sync", {})).get("models", {}))
    base = Path(path).resolve().parent if path is not None else Path.cwd()
    root = base / Path(models["root"]) if models.get("root") else Path(cfg.store.root) / "models"
    bundle = getattr(cfg.engine, "bundle", None)
    return root, Path(bundle) if bundle else None


def resolve_init(init: str, config: Path | None, models_root: Path | None) -> str:
    """``--init`` as TrainConfig takes it: "current" becomes the directory of the bundle in use."""
    from service.errors import AnnotatorError

    if init != "current":
        if init not in INIT_CHOICES and not (Path(init) / "bundle.json").is_file():
            raise AnnotatorError(f"--init: {init} is not a bundle directory (no bundle.json); give pretrained, "
                                 "scratch, current or a bundle directory")
        return init
    engine_bundle = None
    if models_root is None:
        models_root, engine_bundle = models_root_from_config(config)
    current = Path(models_root) / "current"
    for candidate in (current, engine_bundle):
        if candidate is not None and (Path(candidate) / "bundle.json").is_file():
            resolved = Path(candidate).resolve()
            if not (resolved / "weights").is_dir():
                log.warning("--init current: %s has no weights/ (training checkpoints); "
                            "roles start from the pretrained checkpoint", resolved)
            log.info("--init current: %s", resolved)
            return str(resolved)
    raise AnnotatorError(f"--init current: no bundle in use at {current}" +
                         (f" nor at engine.bundle {engine_bundle}" if engine_bundle else "") +
                         "; give --config, --models-root or a bundle directory")


def _int8_copy_of(path: Path, bundle_id: str) -> Any:
    """The int8 bundle at ``path`` when it is the copy of ``bundle_id`` (a re-run after a kill kept
    that bundle: ``exporter.train.finished_bundle``), so that it is published again, not a new copy."""
    from service.bundle import load_bundle
    from service.errors import AnnotatorError

    try:
        b = load_bundle(path) if (path / "bundle.json").is_file() else None
    except (AnnotatorError, OSError, ValueError):
        return None
    return b if b is not None and b.lineage.get("parent_bundle") == bundle_id else None


def cmd_train(args: argparse.Namespace) -> int:
    """Train (and publish) a bundle; prints its id and where it went."""
    from service.cli import dataset_paths
    from service.errors import AnnotatorError

    from .mix import TrainingMix
    from .train import TrainConfig, train_bundle

    ann, images = dataset_paths(args.dataset, args.images)
    if not images.is_dir():  # else the label sets link to nothing and ultralytics fails on them
        raise AnnotatorError(f"dataset: images folder {images} does not exist; give --images DIR "
                             "(default: images/ beside the json)")
    if args.sign_key is not None and not args.publish:
        raise AnnotatorError("--sign-key: only with --publish REGISTRY")
    init = resolve_init(args.init, args.config, args.models_root)
    publish_to = None
    if args.publish:  # open (and check) the registry before hours of training, not after
        from sync.publish import open_registry

        publish_to = open_registry(args.publish, endpoint_url=args.registry_endpoint)
        try:  # a folder that cannot be written, a missing bucket: said now, not after the training
            publish_to.check()
        except AnnotatorError as exc:
            raise AnnotatorError(f"--publish {args.publish}: {exc}") from exc
    cfg = TrainConfig(annotations=ann, images=images, out=Path(args.out), work=Path(args.work or f"{args.out}.work"),
                      epochs=args.epochs, imgsz=args.imgsz, batch=args.batch, device=args.device, init=init,
                      workers=args.workers, allow_holdout=args.allow_holdout,
                      val_fraction=args.val_fraction, roles=tuple(args.roles.split(",")), seed=args.seed,
                      mix=TrainingMix(reviewed_only=args.reviewed_only, auto_weight=args.auto_weight,
                                      propagated_weight=args.propagated_weight))
    bundle = train_bundle(cfg)
    print(f"bundle {bundle.id} written to {cfg.out}")
    print(f"thresholds: {bundle.thresholds.method}")
    print(f"lineage: dataset {bundle.lineage['dataset']['version']}, parent {bundle.lineage.get('parent_bundle')}")
    published = cfg.out
    if args.int8:
        from .quantize import quantize_bundle

        published = Path(f"{args.out}.int8")
        int8 = _int8_copy_of(published, bundle.id) or quantize_bundle(cfg.out, published, images)
        print(f"int8 bundle {int8.id} written to {published}")
    if publish_to is not None:
        from sync.publish import publish_bundle

        result = publish_bundle(published, publish_to, sign_key=args.sign_key)
        print(f"published {result.bundle_id} to {args.publish}" + (" (signed)" if result.signed else ""))
    return 0
