"""Assemble a model bundle (``service.bundle``) from checkpoints or ONNX files.

``build_bundle`` exports .pt checkpoints (ultralytics), copies .onnx files, reads each model's
class names, key-point shape and input size from ultralytics' ONNX ``metadata_props``, writes
``bundle.json`` through ``service.bundle.write_bundle`` (which computes the checksums) and
reloads the result with ``service.bundle.load_bundle`` to prove that it verifies.
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

from service.bundle import Bundle, ModelEntry, Thresholds, load_bundle, new_bundle_id, write_bundle
from service.errors import BundleError
from service.keypoints import CABIN19, COCO17, KeypointSchema

from .onnx_export import export_onnx, read_onnx_metadata

log = logging.getLogger(__name__)

DEFAULT_JUDGEMENT = {"score_threshold": 0.5, "audit_fraction": 0.02}


def _schema_for(kpt_count: int, names: Sequence[str] | None) -> KeypointSchema:
    if names is not None:
        if len(names) != kpt_count:
            raise BundleError(f"keypoint_names: {len(names)} names given but the pose models have {kpt_count} points")
        return KeypointSchema.for_names(tuple(names))
    if kpt_count == 17:
        return COCO17
    if kpt_count == 19:
        return CABIN19
    raise BundleError(f"pose models have {kpt_count} key points; pass keypoint_names (only 17 and 19 are known)")


def _to_onnx(source: Path, out_dir: Path, role: str, imgsz: int, dynamic_batch: bool) -> Path:
    """Place the model for ``role`` as ``out_dir/<role>.onnx`` (export .pt, copy .onnx)."""
    target = out_dir / f"{role}.onnx"
    source = Path(source)
    if not source.is_file():
        raise BundleError(f"{role}: model file {source} does not exist")
    if source.suffix == ".pt":
        return export_onnx(source, target, imgsz, dynamic_batch=dynamic_batch)
    if source.suffix == ".onnx":
        if source.resolve() != target.resolve():
            tmp = target.with_name(f".{target.name}.tmp")
            shutil.copyfile(source, tmp)
            os.replace(tmp, target)
        return target
    raise BundleError(f"{role}: expected a .pt or .onnx file, got {source.name}")


def _entry(role: str, path: Path, imgsz: int) -> ModelEntry:
    """A ``ModelEntry`` from the ONNX file's ultralytics metadata (checksum filled in later)."""
    meta = read_onnx_metadata(path)
    task = meta.get("task")
    if task not in ("detect", "pose"):
        raise BundleError(f"{role}: {path.name} has task {task!r} in its metadata; expected 'detect' or 'pose'")
    names_meta = meta.get("names", {0: "object"})
    names = tuple(names_meta[k] for k in sorted(names_meta)) if isinstance(names_meta, dict) else tuple(names_meta)
    size = meta.get("imgsz", [imgsz, imgsz])
    size = (int(size[0]), int(size[1])) if isinstance(size, (list, tuple)) else (int(size), int(size))
    kpt = meta.get("kpt_shape")
    if task == "pose" and not kpt:
        raise BundleError(f"{role}: pose model {path.name} has no kpt_shape in its metadata")
    return ModelEntry(role=role, file=path.name, sha256="", imgsz=size, task=task, names=names,
                      kpt_shape=(int(kpt[0]), int(kpt[1])) if task == "pose" else None)


def build_bundle(
    out_dir: Path,
    head: Path | None,
    pose_main: Path | None,
    pose_visible: Path | None,
    imgsz: int,
    keypoint_names: list[str] | None = None,
    thresholds: Mapping[str, Any] | None = None,
    head_from_face: bool = False,
    metrics: Mapping[str, Any] | None = None,
    lineage: Mapping[str, Any] | None = None,
    judgement: Mapping[str, Any] | None = None,
    dynamic_batch: bool = True,
) -> Bundle:
    """Build, write and verify a bundle in ``out_dir``; returns the reloaded ``Bundle``.

    ``head``/``pose_main``/``pose_visible``: .pt checkpoints (exported at ``imgsz``) or .onnx
    files (copied; their own input size is used), any may be None but not all. ``thresholds``
    uses the ``bundle.json`` keys (det_conf, person_conf, nms_iou, match_iou, main, visible,
    method); missing keys take the contract's defaults. Without ``pose_visible`` the bundle's
    ``visibility_mode`` is "main_only" (no point is ever called occluded) and ``lineage.notes``
    says so. The key-point schema is COCO-17 for 17 points, cabin-19 for 19, or built from
    ``keypoint_names``.
    """
    out_dir = Path(out_dir)
    sources = {"head": head, "pose_main": pose_main, "pose_visible": pose_visible}
    if all(v is None for v in sources.values()):
        raise BundleError("build_bundle: give at least one model (head, pose_main or pose_visible)")
    if pose_visible is not None and pose_main is None:
        raise BundleError("build_bundle: a pose_visible model needs a pose_main model")
    out_dir.mkdir(parents=True, exist_ok=True)
    models: dict[str, ModelEntry] = {}
    for role, src in sources.items():
        if src is not None:
            models[role] = _entry(role, _to_onnx(Path(src), out_dir, role, imgsz, dynamic_batch), imgsz)
    pose_counts = {m.kpt_shape[0] for m in models.values() if m.kpt_shape}
    if len(pose_counts) > 1:
        raise BundleError(f"pose models disagree on the number of key points: {sorted(pose_counts)}")
    schema = _schema_for(pose_counts.pop(), keypoint_names) if pose_counts else (
        KeypointSchema.for_names(tuple(keypoint_names)) if keypoint_names else CABIN19)
    mode = "two_model" if "pose_visible" in models else "main_only"
    lineage_out = dict(lineage or {})
    if mode == "main_only" and "pose_main" in models:
        notes = list(lineage_out.get("notes", []))
        notes.append("no visible-only pose model: visibility_mode main_only, points are visible or outside, "
                     "never occluded")
        lineage_out["notes"] = notes
    lineage_out.setdefault("sources", {r: str(s) for r, s in sources.items() if s is not None})
    thr = Thresholds.from_json(dict(thresholds or {}), schema.count)
    if not thr.method:
        thr = Thresholds(**{**thr.__dict__, "method": "defaults (not calibrated)"})
    bundle = Bundle(
        path=out_dir, id=new_bundle_id(str(out_dir)),
        created=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        models=models, keypoints=schema, thresholds=thr, visibility_mode=mode,
        head_from_face=bool(head_from_face and "head" not in models),
        judgement=dict(judgement or DEFAULT_JUDGEMENT), metrics=dict(metrics or {}), lineage=lineage_out,
    )
    write_bundle(bundle)
    loaded = load_bundle(out_dir)
    log.info("bundle %s written to %s (models %s, %s)", loaded.id, out_dir, sorted(models), mode)
    return loaded
