"""The validation gate: a candidate bundle must not score worse than the bundle in use on the
locally reviewed hold-out images by more than a margin.

Both bundles run through the daemon's own engine (``exporter.evaluate.predict_dataset``) on
the hold-out images (reviewed images set aside by ``Dataset.is_holdout``), compared on the
key points the dataset and both bundles share (matched by name):

- ``oks_ap50`` (and ``oks_ap``, reported): COCO key-point AP through pycocotools with the
  bundle's OKS sigmas, on the AP view (low detection confidence);
- ``visibility_accuracy``: 3-class accuracy of the visibility states over the reviewed points,
  at the bundle's own thresholds (``exporter.calibrate.collect_visibility_samples``).

With fewer than ``min_images`` hold-out images the gate cannot judge fine differences, but it
still refuses a gross regression: both bundles are scored on the images there are and the
candidate may be worse by a wide margin, ``COARSE_MARGIN / sqrt(images)`` (0.25 on 4 images, 0.11
on 19), no less than ``margin`` nor than ``1.05 / images`` (one image's whole share of a metric:
a single missed person on 1-3 images is not a regression; on one image nothing is refused). Passing on checksums alone, as this did, put a bundle trained a
single epoch (OKS AP50 0.02 against 1.00, visibility 0.18 against 0.91 on the same images) into
service at a box's first retraining, where 4 reviewed hold-out images existed. With none the
gate passes on checksums alone and its reason says so. Without pycocotools (the ``eval`` extra)
AP is left out and the gate says so.

When scoring fails the gate tells whose fault it is. Reading the hold-out images or scoring
the bundle in use (which run first) failing is not the candidate's fault: ``check`` raises
``RetryableError`` and the candidate waits for the next pass, unjudged. The candidate failing
after that, on the same images and engine (onnxruntime cannot load or run it, its outputs do
not fit), is a failed gate whose reason names the exception, so the candidate is refused like
any other. ``OSError`` and ``MemoryError`` stay retryable even from the candidate: a full disk
or a short memory says nothing about the bundle.

Each check evaluates in a temporary ``gate-*`` folder under ``work``; ``tidy`` removes those a
killed process left (the puller calls it before each pass).
"""
from __future__ import annotations

import importlib.util
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from service.bundle import Bundle

from .coco_export import _place, coco_dict, image_extension
from .dataset import Dataset, DatasetEntry
from .errors import RetryableError

log = logging.getLogger(__name__)

METRICS = ("oks_ap50", "visibility_accuracy")
COARSE_MARGIN = 0.5  # fewer hold-out images than min_images: the margin is this / sqrt(images)


@dataclass(frozen=True)
class GateConfig:
    """``margin``: how much lower (absolute, 0..1) a candidate's metric may be; ``min_images``:
    fewest hold-out images for a quality check; ``metrics``: which metrics must hold."""

    margin: float = 0.02
    min_images: int = 20
    metrics: tuple[str, ...] = METRICS

    def __post_init__(self) -> None:
        if not 0.0 <= self.margin <= 1.0:
            raise ValueError(f"gate margin: expected 0..1, got {self.margin}")
        if self.min_images < 1:
            raise ValueError(f"gate min_images: expected >= 1, got {self.min_images}")
        unknown = set(self.metrics) - {"oks_ap", *METRICS}
        if unknown:
            raise ValueError(f"gate metrics: unknown {sorted(unknown)}; expected some of {['oks_ap', *METRICS]}")


@dataclass(frozen=True)
class GateResult:
    """``passed`` and why; ``quality_checked`` is False when only checksums were checked."""

    passed: bool
    reason: str
    quality_checked: bool
    images: int
    current: dict[str, float] = field(default_factory=dict)
    candidate: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "reason": self.reason, "quality_checked": self.quality_checked,
                "images": self.images, "current": self.current, "candidate": self.candidate}


def _restrict(data: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """The COCO dict with person key points cut down to ``names`` (a subset, in that order)."""
    cat = next(c for c in data["categories"] if c.get("keypoints"))
    idx = [list(cat["keypoints"]).index(n) for n in names]
    out = {**data, "categories": [{**c, "keypoints": list(names), "skeleton": []} if c is cat else c
                                  for c in data["categories"]], "annotations": []}
    for a in data["annotations"]:
        if a["category_id"] == cat["id"]:
            k = a["keypoints"]
            kps = [v for i in idx for v in k[3 * i:3 * i + 3]]
            a = {**a, "keypoints": kps, "num_keypoints": sum(1 for f in kps[2::3] if f > 0)}
        out["annotations"].append(a)
    return out


def score_bundle(bundle: Bundle, data: dict[str, Any], images_dir: Path) -> dict[str, float]:
    """Metrics of ``bundle`` on a COCO key-points dict whose key points it all has (by name)."""
    from exporter.calibrate import collect_visibility_samples, person_category
    from exporter.coco_metrics import visibility_report
    from exporter.evaluate import keypoint_mapping, predict_dataset

    cat = person_category(data)
    kpt_map = keypoint_mapping(bundle, cat["keypoints"])
    sigmas = [bundle.keypoints.sigmas[i] for i in kpt_map]
    preds = predict_dataset(bundle, data, images_dir, progress=False, sheet_images=0)
    samples = collect_visibility_samples(preds.operating_view, data, sigmas=sigmas, kpt_map=kpt_map)
    vis = visibility_report(samples, cat["keypoints"])
    out = {"visibility_accuracy": float(vis["accuracy"] or 0.0)}
    if importlib.util.find_spec("pycocotools") is not None:
        from exporter.coco_metrics import keypoint_ap, load_coco

        out.update(keypoint_ap(load_coco(data), preds.ap_view, int(cat["id"]), kpt_map, sigmas))
    return out


def _not_judged(candidate: Bundle, what: str, exc: BaseException) -> RetryableError:
    """The error for a gate that could not judge ``candidate`` through no fault of its own."""
    log.error("validation gate: %s (%s: %s); candidate %s waits for the next pass", what,
              type(exc).__name__, exc, candidate.id)
    return RetryableError(f"validation gate: {what} ({type(exc).__name__}: {exc}); candidate "
                          f"{candidate.id} is not judged and waits for the next pass")


class ValidationGate:
    """Compares a candidate with the bundle in use on the dataset's hold-out images.

    ``image_path(image_id)`` locates an image's bytes (``Store.image_path``); ``work`` is a
    folder for the temporary evaluation set (hard links).
    """

    def __init__(self, dataset: Dataset, image_path: Callable[[str], Path], config: GateConfig,
                 work: Path) -> None:
        self.dataset = dataset
        self.image_path = image_path
        self.config = config
        self.work = Path(work)

    def tidy(self) -> None:
        """Remove the evaluation folders (``gate-*``) that a check killed with its process left in
        ``work``: a kill -9 skips the temporary folder's clean-up, and its images would stay for
        good. Only while no check runs in ``work`` (the puller calls it holding the models root,
        ``sync.models``)."""
        left = sorted(p for p in self.work.glob("gate-*") if p.is_dir() and not p.is_symlink())
        for path in left:
            shutil.rmtree(path, ignore_errors=True)
        if left:
            log.info("removed %d evaluation folders a killed validation gate left under %s", len(left), self.work)

    def _holdout(self) -> list[DatasetEntry]:
        return [e for e in self.dataset.holdout() if self.image_path(e.image_id).is_file()]

    def check(self, current: Bundle | None, candidate: Bundle) -> GateResult:
        """Run both bundles on the hold-out images and compare (see module doc). Raises
        ``RetryableError`` when the hold-out data or the bundle in use cannot be scored."""
        try:
            entries = self._holdout()
        except Exception as exc:  # the dataset's database, the store's files
            raise _not_judged(candidate, "the hold-out images cannot be listed", exc) from exc
        if current is None:
            return GateResult(True, "no bundle in use to compare with: checksums only", False, len(entries))
        if not entries:
            return GateResult(True, "no reviewed hold-out images: checksums only, quality not checked", False, 0)
        margin, few = self.config.margin, len(entries) < self.config.min_images
        if few:  # a gross regression only: the few images' noise is wide
            margin = max(margin, COARSE_MARGIN / math.sqrt(len(entries)), 1.05 / len(entries))
        what = (f"{len(entries)} reviewed hold-out images" + (
            f" (fewer than {self.config.min_images}: a gross regression only, margin {margin:.2f})" if few else ""))
        names = [n for n in self.dataset.schema.names
                 if n in current.keypoints.names and n in candidate.keypoints.names]
        if not names:
            return GateResult(False, "the candidate shares no key point with the dataset and the bundle in use",
                              False, len(entries))
        try:
            self.work.mkdir(parents=True, exist_ok=True)
            tmp = tempfile.TemporaryDirectory(prefix="gate-", dir=self.work)
        except OSError as exc:
            raise _not_judged(candidate, f"no work folder under {self.work}", exc) from exc
        with tmp:
            images = Path(tmp.name)
            try:
                files = {}
                for e in entries:
                    src = self.image_path(e.image_id)
                    with open(src, "rb") as f:
                        files[e.image_id] = e.image_id + image_extension(f.read(16))
                    _place(src, images / files[e.image_id])
                data = _restrict(coco_dict(entries, self.dataset.schema, {"purpose": "gate"}, files), names)
            except Exception as exc:  # files, the dataset's rows
                raise _not_judged(candidate, "the hold-out images cannot be prepared", exc) from exc
            try:
                cur = score_bundle(current, data, images)
            except Exception as exc:  # engine, onnxruntime, metrics: the bundle in use or the data
                raise _not_judged(candidate, f"the bundle in use {current.id} cannot be scored on "
                                             f"{len(entries)} hold-out images", exc) from exc
            try:
                cand = score_bundle(candidate, data, images)
            except (OSError, MemoryError) as exc:
                raise _not_judged(candidate, "scoring it ran out of a resource", exc) from exc
            except Exception as exc:  # onnxruntime raises several unrelated types
                log.error("validation gate: candidate %s cannot be scored: %s: %s", candidate.id,
                          type(exc).__name__, exc)
                return GateResult(False, f"the candidate cannot be scored on {len(entries)} reviewed hold-out "
                                         f"images (the bundle in use {current.id} can): {type(exc).__name__}: {exc}",
                                  True, len(entries), cur)
        metrics = [m for m in self.config.metrics if m in cur and m in cand]
        missing = [m for m in self.config.metrics if m not in metrics]
        worse = [f"{m} {cand[m]:.4f} < {cur[m]:.4f} - margin {margin:.2f}"
                 for m in metrics if cand[m] < cur[m] - margin]
        note = f" ({', '.join(missing)} not measured: pycocotools missing)" if missing else ""
        summary = ", ".join(f"{m} {cand[m]:.4f} vs {cur[m]:.4f}" for m in metrics)
        if worse:
            reason = f"worse than bundle {current.id} on {what}: " + "; ".join(worse) + note
            return GateResult(False, reason, not few, len(entries), cur, cand)
        return GateResult(True, f"not worse than bundle {current.id} on {what}: {summary}{note}", not few,
                          len(entries), cur, cand)
