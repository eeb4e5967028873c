"""``annotator simulate``: the active-learning benchmark of the review loop.

Per seed: a pool of synthetic cabin images with rare sub-populations and a domain shift
(IR 25 %, crowded rear seats 15 %, children, and a new camera position as a 15 % minority) and
one fixed held-out test set from the same mixture (its own seed, shared by all seeds, so every
curve is measured on the same images). The new camera (``--shift-camera``) is by default
``overhead`` (a 12-25 degree roll and a strong keystone), which the first bundle already
half-serves and which turned out not to need picking (README); ``roof``, mounted at a slant in
the roof console, sees the cabin rolled by 30-60 degrees, so people lean across the image,
which the first bundle's pose model barely serves (OKS AP50 0.07 on the test set's roof
images, 0.82 on its source-domain ones, seed 0): a shift that must be reviewed. ``--shift-share
S`` scales the pool's shift (IR share and the new camera's share) by S and leaves the test set alone:
with S = 0.3 the night IR frames and the new camera are rare in what the lab captures (about
a fifth of the pool's scenes) while the test set, what the bundle must serve, keeps the
deployment mixture; the setting in which finding the rare images is the judge's job.

Round 0 (shared by all strategies of a seed, trained once): ``initial`` random images are
reviewed and a bundle is trained from the COCO-pretrained checkpoint. By default
(``initial_domain="source"``) they are drawn from the pool's *source* domain only, daylight RGB
from the usual cameras (no IR, not the new camera): the bundle in service was trained on the
lab's existing data and the appliance now meets night IR and a new camera position, which is the
shift the review loop exists for. The test set is the deployment mixture. ``"pool"`` draws the
initial images from the whole mixture (no shift between the first bundle and the pool; the
setting of the first benchmark runs, kept for comparison). Then per strategy and
round: the previous round's bundle scores the unlabelled pool (cached per bundle), the strategy
picks ``per_round`` images (``exporter.simulate_select``), the oracle reviews them (their
ground-truth labels join the labelled set), a new bundle is trained on all labelled images,
warm-started from the previous round's weights, and evaluated on the test set through the
daemon's engine (head mAP50, OKS AP50, visibility accuracy).

The first bundle starts from the COCO pose checkpoint with its key-point head mapped to the
cabin points (``exporter.cabin_init``): with the head re-initialised, as a plain
"pretrained" start does, no pose model learns anything on this budget (OKS AP50 0.0 after 8
epochs on 40 images; 0.64 with the mapped head, measured).

What a round trains on is the product's merged dataset (``annotator dataset export`` then
``annotator train``): every pool image arrived while the first bundle was in service, which
labelled it, and the sync agent merged those auto labels; a review replaces an image's auto
label with the reviewer's (here the ground truth). So a round trains on the reviewed images plus
the auto labels of all the others, the auto ones at ``auto_weight`` (default 0.25: a seeded
quarter of them: a round trains on 250-270 images instead of 80-120, and a unit takes 165-230 s
on the 2-core box; ``annotator train``'s own default, 1, would train on all 800), and
the validation split that picks checkpoints and calibrates thresholds holds reviewed images only.
A review is then worth what it corrects: a source-domain image the first bundle already labels
well adds little over its auto label, a night IR or new-camera image the first bundle gets wrong
replaces a wrong label. ``auto_weight = 0`` trains on the reviewed images only, the benchmark of
sessions 1-11 (its results in ``docs/simulate/``, folders without ``auto`` in their name).

Warm start, not pretrained-per-round: it is what the product does (``annotator train`` starts
from the current bundle), and it lets every round train only ``epochs`` epochs on the
cumulative set instead of re-learning from COCO weights, which is what fits the CPU budget.
The labelled set is cumulative, so a round never forgets earlier reviews.

Every finished unit (seed, strategy, round) leaves ``state.json`` and is skipped on a re-run;
an interrupted training resumes through ``train_bundle``'s own resumable work folder.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .cabin_init import write_cabin_init
from .simulate_select import (EXTRA_STRATEGIES, NEEDS_FEATURES, NEEDS_NO_SCORES, STRATEGIES, pool_errors, pool_features,
                              pool_predictions, round_rule, score_pool, select)

log = logging.getLogger(__name__)

SOURCE_CAMERAS = (("mirror", 0.45), ("a_pillar", 0.25), ("dashboard", 0.15))  # the first bundle's cameras
SHIFT_CAMERAS = ("overhead", "roof")  # the new camera position of the shift (--shift-camera)
SHIFT_CAMERA_SHARE = 0.15  # its share of the test set (the deployment mixture)
TEST_SEED = 9000
POOL_SEED = 1000
INITIAL_DOMAINS = ("source", "pool")
# Processes rendering the pools (every image is drawn from its own seed, so the count changes
# only the time): every core, at least 2, at most 16.
RENDER_WORKERS = max(2, min(os.cpu_count() or 2, 16))
# How long the pool's capture sequences are: all ``frames`` long, or of uneven length as a lab's
# recordings come (log-uniform from 1 to 4 x frames: a few long recordings hold most frames).
SEQUENCE_LENGTHS = ("fixed", "varied")


@dataclass(frozen=True)
class SimConfig:
    """Benchmark settings; ``quick()`` gives the test-sized variant."""

    out: Path
    seeds: int = 3
    rounds: int = 2
    per_round: int = 40
    initial: int = 40
    pool: int = 800
    test: int = 150
    epochs: int = 3
    initial_epochs: int = 8
    imgsz: int = 256
    batch: int = 8
    lr0: float = 0.0005  # first bundle: AdamW from the mapped COCO start
    finetune_lr0: float = 0.002  # later rounds: SGD from the previous round's weights
    strategies: tuple[str, ...] = STRATEGIES
    audit_fraction: float = 0.1
    ir: float = 0.25
    crowded: float = 0.15
    child: float = 0.3
    initial_domain: str = "source"  # "source": no IR, not the new camera; "pool": the whole mixture
    frames: int = 10  # pool images per capture sequence (1: every pool image its own scene)
    motion: float = 0.1  # how much the occupants move between a sequence's frames (synth.sequence)
    lengths: str = "fixed"  # "fixed": every sequence ``frames`` long; "varied": 1 to 4 x frames (SEQUENCE_LENGTHS)
    repeats: int = 1  # trainings per unit (other training seeds, same picks); the unit's metrics are their mean
    shift_share: float = 1.0  # the pool's share of the shift (IR, new camera) relative to the test set's
    shift_camera: str = "overhead"  # the new camera: "overhead" (rolled 12-25 degrees) or "roof" (30-60 degrees)
    # Weight of the auto labels (the first bundle's records of the pool images nobody reviewed)
    # in each round's training, as ``annotator train --auto-weight``; 0: reviewed images only.
    auto_weight: float = 0.25
    # Share of the pool whose auto labels are merged: the images the first bundle is most sure of
    # (highest ``default_score``, the judge's own score), as CEAL (Wang et al. 2017) pairs
    # uncertainty sampling with confident pseudo-labels. 1: every unreviewed image (the default).
    auto_trusted: float = 1.0
    # A reviewed frame's labels replace the auto labels of the frames of its capture sequence
    # within this many dHash bits (``sync.propagate``, ``annotator dataset export --propagate``);
    # 64: the whole sequence; -1: off (the default).
    propagate: int = -1
    # Weight of the auto images that took a reviewed frame's label by propagation, as
    # ``annotator train --propagated-weight`` (default 1, as a reviewed image); -1: the auto
    # weight (session 27's propagation runs). Only with ``propagate`` >= 0.
    propagated_weight: float = 1.0
    # Where the trainings run (``annotator train --device``: "cpu", "0", "cuda:0") and how many
    # data-loader processes feed them (0: in the training process, right for 2 CPU cores; a GPU
    # needs several to be kept busy). Both can change a training's numbers (other kernels, other
    # augmentation streams), so a run folder keeps them with its other settings.
    device: str = "cpu"
    workers: int = 0
    # ``--settle``: after the last round, every earlier point of every curve (the first bundle
    # included) is trained the rounds it lacks on its own labels, without new reviews, so that
    # every point has had ``rounds`` training rounds and the curves differ by their labels only
    # (``settle_seed``). The curves as the loop trained them are reported as well.
    settle: bool = False

    def __post_init__(self) -> None:
        bad = [s for s in self.strategies if s not in STRATEGIES + EXTRA_STRATEGIES]
        if bad:
            raise ValueError(f"--strategies: unknown {bad}; expected some of {', '.join(STRATEGIES)}")
        if "random" not in self.strategies:
            raise ValueError("--strategies: 'random' is needed, it sets the target of the label saving")
        if min(self.seeds, self.rounds, self.per_round, self.initial, self.test, self.epochs, self.repeats) < 1:
            raise ValueError("seeds, rounds, per-round, initial, test, epochs and repeats must all be >= 1")
        if self.initial + self.rounds * self.per_round > self.pool:
            raise ValueError(f"--pool {self.pool} is too small for --initial {self.initial} + "
                             f"{self.rounds} rounds x {self.per_round}")
        if self.initial_domain not in INITIAL_DOMAINS:
            raise ValueError(f"--initial-domain: expected one of {', '.join(INITIAL_DOMAINS)}, got {self.initial_domain!r}")
        if self.frames < 1:
            raise ValueError(f"--frames: expected >= 1, got {self.frames}")
        if self.lengths not in SEQUENCE_LENGTHS:
            raise ValueError(f"--lengths: expected one of {', '.join(SEQUENCE_LENGTHS)}, got {self.lengths!r}")
        if self.lengths == "varied" and self.frames < 2:
            raise ValueError("--lengths varied needs --frames >= 2 (the mean length of a capture sequence)")
        if not 0.0 < self.shift_share <= 2.0:
            raise ValueError(f"--shift-share: expected 0 < s <= 2, got {self.shift_share}")
        if self.shift_camera not in SHIFT_CAMERAS:
            raise ValueError(f"--shift-camera: expected one of {', '.join(SHIFT_CAMERAS)}, got {self.shift_camera!r}")
        if not 0.0 <= self.auto_weight <= 10.0:
            raise ValueError(f"--auto-weight: expected 0 <= w <= 10, got {self.auto_weight}")
        if not -1 <= self.propagate <= 64:
            raise ValueError(f"--propagate: expected dHash bits 0..64 or -1 (off), got {self.propagate}")
        if not (self.propagated_weight == -1 or 0.0 <= self.propagated_weight <= 10.0):
            raise ValueError(f"--propagated-weight: expected 0 <= w <= 10 or -1 (the auto weight), "
                             f"got {self.propagated_weight}")
        if not 0.0 < self.auto_trusted <= 1.0:
            raise ValueError(f"--auto-trusted: expected 0 < f <= 1, got {self.auto_trusted}")
        if not 0.0 <= self.audit_fraction < 1.0:
            raise ValueError(f"--audit-fraction: expected 0 <= f < 1, got {self.audit_fraction}")
        if self.workers < 0:
            raise ValueError(f"--workers: expected >= 0, got {self.workers}")
        if not self.device.strip():
            raise ValueError("--device: expected 'cpu', a GPU index such as '0', or 'cuda:0'")

    @property
    def units_per_seed(self) -> int:
        """Training units of one seed: the first bundle, then every strategy's rounds (and with
        ``settle`` the extra rounds of the earlier points: ``rounds`` for the first bundle,
        ``rounds - r`` for each strategy's round r)."""
        extra = self.rounds + len(self.strategies) * self.rounds * (self.rounds - 1) // 2 if self.settle else 0
        return 1 + self.rounds * len(self.strategies) + extra

    def quick(self) -> "SimConfig":
        """A smoke-test run of a few minutes: tiny pool, one seed, one round, one epoch, 96 px."""
        return replace(self, seeds=1, rounds=1, per_round=6, initial=10, pool=40, test=8, epochs=1,
                       initial_epochs=1, imgsz=96, batch=8, lr0=0.001, finetune_lr0=0.005,
                       frames=2 if self.frames > 1 else 1)


def prepare_data(cfg: SimConfig) -> tuple[Path, dict[int, Path]]:
    """Render (once) the test set and one pool per seed; returns (test dir, seed -> pool dir)."""
    from .synth import generate
    from .synth.render import Knobs
    from .synth.sequence import varied_lengths

    knobs = Knobs(ir=cfg.ir, crowded=cfg.crowded, child=cfg.child, cameras=pool_cameras(1.0, cfg.shift_camera))
    pool_knobs = replace(knobs, ir=cfg.ir * cfg.shift_share, cameras=pool_cameras(cfg.shift_share, cfg.shift_camera))
    data = cfg.out / "data"

    def make(name: str, count: int, seed: int, frames: int = 1, kn: Knobs = knobs) -> Path:
        d = data / name
        ann = d / "annotations.json"
        if ann.is_file() and len(json.loads(ann.read_text())["images"]) == count:
            return d
        lengths = varied_lengths(count, frames, seed) if frames > 1 and cfg.lengths == "varied" else None
        log.info("rendering %s: %d images (seed %d, %s frames per scene)", name, count, seed,
                 f"1-{max(lengths)}" if lengths else frames)
        return generate(d, count, seed, knobs=kn, workers=RENDER_WORKERS, frames=frames, motion=cfg.motion, lengths=lengths)

    cam = "" if cfg.shift_camera == "overhead" else f"_{cfg.shift_camera}"  # the first runs' folders had overhead
    test = make(f"test_{cfg.test}{cam}", cfg.test, TEST_SEED)  # independent scenes, whatever the pool
    seq = cam + (f"_f{cfg.frames}m{cfg.motion:g}" if cfg.frames > 1 else "")
    seq += "_var" if cfg.lengths == "varied" else ""
    seq += f"_sh{cfg.shift_share:g}" if cfg.shift_share != 1.0 else ""
    pools = {s: make(f"pool_s{s}_{cfg.pool}{seq}", cfg.pool, POOL_SEED + s, cfg.frames, pool_knobs)
             for s in range(cfg.seeds)}
    return test, pools


def pool_cameras(shift_share: float, camera: str = "overhead") -> tuple[tuple[str, float], ...]:
    """The camera mix: ``SOURCE_CAMERAS`` and the new ``camera`` at ``SHIFT_CAMERA_SHARE`` x
    ``shift_share`` (the source cameras keep their proportions)."""
    new = SHIFT_CAMERA_SHARE * shift_share
    rest = sum(w for _, w in SOURCE_CAMERAS)
    return tuple((c, w * (1.0 - new) / rest) for c, w in SOURCE_CAMERAS) + ((camera, new),)


def subset(coco: dict[str, Any], names: set[str]) -> dict[str, Any]:
    """The COCO dict restricted to images with these file names (the oracle's answers)."""
    images = [im for im in coco["images"] if im["file_name"] in names]
    ids = {im["id"] for im in images}
    return {**coco, "images": images, "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]}


def training_set(coco: dict[str, Any], labelled: list[str], auto: dict[str, dict[str, Any]] | None,
                 propagate: int = -1, dhashes: dict[str, int] | None = None) -> dict[str, Any]:
    """The round's merged dataset, as ``annotator dataset export`` writes it: the labelled images
    with their ground truth (origin "reviewed") and, with ``auto`` (file name -> the first
    bundle's record), every other pool image in ``auto`` with its auto label (origin "auto").

    ``propagate`` >= 0 (``annotator dataset export --propagate BITS``, ``sync.propagate``): an
    auto image takes the labels of the reviewed frame of its capture sequence (the pool's scene
    tag: the recording a capture tool names) that ``nearest_source`` picks within that many
    ``dhashes`` bits (file name -> dHash); 64 = every frame of the sequence."""
    from service.outputs import record_annotations
    from sync.propagate import Frame, nearest_source

    reviewed = subset(coco, set(labelled))
    images = [{**im, "origin": "reviewed"} for im in reviewed["images"]]
    annotations = list(reviewed["annotations"])
    if auto:
        done = set(labelled)
        next_id = max((int(a["id"]) for a in coco["annotations"]), default=0) + 1
        by_image: dict[int, list[dict[str, Any]]] = {}
        for a in reviewed["annotations"]:
            by_image.setdefault(int(a["image_id"]), []).append(a)

        def frame(im: dict[str, Any]) -> Frame | None:
            tags = im.get("tags", {})
            if propagate < 0 or "scene" not in tags:
                return None
            return Frame((str(tags.get("camera")), str(tags["scene"])), float(tags.get("frame", 0)),
                         (dhashes or {}).get(im["file_name"]))

        sources: dict[tuple[str, str], list[tuple[dict[str, Any], Frame]]] = {}
        for im in reviewed["images"]:
            if (f := frame(im)) is not None:
                sources.setdefault(f.sequence, []).append((im, f))
        for im in coco["images"]:
            if im["file_name"] in done or im["file_name"] not in auto:
                continue
            f = frame(im)
            near = nearest_source(f, sources.get(f.sequence, ()), propagate, key=lambda k: k["file_name"]) \
                if f is not None else None
            prov: dict[str, Any] = {"origin": "auto"}
            if near is not None:  # the reviewed frame's labels, on this image
                anns = [{**a, "id": next_id + i, "image_id": im["id"]}
                        for i, a in enumerate(by_image.get(int(near[0]["id"]), []))]
                prov = {**prov, "propagated_from": near[0]["file_name"], "propagation_distance": near[1]}
            else:
                anns = record_annotations(auto[im["file_name"]], im["id"], next_id)
            next_id += len(anns)
            images.append({**im, "origin": "auto"})
            annotations += [{**a, "provenance": prov} for a in anns]
    return {**coco, "images": images, "annotations": annotations}


def pool_dhashes(coco: dict[str, Any], images_dir: Path, cache: Path) -> dict[str, int]:
    """File name -> dHash (``sync.propagate.file_dhash``) of every pool image; cached in ``cache``."""
    from service.durable import write_json_atomic
    from sync.propagate import file_dhash

    if cache.is_file():
        return {k: int(v) for k, v in json.loads(cache.read_text()).items()}
    out = {im["file_name"]: file_dhash(images_dir / im["file_name"]) for im in coco["images"]}
    hashes = {k: v for k, v in out.items() if v is not None}
    write_json_atomic(cache, hashes)
    return hashes


def trusted_auto(auto: dict[str, dict[str, Any]], scores: dict[str, Any], share: float) -> dict[str, dict[str, Any]]:
    """The auto labels of the ``share`` of the pool the first bundle is most sure of: highest
    ``default_score`` first, ties by file name (deterministic)."""
    ranked = sorted(auto, key=lambda n: (-scores[n].score, n))
    keep = set(ranked[:int(round(share * len(ranked)))])
    log.info("auto labels: the %d most trusted of %d pool images (default_score >= %.3f)", len(keep), len(ranked),
             min((scores[n].score for n in keep), default=float("nan")))
    return {n: rec for n, rec in auto.items() if n in keep}


def in_source_domain(tags: dict[str, Any]) -> bool:
    """The first bundle's domain under the default shift: daylight RGB from the source cameras."""
    return not tags.get("ir") and tags.get("camera") in dict(SOURCE_CAMERAS)


def initial_picks(cfg: SimConfig, coco: dict[str, Any], seed: int) -> list[str]:
    """The ``initial`` images of round 0: seeded random, from the source domain or the whole pool."""
    infos = coco["images"]
    if cfg.initial_domain == "source":
        infos = [im for im in infos if in_source_domain(im.get("tags", {}))]
    if len(infos) < cfg.initial:
        raise ValueError(f"the pool has only {len(infos)} {cfg.initial_domain}-domain images for --initial {cfg.initial}")
    rng = np.random.default_rng([seed, 0])
    return [infos[i]["file_name"] for i in rng.permutation(len(infos))[:cfg.initial]]


def headline(metrics: dict[str, Any]) -> dict[str, float]:
    """The three accuracies of the benchmark out of ``exporter.evaluate``'s metrics."""
    head = metrics.get("head") or {}
    return {"head_map50": float(head.get("map50") or 0.0),
            "oks_ap50": float(metrics["keypoints"].get("oks_ap50") or 0.0),
            "visibility_acc": float(metrics["visibility"].get("accuracy") or 0.0)}


def composition(coco: dict[str, Any], names: list[str], before: list[str] = ()) -> dict[str, int]:
    """How many of ``names`` belong to each rare sub-population (for the report's 'why'), and
    ``scenes``: how many scenes they add that none of ``before`` (reviewed earlier) shows.
    """
    tags = {im["file_name"]: im.get("tags", {}) for im in coco["images"]}
    picked = [tags[n] for n in names]
    known = {tags[n].get("scene", n) for n in before}
    return {"new_camera": sum(t.get("camera") in SHIFT_CAMERAS for t in picked), "ir": sum(bool(t.get("ir")) for t in picked),
            "crowded": sum(bool(t.get("crowded")) for t in picked),
            "children": sum(int(t.get("children", 0)) > 0 for t in picked),
            "scenes": len({t.get("scene", n) for t, n in zip(picked, names)} - known)}


REPEAT_SEED = 1000  # training seed of repeat k: seed + k * REPEAT_SEED


def train_and_evaluate(cfg: SimConfig, unit: Path, coco: dict[str, Any], labelled: list[str], pool_dir: Path,
                       test_dir: Path, init: str, epochs: int, seed: int, first: bool,
                       auto: dict[str, dict[str, Any]] | None = None
                       ) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Train on the labelled images ``cfg.repeats`` times, evaluate each on the test set.

    Returns the mean of the three accuracies over the trainings and each training's. The first
    training (seed ``seed``) is kept in ``unit/bundle``: the next round scores the pool with it
    and starts from it. Repeat k trains with seed ``seed + k * REPEAT_SEED`` (other weights order
    and validation split, same picks) in ``unit/repeat{k}`` and its bundle is deleted. Every
    training leaves its metrics in ``metrics.json`` beside its bundle, so a resumed unit trains
    only what is missing. Repeats measure the training noise a strategy's gain must stand out of.
    ``first``: the first bundle (from the COCO start) rather than a round continuing a bundle.
    ``auto``: the auto labels of the pool images not in ``labelled`` (``training_set``), trained
    at ``cfg.auto_weight``.
    """
    from service.durable import write_json_atomic

    runs = []
    for k in range(cfg.repeats):
        where = training_dir(unit, k)
        done = where / "metrics.json"
        if not done.is_file():
            m = _train_once(cfg, where, coco, labelled, pool_dir, test_dir, init, epochs, seed + k * REPEAT_SEED, first,
                            auto)
            if k:
                shutil.rmtree(where / "bundle", ignore_errors=True)
            write_json_atomic(done, m)
        runs.append(json.loads(done.read_text()))
    mean = {key: float(np.mean([r[key] for r in runs])) for key in runs[0]}
    return mean, runs


def training_dir(unit: Path, k: int) -> Path:
    """Where training k of a unit lives: the unit itself for the first, ``repeat{k}`` for the others."""
    return unit / f"repeat{k}" if k else unit


def again_unit(start: Path, k: int) -> Path:
    """Unit ``start`` trained k more rounds on its labels: ``round1_again``, ``round1_again2``, ..."""
    return start.with_name(f"{start.name}_again{k if k > 1 else ''}")


def _train_once(cfg: SimConfig, unit: Path, coco: dict[str, Any], labelled: list[str], pool_dir: Path,
                test_dir: Path, init: str, epochs: int, seed: int, first: bool,
                auto: dict[str, dict[str, Any]] | None = None) -> dict[str, float]:
    """One training into ``unit/bundle`` and its evaluation on the test set."""
    from .evaluate import evaluate
    from .mix import TrainingMix
    from .train import FINETUNE_ARGS, TrainConfig, train_bundle

    unit.mkdir(parents=True, exist_ok=True)
    ann = unit / "labelled.json"
    dhashes = pool_dhashes(coco, pool_dir / "images", pool_dir / "dhash.json") if cfg.propagate >= 0 and auto \
        else None
    ann.write_text(json.dumps(training_set(coco, labelled, auto, cfg.propagate, dhashes)))
    # Fine-tuning trained weights for a few dozen iterations, no warm-up: ultralytics' warm-up
    # lasts at least 100 iterations, longer than a whole round, so the rate would never leave
    # the ramp. First bundle: AdamW at a small fixed rate (the "auto" rate, 0.002, wrecks the
    # COCO weights in the first epoch: box mAP50 0.69 -> 0.005, measured). Later rounds: SGD,
    # whose steps shrink with the gradients of an already trained model; AdamW's first steps
    # are about lr0 per weight whatever the gradient and undid the previous round (OKS AP50
    # 0.68 -> 0.07 after a 3-epoch round, vs 0.74 with SGD at 0.002, measured).
    extra: dict[str, Any] = {"plots": False, **({"optimizer": "AdamW", "lr0": cfg.lr0, "warmup_epochs": 0} if first
                                                else {**FINETUNE_ARGS, "lr0": cfg.finetune_lr0})}
    tcfg = TrainConfig(annotations=ann, images=pool_dir / "images", out=unit / "bundle", work=unit / "work",
                       epochs=epochs, imgsz=cfg.imgsz, batch=cfg.batch, init=init, val_fraction=0.1,
                       device=cfg.device, workers=cfg.workers, seed=seed, extra=extra,
                       mix=TrainingMix(auto_weight=cfg.auto_weight,
                                       propagated_weight=None if cfg.propagated_weight < 0 else cfg.propagated_weight))
    train_bundle(tcfg)
    shutil.rmtree(unit / "work", ignore_errors=True)
    metrics = evaluate(unit / "bundle", test_dir / "annotations.json", test_dir / "images", unit / "eval",
                       progress=False)
    return headline(metrics)


def _write_state(unit: Path, state: dict[str, Any]) -> None:
    """The unit's ``state.json``, written atomically: its presence marks the unit finished."""
    from service.durable import write_json_atomic

    write_json_atomic(unit / "state.json", state)


class Progress:
    """Counts finished training units and logs an estimate of the time left."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.ran, self.t0 = total, 0, 0, time.monotonic()

    def step(self, what: str, skipped: bool) -> None:
        self.done += 1
        self.ran += 0 if skipped else 1
        spent = time.monotonic() - self.t0
        eta = spent / self.ran * (self.total - self.done) if self.ran else float("nan")
        log.info("[%d/%d] %s %s (%.0f s so far, about %.0f min left)", self.done, self.total, what,
                 "already done" if skipped else "done", spent, eta / 60)


def run_seed(cfg: SimConfig, seed: int, pool_dir: Path, test_dir: Path, progress: Progress) -> list[dict[str, Any]]:
    """All rounds of all strategies for one seed; returns their states (round 0 included)."""
    from service.bundle import load_bundle

    coco = json.loads((pool_dir / "annotations.json").read_text())
    names = [im["file_name"] for im in coco["images"]]
    root = cfg.out / "runs" / f"seed{seed}"
    init_unit = root / "initial"
    if (init_unit / "state.json").is_file():
        initial_state = json.loads((init_unit / "state.json").read_text())
        progress.step(f"seed {seed} initial", True)
    else:
        picks = initial_picks(cfg, coco, seed)
        t0 = time.monotonic()
        start = write_cabin_init(cfg.out / "init")
        m, each = train_and_evaluate(cfg, init_unit, coco, picks, pool_dir, test_dir, str(start or "pretrained"),
                                     cfg.initial_epochs, seed, first=True)
        initial_state = {"seed": seed, "strategy": "initial", "round": 0, "selected": picks, "labelled": picks,
                         "n_reviewed": 0, "n_labelled": len(picks), "metrics": m, "metrics_each": each,
                         "composition": composition(coco, picks), "seconds": round(time.monotonic() - t0, 1)}
        _write_state(init_unit, initial_state)
        progress.step(f"seed {seed} initial", False)
    states = [initial_state]
    # The product's merged dataset: every pool image arrived while the first bundle was in
    # service, which labelled it; a review replaces that auto label (``training_set``).
    auto = None
    if cfg.auto_weight > 0:
        auto = pool_predictions(init_unit / "bundle", coco, pool_dir / "images", init_unit / "pool_records.json")
        if cfg.auto_trusted < 1.0:
            auto = trusted_auto(auto, score_pool(init_unit / "bundle", coco, pool_dir / "images",
                                                 init_unit / "pool_scores.json"), cfg.auto_trusted)
    prev: dict[str, tuple[Path, list[str]]] = {s: (init_unit, initial_state["labelled"]) for s in cfg.strategies}
    for r in range(1, cfg.rounds + 1):
        for strategy in cfg.strategies:
            unit = root / strategy / f"round{r}"
            prev_unit, labelled = prev[strategy]
            what = f"seed {seed} {strategy} round {r}/{cfg.rounds}"
            if (unit / "state.json").is_file():
                state = json.loads((unit / "state.json").read_text())
                # the reviews really sent (units from before session 34 kept round x --per-round, also
                # for a rule that ran out of candidates: one review per recording once all are taken)
                state["n_reviewed"] = len(state["labelled"]) - len(initial_state["labelled"])
                progress.step(what, True)
            else:
                t0 = time.monotonic()
                candidates = [n for n in names if n not in set(labelled)]
                scores, features = None, None
                rule = round_rule(strategy, r)
                if rule in NEEDS_FEATURES:
                    features = pool_features(coco, pool_dir / "images", root / "pool_features.json")
                if rule not in NEEDS_NO_SCORES:
                    scores = score_pool(prev_unit / "bundle", coco, pool_dir / "images", prev_unit / "pool_scores.json")
                oracle = None
                if strategy == "oracle_error":
                    oracle = pool_errors(prev_unit / "bundle", coco, pool_dir / "images", prev_unit / "pool_errors.json")
                elif strategy in ("oracle_scene", "judge_stream_session"):  # the pool's recordings
                    scene_ids: dict[str, int] = {}
                    oracle = {im["file_name"]: float(scene_ids.setdefault(im.get("tags", {}).get("scene", im["file_name"]),
                                                                          len(scene_ids))) for im in coco["images"]}
                elif strategy == "oracle_shift":
                    oracle = {im["file_name"]: float(not in_source_domain(im.get("tags", {}))) for im in coco["images"]}
                threshold = load_bundle(prev_unit / "bundle", verify=False).judgement.get("score_threshold", 0.5)
                picks = select(rule, candidates, scores, cfg.per_round, np.random.default_rng([seed, r, 7]),
                               seed, cfg.audit_fraction, oracle=oracle, reviewed=labelled, features=features,
                               threshold=threshold)
                log.info("%s: picked %s", what, composition(coco, picks))
                new_labelled = [*labelled, *picks]
                m, each = train_and_evaluate(cfg, unit, coco, new_labelled, pool_dir, test_dir,
                                             str(prev_unit / "bundle"), cfg.epochs, seed, first=False, auto=auto)
                state = {"seed": seed, "strategy": strategy, "round": r, "selected": picks,
                         "labelled": new_labelled, "n_reviewed": len(new_labelled) - len(initial_state["labelled"]),
                         "n_labelled": len(new_labelled),
                         "metrics": m, "metrics_each": each, "composition": composition(coco, picks, labelled),
                         "pick_scores": [scores[p].score for p in picks] if scores else None,
                         "seconds": round(time.monotonic() - t0, 1)}
                _write_state(unit, state)
                progress.step(what, False)
            log.info("%s: %s", what, {k: round(v, 4) for k, v in state["metrics"].items()})
            states.append(state)
            prev[strategy] = (unit, state["labelled"])
    if cfg.settle:
        states += settle_seed(cfg, root, coco, pool_dir, test_dir, auto, states, progress)
    return states


def settle_seed(cfg: SimConfig, root: Path, coco: dict[str, Any], pool_dir: Path, test_dir: Path,
                auto: dict[str, dict[str, Any]] | None, states: list[dict[str, Any]],
                progress: Progress) -> list[dict[str, Any]]:
    """``--settle``: each point before the last round trained the rounds it lacks; their states.

    A point after round r (the first bundle: r = 0) has had r training rounds and the last
    round's points ``cfg.rounds``: read off the curves as they are, a strategy's 40 reviews are
    compared with random's 80 after one round fewer, and a round without new reviews is worth
    about what random's next 40 reviews are (session 31, with propagated labels: +0.009 to
    +0.011). Here unit ``round{r}`` is trained ``cfg.rounds - r`` more rounds of ``cfg.epochs``,
    warm-started as the loop trains, on its own labelled images (the first bundle on the initial
    set), into ``round{r}_again``, ``round{r}_again2``, ... (the names
    ``docs/simulate/roof-auto/extra_round.py`` gave such units, which are reused). Returns one
    state per point, marked ``settled``, with the last training's metrics; ``settled.json`` in the
    last unit marks it finished.
    """
    from service.durable import write_json_atomic

    out = []
    for state in states:
        r, strategy = state["round"], state["strategy"]
        if r >= cfg.rounds:
            continue
        start = root / "initial" if strategy == "initial" else root / strategy / f"round{r}"
        last = again_unit(start, cfg.rounds - r)
        what = f"seed {state['seed']} {strategy} round {r} settled ({cfg.rounds - r} more rounds)"
        if (last / "settled.json").is_file():
            out.append(json.loads((last / "settled.json").read_text()))
            for _ in range(cfg.rounds - r):
                progress.step(what, True)
            continue
        t0, prev = time.monotonic(), start
        for k in range(1, cfg.rounds - r + 1):
            unit = again_unit(start, k)
            skipped = all((training_dir(unit, i) / "metrics.json").is_file() for i in range(cfg.repeats))
            m, each = train_and_evaluate(cfg, unit, coco, state["labelled"], pool_dir, test_dir, str(prev / "bundle"),
                                         cfg.epochs, state["seed"], first=False, auto=auto)
            progress.step(f"{what}: {unit.name}", skipped)
            prev = unit
        settled = {**{k: state[k] for k in ("seed", "strategy", "round", "selected", "labelled", "n_reviewed",
                                             "n_labelled", "composition")},
                   "metrics": m, "metrics_each": each, "settled": True, "trained_rounds": cfg.rounds,
                   "seconds": round(time.monotonic() - t0, 1)}
        write_json_atomic(last / "settled.json", settled)
        log.info("%s: %s", what, {k: round(v, 4) for k, v in m.items()})
        out.append(settled)
    return out


def exit_with_parent(parent: int, interval: float = 1.0) -> None:
    """Start a daemon thread that ends this process as soon as process ``parent`` is gone.

    A ``--jobs`` worker trains for many minutes; when the ``annotator simulate`` process that
    started it dies (``kill PID``, ``kill -9``, a closed ssh session: anything but a Ctrl-C that
    reaches the whole process group) nobody would read its results, yet it would train on and
    hold the CPU. Checked every ``interval`` seconds by the parent pid changing (the orphan is
    re-parented); the unit in progress is left unfinished (no ``state.json``) and a resumed run
    trains it again, its finished trainings (``metrics.json``) kept.
    """
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        log.warning("the simulate process %d is gone; this worker stops", parent)
        logging.shutdown()
        os._exit(3)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _seed_job(cfg: SimConfig, seed: int, pool_dir: Path, test_dir: Path, level: int,
              parent: int | None = None) -> list[dict[str, Any]]:
    """One seed in its own process (``run(jobs=...)``): the parent's log level, its own counter;
    it stops when ``parent`` (the simulate process) is gone."""
    if parent is not None:
        exit_with_parent(parent)
    logging.basicConfig(level=level, format=f"%(asctime)s %(levelname)s seed{seed} %(name)s: %(message)s")
    return run_seed(cfg, seed, pool_dir, test_dir, Progress(cfg.units_per_seed))


def cpu_jobs_warning(device: str, jobs: int, cores: int | None = None) -> str | None:
    """What to tell a user who trains ``jobs`` seeds at once on the CPU, or None where it is fine.

    Every CPU training takes all the cores it may use (``exporter.train.training_threads``), so
    ``jobs`` trainings at once ask for ``jobs`` x cores threads. Measured on the 2-core box
    (session 31, ``--propagate 64 --propagated-weight 1``): three round-1 units side by side
    (``--jobs 3``) took 4009-4239 s each, 71 minutes for the three; one at a time a 3-epoch
    training round took 244-249 s (``random``'s units, which score no pool, 195-232 s), about 13
    minutes for three: ``--jobs 3`` was about 5x slower. Trainings on a GPU are not warned about.
    """
    from .train import training_threads

    if device != "cpu" or jobs < 2:
        return None
    cores = cores or training_threads()
    return (f"--jobs {jobs} on the CPU: each training uses all {cores} cores, so {jobs} at once "
            f"oversubscribe them (measured on 2 cores: --jobs 3 about 5x slower than --jobs 1); "
            f"use --jobs 1 unless the trainings run on a GPU (--device 0)")


def run(cfg: SimConfig, jobs: int = 1) -> dict[str, Any]:
    """The whole benchmark; writes results.{json,md} and accuracy.png into ``cfg.out``.

    ``jobs`` > 1 runs that many seeds at once, each in its own process (a GPU box trains several
    small models side by side; the seeds share nothing but the rendered test set and the mapped
    COCO start, both made before). The units and their numbers are those of a sequential run:
    every unit reads only its own seed's folder, so a run can be resumed with any ``jobs``.
    """
    from .simulate_report import write_results

    if jobs < 1:
        raise ValueError(f"--jobs: expected >= 1, got {jobs}")
    cfg.out.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    saved = cfg.out / "config.json"
    if saved.is_file():  # finished units are reused: they must come from the same settings
        # runs from before --repeats trained once; before --shift-share the pool had the test set's mix
        # and before --auto-weight every round trained on the reviewed images only
        old = {"propagate": -1, "propagated_weight": -1.0, "repeats": 1, "shift_share": 1.0, "shift_camera": "overhead", "auto_weight": 0.0, "auto_trusted": 1.0,
               "lengths": "fixed", "device": "cpu", "workers": 0,
               **json.loads(saved.read_text())}
        moot = ("propagated_weight",) if max(int(old["propagate"]), cfg.propagate) < 0 else ()  # no propagation
        differ = [k for k in settings if k not in ("out", "seeds", "rounds", "strategies", "settle", *moot)
                  and json.dumps(old.get(k)) != json.dumps(settings[k])]
        if differ:
            raise ValueError(f"{cfg.out} holds a run with other settings ({', '.join(differ)}); "
                             f"use another --out or delete it")
    saved.write_text(json.dumps(settings, indent=1))
    t0 = time.monotonic()
    test_dir, pools = prepare_data(cfg)
    states: list[dict[str, Any]] = []
    if jobs > 1 and cfg.seeds > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        write_cabin_init(cfg.out / "init")  # the seeds' shared start, written once before they run
        log.info("%d seeds, %d at a time (one process each)", cfg.seeds, min(jobs, cfg.seeds))
        if (warning := cpu_jobs_warning(cfg.device, min(jobs, cfg.seeds))) is not None:
            log.warning("%s", warning)
        # spawn: torch and onnxruntime threads do not survive a fork
        with ProcessPoolExecutor(min(jobs, cfg.seeds), mp_context=multiprocessing.get_context("spawn")) as ex:
            level = logging.getLogger().getEffectiveLevel()
            futures = [ex.submit(_seed_job, cfg, seed, pools[seed], test_dir, level, os.getpid())
                       for seed in range(cfg.seeds)]
            for f in futures:
                states += f.result()
    else:
        progress = Progress(cfg.seeds * cfg.units_per_seed)
        for seed in range(cfg.seeds):
            states += run_seed(cfg, seed, pools[seed], test_dir, progress)
    return write_results(cfg, states, time.monotonic() - t0)


def cmd_simulate(args: argparse.Namespace) -> int:
    """``annotator simulate``: run (or resume) the benchmark and print its table."""
    from .simulate_report import print_table

    cfg = SimConfig(out=Path(args.out), seeds=args.seeds, rounds=args.rounds, per_round=args.per_round,
                    initial=args.initial, pool=args.pool, test=args.test, epochs=args.epochs,
                    initial_epochs=args.initial_epochs, imgsz=args.imgsz, audit_fraction=args.audit_fraction,
                    initial_domain=args.initial_domain, frames=args.frames, motion=args.motion, lengths=args.lengths,
                    repeats=args.repeats,
                    shift_share=args.shift_share, shift_camera=args.shift_camera, auto_weight=args.auto_weight,
                    auto_trusted=args.auto_trusted, propagate=args.propagate,
                    propagated_weight=args.propagated_weight, device=args.device, workers=args.workers,
                    settle=args.settle, strategies=tuple(s.strip() for s in args.strategies.split(",") if s.strip()))
    if args.quick:
        cfg = cfg.quick()
    results = run(cfg, jobs=args.jobs)
    print_table(results)
    print(f"results: {cfg.out / 'results.md'}, {cfg.out / 'results.json'}, {cfg.out / 'accuracy.png'}")
    return 0


def register(sub: Any) -> None:
    """Add ``simulate`` to the ``annotator`` subparsers."""
    d = SimConfig(out=Path("."))
    s = sub.add_parser("simulate", help="active-learning benchmark: judge vs uncertainty vs random selection")
    s.add_argument("--out", default="simulate-out", help="working and results folder; re-run to resume")
    s.add_argument("--seeds", type=int, default=d.seeds)
    s.add_argument("--rounds", type=int, default=d.rounds, help="selection rounds after the initial one")
    s.add_argument("--per-round", type=int, default=d.per_round, help="images reviewed per round")
    s.add_argument("--initial", type=int, default=d.initial, help="random images reviewed for the first bundle")
    s.add_argument("--pool", type=int, default=d.pool, help="unlabelled pool size per seed")
    s.add_argument("--test", type=int, default=d.test, help="held-out test images")
    s.add_argument("--epochs", type=int, default=d.epochs, help="epochs per round (warm start)")
    s.add_argument("--initial-epochs", type=int, default=d.initial_epochs, help="epochs of the first bundle")
    s.add_argument("--imgsz", type=int, default=d.imgsz)
    s.add_argument("--audit-fraction", type=float, default=d.audit_fraction,
                   help="share of each round judge_audit gives to seeded random audit picks")
    s.add_argument("--initial-domain", choices=INITIAL_DOMAINS, default=d.initial_domain,
                   help="where the first bundle's images come from: 'source' (no IR, not the new camera: the "
                        "shift the loop must find) or 'pool' (the whole mixture, no shift)")
    s.add_argument("--frames", type=int, default=d.frames,
                   help="pool images per capture sequence (frames of one scene, the occupants moving a little); "
                        "1 = every pool image its own scene")
    s.add_argument("--motion", type=float, default=d.motion,
                   help="how much the occupants move between a sequence's frames (share of each parameter's spread)")
    s.add_argument("--lengths", choices=SEQUENCE_LENGTHS, default=d.lengths,
                   help="capture sequence lengths: all --frames long (fixed) or uneven as recordings come "
                        "(varied: 1 to 4 x --frames, a few long recordings holding most frames)")
    s.add_argument("--repeats", type=int, default=d.repeats,
                   help="trainings per unit with other training seeds on the same picks; the mean is reported "
                        "(measures and averages out the training noise; costs that many times the CPU)")
    s.add_argument("--shift-share", type=float, default=d.shift_share,
                   help="the pool's share of the shift (IR, the new camera) relative to the test set's: 1 = the "
                        "same mixture; 0.3 = the shift is rare in what the lab captures but the test set (what the "
                        "bundle must serve) still has the deployment share")
    s.add_argument("--shift-camera", choices=SHIFT_CAMERAS, default=d.shift_camera,
                   help="the new camera position of the shift (15 %% of the test set): 'roof' (at a slant in the "
                        "roof console, the cabin rolled 30-60 degrees: the first bundle barely finds a pose there) or "
                        "'overhead' (rolled 12-25 degrees with a strong keystone; the first benchmark runs' camera, "
                        "which the first bundle already half-serves)")
    s.add_argument("--auto-weight", type=float, default=d.auto_weight,
                   help="weight of the auto labels in each round's training (the first bundle's labels of every pool "
                        "image nobody reviewed, as in the product's merged dataset; `annotator train --auto-weight`): "
                        "0 = the reviewed images only (the benchmark before session 12); 1 = annotator train's "
                        "default (every pool image trains: about 3x the training time of the default)")
    s.add_argument("--auto-trusted", type=float, default=d.auto_trusted,
                   help="share of the pool whose auto labels are merged: the images the first bundle is most sure "
                        "of (highest default_score); the judge reviews the doubtful ones, the confident ones train "
                        "as auto labels (CEAL). 1 = every unreviewed image")
    s.add_argument("--propagate", type=int, default=d.propagate, metavar="BITS",
                   help="a reviewed frame's labels replace the auto labels of the frames of its capture sequence "
                        "within BITS dHash bits (`annotator dataset export --propagate`); 64 = the whole "
                        "sequence, -1 = off")
    s.add_argument("--propagated-weight", type=float, default=d.propagated_weight, metavar="W",
                   help="with --propagate: the training weight of the auto images that took a reviewed frame's "
                        "label (`annotator train --propagated-weight`, default 1: as a reviewed image); -1 = the "
                        "auto weight")
    s.add_argument("--strategies", default=",".join(STRATEGIES))
    s.add_argument("--device", default=d.device,
                   help="where the trainings run, as `annotator train --device`: 'cpu' or a GPU ('0', 'cuda:0'); "
                        "pool scoring and evaluation use the engine's providers (CUDA when onnxruntime-gpu has it)")
    s.add_argument("--workers", type=int, default=d.workers,
                   help="data-loader processes per training (0: in the training process, right on a few CPU "
                        "cores; 4-8 keep a GPU busy)")
    s.add_argument("--jobs", type=int, default=1,
                   help="seeds run at once, one process each (a GPU box: 3; CPU trainings: 1, each takes every core "
                        "and 3 at once on 2 cores ran about 5x slower); same numbers")
    s.add_argument("--settle", action="store_true",
                   help="also train every earlier point of the curves (the first bundle included) the rounds it "
                        "lacks, without new reviews, and report the label saving at equal training: read as they "
                        "are, a strategy's 40 reviews have had one round fewer than random's 80 (costs, with 2 "
                        "rounds, 2 units a seed and 1 a strategy and seed)")
    s.add_argument("--quick", action="store_true", help="a few-minute smoke run (tiny pool, 1 round, 1 epoch, 96 px)")
    s.set_defaults(func=cmd_simulate)
