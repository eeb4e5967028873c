"""The training mix of a merged dataset: human-reviewed vs auto-accepted images, and their weights.

``annotator dataset export`` writes COCO whose images carry ``origin`` ("reviewed" or "auto")
and whose annotations carry ``provenance.origin`` ("human" or "auto"). A plain COCO dataset
(e.g. ``annotator synth``) has neither; its images count as human-labelled.

ultralytics has no per-sample loss weight, so a weight ``w >= 0`` per image is realised by
**deterministic stochastic rounding of a repeat count**: the image enters the training split
``floor(w)`` times, plus once more when ``u(image) < w - floor(w)``, where ``u`` is a number in
[0, 1) read from ``sha256(seed:image key)``. The expected count is exactly ``w``, so the
expected training loss (a sum over training copies) equals the loss with per-image weights
``w``; the draw is reproducible (the same dataset and seed give the same split) and stable
under adding images (an image's draw depends only on its own key). Reviewed images have weight
1; auto-accepted images ``auto_weight`` (``reviewed_only`` is ``auto_weight = 0``), except those
that took a reviewed frame's label at export (``--propagate``; provenance ``propagated_from``):
``propagated_weight``, default 1. A weight in
(0, 1) keeps a fraction of the auto images; a weight above 1 repeats them.

Only the training split is weighted: the validation split (used to calibrate the thresholds)
is drawn from the distinct images first, so no copy of a validation image is trained on; nor is
an auto image that took a validation image's label (``propagation_sources``): it would be that
image's label on a near-identical frame, so ``derive_label_sets`` gives it repeat count 0 (it
neither trains nor validates).
"""
from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping

log = logging.getLogger(__name__)

REVIEWED, AUTO = "reviewed", "auto"


@dataclass(frozen=True)
class TrainingMix:
    """Which labels train and how much each counts. ``auto_weight`` in [0, 10]."""

    reviewed_only: bool = False
    auto_weight: float = 1.0
    # auto images that took a reviewed frame's label (``sync.propagate``): 96 % of their visibility
    # classes are right against 57-64 % of the bundle's auto labels, so by default they count as
    # much as a reviewed image (never in the validation split); None: as the other auto images
    propagated_weight: float | None = 1.0

    def __post_init__(self) -> None:
        weights = {"auto_weight": self.auto_weight}
        if self.propagated_weight is not None:  # None: as the auto weight
            weights["propagated_weight"] = self.propagated_weight
        for name, w in weights.items():
            if not (isinstance(w, (int, float)) and 0.0 <= w <= 10.0) or math.isnan(w):
                raise ValueError(f"{name}: expected a number in [0, 10], got {w!r}")

    @property
    def effective_auto_weight(self) -> float:
        return 0.0 if self.reviewed_only else float(self.auto_weight)

    @property
    def effective_propagated_weight(self) -> float:
        if self.reviewed_only:
            return 0.0
        return self.effective_auto_weight if self.propagated_weight is None else float(self.propagated_weight)

    def weight(self, origin: str, propagated: bool = False) -> float:
        if origin == REVIEWED:
            return 1.0
        return self.effective_propagated_weight if propagated else self.effective_auto_weight


def image_origins(coco: Mapping[str, Any]) -> dict[int, str]:
    """COCO image id -> "reviewed" | "auto" (image ``origin``, else its annotations' provenance,
    else "reviewed": a dataset without provenance is taken as human-labelled)."""
    from_anns: dict[int, str] = {}
    for a in coco.get("annotations", []):
        prov = a.get("provenance") or {}
        if prov.get("origin") == "auto":
            from_anns.setdefault(a["image_id"], AUTO)
        elif prov.get("origin") == "human":
            from_anns[a["image_id"]] = REVIEWED
    out = {}
    for im in coco.get("images", []):
        origin = im.get("origin") or from_anns.get(im["id"], REVIEWED)
        if origin not in (REVIEWED, AUTO):
            raise ValueError(f"image {im['id']}: origin {origin!r}; expected 'reviewed' or 'auto'")
        out[int(im["id"])] = origin
    return out


def propagated_images(coco: Mapping[str, Any]) -> set[int]:
    """COCO image ids of auto images whose label a reviewed frame gave them (``sync.propagate``:
    their annotations' provenance names ``propagated_from``)."""
    return {int(a["image_id"]) for a in coco.get("annotations", [])
            if "propagated_from" in (a.get("provenance") or {})}


def propagation_sources(coco: Mapping[str, Any]) -> dict[int, set[int]]:
    """COCO image id of an auto image that took a reviewed frame's label -> the COCO ids of
    that frame (``propagated_from`` names it by its sha256 in an appliance export, by its file
    name in the benchmark's sets; an unknown name is left out). The validation split is drawn
    per reviewed image, so its propagated copies must follow it out of training."""
    by_name = {str(im["file_name"]): int(im["id"]) for im in coco.get("images", []) if im.get("file_name")}
    by_key = {**by_name, **{str(im["sha256"]): int(im["id"]) for im in coco.get("images", []) if im.get("sha256")}}
    origins = image_origins(coco)
    out: dict[int, set[int]] = {}
    for a in coco.get("annotations", []):
        src = (a.get("provenance") or {}).get("propagated_from")
        iid = int(a["image_id"])
        if src is None or origins.get(iid) != AUTO or str(src) not in by_key:
            continue
        out.setdefault(iid, set()).add(by_key[str(src)])
    return out


def unit_draw(key: str, seed: int = 0) -> float:
    """A number in [0, 1) from ``sha256(f"{seed}:{key}")`` (deterministic, per image)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def repeat_count(weight: float, key: str, seed: int = 0) -> int:
    """``floor(weight)`` plus one with probability ``frac(weight)`` (see the module doc)."""
    whole = math.floor(weight)
    return int(whole + (1 if unit_draw(key, seed) < weight - whole else 0))


def image_key(image: Mapping[str, Any]) -> str:
    """A stable key of an image: its sha256 when exported by the appliance, else its file name."""
    return str(image.get("sha256") or image.get("file_name") or image["id"])


def training_repeats(coco: Mapping[str, Any], mix: TrainingMix, seed: int = 0) -> tuple[dict[int, int], dict[str, Any]]:
    """Repeat count per COCO image id (0: left out of training) and a summary for the lineage."""
    origins = image_origins(coco)
    propagated = propagated_images(coco)
    repeats: dict[int, int] = {}
    for im in coco.get("images", []):
        iid = int(im["id"])
        repeats[iid] = repeat_count(mix.weight(origins[iid], iid in propagated), image_key(im), seed)
    counts = {o: sum(1 for v in origins.values() if v == o) for o in (REVIEWED, AUTO)}
    copies = {o: sum(repeats[i] for i, v in origins.items() if v == o) for o in (REVIEWED, AUTO)}
    summary = {
        "reviewed_only": mix.reviewed_only, "auto_weight": mix.effective_auto_weight,
        "images": {"reviewed": counts[REVIEWED], "auto": counts[AUTO]},
        "training_copies_before_split": {"reviewed": copies[REVIEWED], "auto": copies[AUTO]},
        "method": "per-image weight (reviewed 1, auto auto_weight, propagated propagated_weight) realised as a "
                  "repeat count in the training split by deterministic stochastic rounding: "
                  "floor(w) + [sha256(seed:image) < frac(w)]",
    }
    auto_prop = [i for i in propagated if origins.get(i) == AUTO]
    if auto_prop:
        summary["propagated_weight"] = mix.effective_propagated_weight
        summary["images"]["propagated"] = len(auto_prop)
        summary["training_copies_before_split"]["propagated"] = sum(repeats[i] for i in auto_prop)
    log.info("training mix: %d reviewed, %d auto images; auto weight %.3g -> %d auto training copies%s",
             counts[REVIEWED], counts[AUTO], mix.effective_auto_weight, copies[AUTO],
             f" ({summary['training_copies_before_split']['propagated']} of {summary['images']['propagated']} "
             f"propagated images at weight {mix.effective_propagated_weight:.3g})" if "propagated_weight" in summary
             else "")
    return repeats, summary


def dataset_version_of(coco: Mapping[str, Any], file_hash: str) -> str:
    """The export's ``info.dataset_version`` when present (the dataset's own version), else ``file_hash``."""
    info = coco.get("info") or {}
    version = info.get("dataset_version") if isinstance(info, dict) else None
    return str(version) if version else file_hash
