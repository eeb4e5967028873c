"""Entry point of a SageMaker training job: the same ``train_bundle`` as ``annotator train``.

SageMaker runs the image as ``<entrypoint> train`` (``python -m exporter.sagemaker_entry train``)
with this tree (``/opt/ml``, or ``--ml-root`` / ``$ANNOTATOR_ML_ROOT`` for tests)::

    input/config/hyperparameters.json   {"epochs": "30", ...}: every value is a string
    input/data/training/                the dataset: annotations.json + images/
                                        (``annotator dataset export``; $SM_CHANNEL_TRAINING)
    input/data/init/                    optional: a bundle with weights/ to continue from,
                                        as a folder or a model.tar.gz ($SM_CHANNEL_INIT)
    checkpoints/                        when present (CheckpointConfig): the resumable work folder
    model/                              the bundle is written here ($SM_MODEL_DIR); SageMaker
                                        uploads it as <output path>/<job>/output/model.tar.gz
    output/failure                      on error: one line saying what went wrong

Hyperparameters (strings; JSON-quoted values as the SageMaker Python SDK writes them are
accepted too): ``epochs``, ``imgsz``, ``batch``, ``device``, ``workers``, ``patience``,
``val_fraction``, ``seed``, ``roles`` ("head,pose_main,pose_visible"), ``reviewed_only``
("true"/"false"), ``auto_weight``, ``propagated_weight`` (default 1), ``init`` ("pretrained",
"scratch"; the init channel when present), ``int8`` ("true": the model dir gets the int8 copy
of the trained bundle, ``exporter.quantize``, ranges from the training images). Keys starting with ``sagemaker_`` are the SDK's and
ignored; any other unknown key fails the job (a typo should not silently train with defaults).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

log = logging.getLogger(__name__)

DEFAULT_ROOT = Path("/opt/ml")
_BOOL = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _parse_bool(text: str) -> bool:
    if text.lower() not in _BOOL:
        raise ValueError(f"expected true or false, got {text!r}")
    return _BOOL[text.lower()]


HYPERPARAMETERS: dict[str, Callable[[str], Any]] = {
    "epochs": int, "imgsz": int, "batch": int, "device": str, "workers": int, "patience": int,
    "val_fraction": float, "seed": int, "roles": str, "reviewed_only": _parse_bool, "auto_weight": float,
    "propagated_weight": float, "init": str, "int8": _parse_bool,
}


@dataclass(frozen=True)
class JobPaths:
    """Where this job reads and writes (see the module doc)."""

    hyperparameters: Path
    training: Path
    init: Path | None
    model_dir: Path
    failure: Path
    work: Path

    @classmethod
    def from_env(cls, root: Path, env: Mapping[str, str]) -> JobPaths:
        init = Path(env.get("SM_CHANNEL_INIT") or root / "input" / "data" / "init")
        checkpoints = root / "checkpoints"
        output = Path(env.get("SM_OUTPUT_DIR") or root / "output")
        return cls(hyperparameters=root / "input" / "config" / "hyperparameters.json",
                   training=Path(env.get("SM_CHANNEL_TRAINING") or root / "input" / "data" / "training"),
                   init=init if init.is_dir() else None,
                   model_dir=Path(env.get("SM_MODEL_DIR") or root / "model"),
                   failure=output / "failure",
                   work=checkpoints if checkpoints.is_dir() else Path(tempfile.mkdtemp(prefix="annotator-train-")))


def parse_hyperparameters(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Typed values from SageMaker's string map; ``ValueError`` naming the key when one is bad."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"hyperparameters.json: expected a JSON object of names and values, got {type(raw).__name__}")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key.startswith("sagemaker_") or key.startswith("_"):
            continue
        if key not in HYPERPARAMETERS:
            raise ValueError(f"hyperparameter {key!r}: unknown; known: {', '.join(sorted(HYPERPARAMETERS))}")
        text = str(value)
        try:
            if len(text) >= 2 and text[0] == text[-1] == '"':
                text = json.loads(text)  # the SageMaker Python SDK JSON-encodes every value
            out[key] = HYPERPARAMETERS[key](text)
        except ValueError as exc:
            raise ValueError(f"hyperparameter {key!r}: {exc}") from exc
    return out


def find_bundle(folder: Path, unpack_to: Path) -> Path:
    """A bundle folder in ``folder``: itself, one sub-folder, or inside a model.tar.gz there."""
    for tar in sorted(folder.glob("*.tar.gz")):
        unpack_to.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tar) as t:
            t.extractall(unpack_to, filter="data")
        folder = unpack_to
        break
    for cand in (folder, *sorted(p for p in folder.iterdir() if p.is_dir())):
        if (cand / "bundle.json").is_file():
            return cand
    raise ValueError(f"init channel {folder}: no bundle.json (expected a bundle folder or a model.tar.gz of one)")


def run_job(paths: JobPaths) -> str:
    """Train from the channels into the model dir; returns the bundle id."""
    from .mix import TrainingMix
    from .train import TrainConfig, train_bundle

    raw = json.loads(paths.hyperparameters.read_text()) if paths.hyperparameters.is_file() else {}
    hp = parse_hyperparameters(raw)
    ann = paths.training / "annotations.json"
    if not ann.is_file():
        raise ValueError(f"training channel {paths.training}: no annotations.json (upload `annotator dataset export` output)")
    if not (paths.training / "images").is_dir():
        raise ValueError(f"training channel {paths.training}: no images/ folder beside annotations.json (upload the "
                         "whole `annotator dataset export` output)")
    init = hp.pop("init", None)
    if init is None:
        init = str(find_bundle(paths.init, paths.work / "init")) if paths.init is not None else "pretrained"
    mix = TrainingMix(reviewed_only=hp.pop("reviewed_only", False), auto_weight=hp.pop("auto_weight", 1.0),
                      propagated_weight=hp.pop("propagated_weight", 1.0))
    roles = tuple(str(hp.pop("roles", "head,pose_main,pose_visible")).split(","))
    int8 = hp.pop("int8", False)
    out = paths.work / "bundle"
    cfg = TrainConfig(annotations=ann, images=paths.training / "images", out=out, work=paths.work / "run",
                      init=init, mix=mix, roles=roles, **hp)
    bundle = train_bundle(cfg)
    if int8:
        from .quantize import quantize_bundle

        out = paths.work / "bundle-int8"
        bundle = quantize_bundle(paths.work / "bundle", out, cfg.images)
    paths.model_dir.mkdir(parents=True, exist_ok=True)
    for item in out.iterdir():  # the model dir itself may be a mount point: fill it, never replace it
        dest = paths.model_dir / item.name
        if item.is_dir():
            shutil.copytree(item, dest, dirs_exist_ok=True)
        else:
            shutil.copyfile(item, dest)
    log.info("bundle %s written to %s", bundle.id, paths.model_dir)
    return bundle.id


def write_failure(path: Path, exc: BaseException) -> None:
    """SageMaker shows the first 1024 characters of ``output/failure`` as the FailureReason."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = re.sub(r"\x1b\[[0-9;]*m", "", f"{type(exc).__name__}: {exc}")  # ultralytics' colours
    path.write_text(text[:1024] + "\n", encoding="utf-8")


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] = os.environ) -> int:
    p = argparse.ArgumentParser(prog="python -m exporter.sagemaker_entry")
    p.add_argument("mode", nargs="?", default="train", choices=["train"], help="SageMaker passes 'train'")
    p.add_argument("--ml-root", type=Path, default=Path(env.get("ANNOTATOR_ML_ROOT") or DEFAULT_ROOT))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    paths = JobPaths.from_env(args.ml_root, env)
    try:
        bundle_id = run_job(paths)
    except Exception as exc:  # the job's boundary: every failure becomes output/failure and exit 1
        log.exception("training failed")
        try:
            write_failure(paths.failure, exc)
        except OSError as err:  # the job still fails (exit 1); the log keeps the reason
            log.error("cannot write the failure reason to %s: %s", paths.failure, err)
        return 1
    print(f"bundle {bundle_id} written to {paths.model_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
