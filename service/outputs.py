"""Outputs: a JSON sidecar per image, COCO key-point and YOLO pose/head exports from the store.

Coordinates everywhere are pixels of the original image after EXIF orientation, except YOLO
labels, which are normalised to [0, 1] by the image width/height. Visibility flags follow
COCO: visible = 2, occluded = 1, outside = 0, and an ``outside`` point is written as 0, 0, 0
(the record keeps the model's location estimate; exports claim no location for it).

The stored record (``ImageRow.record``) is ``Prediction.to_json()`` plus, from the daemon,
``keypoint_names`` (the bundle's names, in order). Where the names are missing they are guessed
from the point count (COCO-17, cabin-19, else ``kp0``, ``kp1``, ...).

The record stays the model's output after a review: merging a review writes the reviewed label
to the dataset only (``sync.merge``), and moves the image to ``reviewed``. So the exports take an
image's labels from ``ReviewedLabels`` (the dataset's reviewed labels) when it has one there,
with provenance "human"; every other image, ``reviewed`` ones included, is the model's output
with provenance "auto". This module does not open the dataset (``sync`` is above ``service``);
``annotator export`` (``service.cli_daemon``) hands it in.
"""
from __future__ import annotations

import ctypes
import datetime as _dt
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from .durable import fsync_dir, make_dirs, write_json_atomic
from .keypoints import CABIN19, COCO17, FLAG_VISIBILITY, VISIBILITY_FLAG, KeypointSchema
from .store import REVIEWED, ImageRow, Store

log = logging.getLogger(__name__)

EXPORT_STATES = ("auto_accepted", "review_pending", "uploaded", "reviewed")
PERSON_CATEGORY, HEAD_CATEGORY = 1, 2
_MAGIC = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG\r\n\x1a\n", ".png"), (b"BM", ".bmp"),
          (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"), (b"RIFF", ".webp"))


def _iso(t: float | None) -> str | None:
    return None if t is None else _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat().replace("+00:00", "Z")


def sidecar_record(row: ImageRow) -> dict[str, Any]:
    """The annotation record of a stored image, as written to its sidecar.

    Keys: image_id, source, camera, width, height, state, keypoint_names, heads (box xyxy,
    conf), persons (box, conf, visible_match_conf, keypoints with x, y, main_conf,
    visible_conf, visibility), judgement (score, reasons, decision, audit), bundle_id, error,
    received_at / updated_at (ISO 8601 UTC).
    """
    rec = row.record or {}
    return {
        "image_id": row.image_id, "source": row.source, "camera": row.camera,
        "width": row.width or rec.get("width"), "height": row.height or rec.get("height"), "state": row.state,
        "keypoint_names": rec.get("keypoint_names"), "heads": rec.get("heads", []), "persons": rec.get("persons", []),
        "judgement": {"score": row.score, "reasons": list(row.reasons), "decision": row.decision, "audit": row.audit},
        "bundle_id": row.bundle_id, "error": row.error,
        "received_at": _iso(row.received_at), "updated_at": _iso(row.updated_at),
    }


def write_sidecar(out_dir: Path, row_or_record: ImageRow | Mapping[str, Any]) -> Path:
    """Write ``<out_dir>/<image_id>.json`` atomically (tmp file, fsync, rename); returns the path.

    Accepts a store row (converted with ``sidecar_record``) or a ready record dict with an
    ``image_id``. A reader never sees a half-written sidecar; a failed write leaves the old one.
    """
    record = sidecar_record(row_or_record) if isinstance(row_or_record, ImageRow) else dict(row_or_record)
    image_id = str(record.get("image_id") or "")
    if not image_id or Path(image_id).name != image_id or image_id.startswith("."):
        raise ValueError(f"write_sidecar: the record needs a plain image_id, got {image_id!r}")
    path = Path(out_dir) / f"{image_id}.json"
    write_json_atomic(path, record)
    return path


def write_sidecars(out_dir: Path, records: Sequence[Mapping[str, Any]]) -> list[Path]:
    """Write one ``<out_dir>/<image_id>.json`` per record with group durability; returns the paths.

    Each record goes to its own temporary file, which is fsynced and renamed into place; the
    folder is fsynced once for the whole batch at the end (one directory sync instead of one
    per file). A reader never sees a half-written sidecar, and when this returns every sidecar
    survives a power loss. A failure removes the batch's temporary files; sidecars already
    renamed stay (they are complete).
    """
    out_dir = Path(out_dir)
    make_dirs(out_dir)  # durably: the sidecars' folder itself must survive a power cut
    paths: list[Path] = []
    for record in records:
        image_id = str(record.get("image_id") or "")
        if not image_id or Path(image_id).name != image_id or image_id.startswith("."):
            raise ValueError(f"write_sidecars: each record needs a plain image_id, got {image_id!r}")
        path = out_dir / f"{image_id}.json"
        write_json_atomic(path, dict(record))
        paths.append(path)
    if paths:
        fsync_dir(out_dir)
    return paths


def schema_for(record: Mapping[str, Any]) -> KeypointSchema:
    """The key-point schema of a record: its ``keypoint_names`` or a guess from the point count."""
    names = record.get("keypoint_names")
    if names:
        return KeypointSchema.for_names(tuple(names))
    persons = record.get("persons") or []
    k = len(persons[0]["keypoints"]) if persons else 0
    for schema in (COCO17, CABIN19):
        if schema.count == k:
            return schema
    return KeypointSchema.for_names(tuple(f"kp{i}" for i in range(k)))


def image_suffix(data: bytes) -> str:
    """File suffix from the image's magic bytes (".bin" when unknown)."""
    for magic, suffix in _MAGIC:
        if data.startswith(magic):
            return suffix
    return ".bin"


def _place(src: Path, dst: Path, link: bool) -> None:
    """Hard-link (cheap, same file system) or copy ``src`` to ``dst``; leaves an existing ``dst``
    of ``src``'s size. One of another size is replaced: a copy (an export to another disk) a
    power cut emptied stayed empty under its name through every later export. The caller makes
    the copies durable at once (``_sync_files``)."""
    try:
        if dst.stat().st_size == src.stat().st_size:
            return
        dst.unlink()
    except FileNotFoundError:
        pass
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:  # another file system, or links not allowed: copy instead
            pass
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _sync_files(folder: Path) -> None:
    """Make every file and name written under ``folder`` durable with one ``syncfs`` of its file
    system (``os.sync`` where the C library has none). An fsync per file cost 5 ms each on a
    virtual disk (a 1,000-image YOLO export, 2,000 labels: 5.4-9.4 s -> 16-20 s); one
    ``syncfs`` after the writes costs what writing back the new files costs."""
    syncfs = getattr(ctypes.CDLL(None, use_errno=True), "syncfs", None)
    if syncfs is None:
        os.sync()
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        if syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs: {os.strerror(err)}", str(folder))
    finally:
        os.close(fd)


def iter_rows(store: Store, states: Sequence[str] = EXPORT_STATES, page: int = 500) -> Iterator[ImageRow]:
    """Every annotated row in ``states``, oldest first (by arrival), each once.

    Several states are read in one pass over the arrival order, not state after state: while
    the daemon and the sync agent run, an image moves on (review_pending -> uploaded ->
    reviewed) between the pages, and a pass per state met it twice (once in each state) or,
    moved back, not at all. One pass meets every row once, at its place in the arrival order,
    so export ids stay put when images arrive or change state between two exports."""
    wanted = set(states)
    single = next(iter(wanted)) if len(wanted) == 1 else None
    cursor: str | None = None
    while True:
        rows, cursor = store.list(state=single, limit=page, after=cursor)
        yield from (r for r in rows if r.record is not None and r.state in wanted)
        if cursor is None:
            break


def _with_bytes(rows: Iterator[ImageRow], pruned: list[int]) -> Iterator[ImageRow]:
    """The rows whose bytes the store still has; ``pruned[0]`` counts the others (their bytes
    went by ``[retention] auto_image_days``: an export of images without pixels trains nothing)."""
    for row in rows:
        if row.pruned_at is None:
            yield row
        else:
            pruned[0] += 1


def _warn_pruned(n: int) -> None:
    if n:
        log.warning("%d auto-accepted images left out: retention removed their bytes ([retention] auto_image_days)", n)


def _flat_keypoints(person: Mapping[str, Any]) -> list[float]:
    out: list[float] = []
    for kp in person["keypoints"]:
        v = VISIBILITY_FLAG[kp["visibility"]]
        out += [round(float(kp["x"]), 2), round(float(kp["y"]), 2), v] if v else [0, 0, 0]
    return out


def _xywh(box: Sequence[float]) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)]


@dataclass(frozen=True)
class ReviewedLabels:
    """Reviewed labels by image id, in the dataset's canonical form (``sync.dataset``):
    ``{"width", "height", "heads": [[x1, y1, x2, y2]], "persons": [{"box", "keypoints": [[x, y,
    flag]]}]}``, key points in ``names`` order, flags 2/1/0, outside points at 0, 0. ``get``
    returns None for an image without a reviewed label (an auto-accepted one, or none)."""

    names: tuple[str, ...]
    get: Callable[[str], Mapping[str, Any] | None]


def reviewed_record(label: Mapping[str, Any], names: Sequence[str], target: Sequence[str]) -> dict[str, Any]:
    """A canonical reviewed label as a record (heads, persons with visibility names, ``conf``
    1.0), its key points mapped by name to ``target``; target points the label lacks are
    outside (as ``sync.merge`` maps a review into the dataset)."""
    persons = []
    for p in label.get("persons", []):
        by_name = dict(zip(names, p["keypoints"]))
        points = [by_name.get(n, (0.0, 0.0, 0)) for n in target]
        persons.append({"box": list(p["box"]), "conf": 1.0, "keypoints": [
            {"x": float(x), "y": float(y), "visibility": FLAG_VISIBILITY[int(f)]} for x, y, f in points]})
    return {"width": label.get("width"), "height": label.get("height"), "keypoint_names": list(target),
            "heads": [{"box": list(h), "conf": 1.0} for h in label.get("heads", [])], "persons": persons}


def _in_schema(rec: Mapping[str, Any], schema: KeypointSchema | None) -> dict[str, Any]:
    """A model's record with its key points mapped by name to ``schema`` (the export's, taken from
    its first record): a store that holds records of two bundles with different key points (a
    COCO-17 bundle, then a cabin-19 one) would otherwise write rows of two lengths under one
    category, which COCO readers misread and ultralytics refuses. Points the record lacks are
    outside."""
    if schema is None or not rec.get("persons") or schema_for(rec).names == schema.names:
        return dict(rec)
    own = schema_for(rec).names
    outside = {"x": 0.0, "y": 0.0, "visibility": "outside"}
    persons = [{**p, "keypoints": [dict(zip(own, p["keypoints"])).get(n, outside) for n in schema.names]}
               for p in rec["persons"]]
    return {**rec, "persons": persons, "keypoint_names": list(schema.names)}


def _labels_of(row: ImageRow, schema: KeypointSchema | None,
               reviewed: ReviewedLabels | None) -> tuple[dict[str, Any], KeypointSchema | None, str]:
    """(the record to export, the export's schema so far, provenance) of one row: the reviewer's
    label when ``reviewed`` has one, else the model's record ("auto", whatever the row's state)."""
    rec = row.record or {}
    schema = schema or (schema_for(rec) if rec.get("persons") or rec.get("keypoint_names") else None)
    label = reviewed.get(row.image_id) if reviewed is not None else None
    if reviewed is None or label is None:
        return _in_schema(rec, schema), schema, "auto"
    if schema is None and label.get("persons"):
        schema = KeypointSchema.for_names(reviewed.names)
    out = reviewed_record(label, reviewed.names, schema.names if schema is not None else ())
    out["width"], out["height"] = out["width"] or rec.get("width"), out["height"] or rec.get("height")
    return out, schema, "human"


def _warn_unreviewed(count: int, reviewed: ReviewedLabels | None) -> None:
    if count:
        log.warning("%d reviewed images exported with the model's labels (provenance \"auto\"): %s", count,
                    "the dataset has no reviewed label for them" if reviewed is not None else
                    "their reviewed labels are in the dataset, which this export did not read "
                    "(annotator export --dataset-root, or annotator dataset export)")


def record_annotations(rec: Mapping[str, Any], image_id: int, first_id: int = 1) -> list[dict[str, Any]]:
    """A record's persons (category ``PERSON_CATEGORY``, key points with COCO flags, outside
    points as 0, 0, 0) and heads (``HEAD_CATEGORY``) as COCO annotations of image ``image_id``,
    numbered from ``first_id``; each carries the model's ``score``."""
    out: list[dict[str, Any]] = []
    for p in rec.get("persons", []):
        kps = _flat_keypoints(p)
        bbox = _xywh(p["box"])
        out.append({"id": first_id + len(out), "image_id": image_id, "category_id": PERSON_CATEGORY,
                    "bbox": bbox, "area": round(bbox[2] * bbox[3], 2), "iscrowd": 0,
                    "keypoints": kps, "num_keypoints": sum(1 for v in kps[2::3] if v),
                    "score": float(p.get("conf", 1.0))})
    for h in rec.get("heads", []):
        bbox = _xywh(h["box"])
        out.append({"id": first_id + len(out), "image_id": image_id, "category_id": HEAD_CATEGORY,
                    "bbox": bbox, "area": round(bbox[2] * bbox[3], 2), "iscrowd": 0,
                    "score": float(h.get("conf", 1.0))})
    return out


def export_coco(store: Store, out_path: Path, states: Sequence[str] = EXPORT_STATES, link: bool = True,
                reviewed: ReviewedLabels | None = None) -> Path:
    """Write a COCO key-points dataset to ``out_path`` and the images to ``out_path.parent/images``.

    Image ids are 1.. in arrival order (``iter_rows``): a later export of a store that got more
    images or moved some along keeps the ids of the images that arrived before the new ones (an
    image pruned, or annotated after later ones, shifts the ids after it). Categories: 1
    "person" (key-point names and 1-based skeleton of the records' schema), 2
    "head" (boxes only). Each image entry also carries ``sha256``, ``state``, ``bundle_id`` and
    ``provenance``: "human" for an image written with its label from ``reviewed``, else "auto"
    (the model's output; a ``reviewed`` image too when ``reviewed`` lacks it). Persons carry
    ``score`` (the model's; 1.0 for a reviewer's).
    """
    out_path = Path(out_path)
    image_dir = out_path.parent / "images"
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    schema: KeypointSchema | None = None
    unreviewed = 0
    rows = _with_bytes(iter_rows(store, states), pruned := [0])
    for n, row in enumerate(rows, start=1):
        rec, schema, provenance = _labels_of(row, schema, reviewed)
        unreviewed += row.state == REVIEWED and provenance != "human"
        src = store.image_path(row.image_id)
        with open(src, "rb") as f:
            name = row.image_id + image_suffix(f.read(16))
        _place(src, image_dir / name, link)
        images.append({"id": n, "file_name": name, "width": row.width or rec["width"],
                       "height": row.height or rec["height"], "sha256": row.image_id, "state": row.state,
                       "bundle_id": row.bundle_id, "provenance": provenance})
        annotations += record_annotations(rec, n, len(annotations) + 1)
    schema = schema or COCO17
    categories = [
        {"id": PERSON_CATEGORY, "name": "person", "supercategory": "person", "keypoints": list(schema.names),
         "skeleton": [[a + 1, b + 1] for a, b in schema.skeleton]},
        {"id": HEAD_CATEGORY, "name": "head", "supercategory": "person"},
    ]
    info = {"description": "edge-annotator export", "date_created": _iso(store.clock()), "states": list(states)}
    if image_dir.is_dir():
        _sync_files(image_dir)  # the copies and their names on disk before the file that lists them
    write_json_atomic(out_path, {"info": info, "images": images, "annotations": annotations, "categories": categories},
                      sync_dir=True)
    _warn_unreviewed(unreviewed, reviewed)
    _warn_pruned(pruned[0])
    log.info("COCO export: %d images, %d annotations -> %s", len(images), len(annotations), out_path)
    return out_path


def _yolo_box(box: Sequence[float], w: int, h: int) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return [(x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h]


def _write_text(path: Path, text: str) -> None:
    """Replace ``path`` by a rename (a reader never sees half a file); durable only once the
    export's ``_sync_files`` ran."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def export_yolo(store: Store, out_dir: Path, states: Sequence[str] = EXPORT_STATES, link: bool = True,
                reviewed: ReviewedLabels | None = None) -> Path:
    """Write two YOLO datasets under ``out_dir``: ``pose/`` (person, key points) and ``head/``.

    Each has ``images/``, ``labels/`` (one ``<image_id>.txt`` per image, values normalised to
    [0, 1]) and ``data.yaml`` (written as JSON, which YAML parsers read; no ``path``, so
    ultralytics takes the folder of ``data.yaml`` and the export trains where it is copied, not
    only at this machine's absolute path). Pose lines:
    ``0 cx cy w h`` then ``x y v`` per point, v = 2/1/0, outside as ``0 0 0``; head lines:
    ``0 cx cy w h``. An image with a label in ``reviewed`` gets that label, every other one the
    model's output (as ``export_coco``).
    """
    out_dir = Path(out_dir)
    schema: KeypointSchema | None = None
    count = unreviewed = 0
    for task in ("pose", "head"):
        make_dirs(out_dir / task / "labels")
        # data.yaml, written last, says the folder is complete: a power cut during an export
        # over an earlier one left its data.yaml beside label files the cut emptied.
        if (out_dir / task / "data.yaml").exists():
            (out_dir / task / "data.yaml").unlink()
            fsync_dir(out_dir / task)
    for row in _with_bytes(iter_rows(store, states), pruned := [0]):
        rec, schema, provenance = _labels_of(row, schema, reviewed)
        unreviewed += row.state == REVIEWED and provenance != "human"
        w, h = int(row.width or rec["width"]), int(row.height or rec["height"])
        src = store.image_path(row.image_id)
        with open(src, "rb") as f:
            name = row.image_id + image_suffix(f.read(16))
        pose_lines = []
        for p in rec.get("persons", []):
            values = _yolo_box(p["box"], w, h)
            for kp in p["keypoints"]:
                v = VISIBILITY_FLAG[kp["visibility"]]
                values += [float(kp["x"]) / w, float(kp["y"]) / h, v] if v else [0.0, 0.0, 0]
            pose_lines.append("0 " + " ".join(f"{x:.6f}" if isinstance(x, float) else str(x) for x in values))
        head_lines = ["0 " + " ".join(f"{x:.6f}" for x in _yolo_box(hd["box"], w, h)) for hd in rec.get("heads", [])]
        for task, lines in (("pose", pose_lines), ("head", head_lines)):
            _place(src, out_dir / task / "images" / name, link)
            _write_text(out_dir / task / "labels" / f"{row.image_id}.txt", "".join(line + "\n" for line in lines))
        count += 1
    # On disk before data.yaml: a power cut kept unsynced labels' names but not their bytes,
    # and an empty label file reads as an image with no one in it.
    _sync_files(out_dir)
    schema = schema or COCO17
    write_json_atomic(out_dir / "pose" / "data.yaml", {
        "train": "images", "val": "images", "names": {"0": "person"},
        "kpt_shape": [schema.count, 3], "flip_idx": schema.flip_idx, "kpt_names": {"0": list(schema.names)}},
        sync_dir=True)
    write_json_atomic(out_dir / "head" / "data.yaml", {
        "train": "images", "val": "images", "names": {"0": "head"}}, sync_dir=True)
    _warn_unreviewed(unreviewed, reviewed)
    _warn_pruned(pruned[0])
    log.info("YOLO export: %d images -> %s", count, out_dir)
    return out_dir


@dataclass(frozen=True)
class LabelledPerson:
    """A person read back from an export: box xyxy and (x, y, flag) per point, in pixels."""

    box: tuple[float, float, float, float]
    keypoints: tuple[tuple[float, float, int], ...]

    def visibilities(self) -> tuple[str, ...]:
        return tuple(FLAG_VISIBILITY[v] for _, _, v in self.keypoints)


def import_coco(path: Path) -> dict[str, tuple[list[LabelledPerson], list[tuple[float, ...]]]]:
    """Read an ``export_coco`` file: image sha256 -> (persons, head boxes xyxy)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    by_id = {im["id"]: im.get("sha256") or Path(im["file_name"]).stem for im in data["images"]}
    out: dict[str, tuple[list[LabelledPerson], list[tuple[float, ...]]]] = {k: ([], []) for k in by_id.values()}
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        box = (x, y, x + w, y + h)
        persons, heads = out[by_id[a["image_id"]]]
        if a["category_id"] == HEAD_CATEGORY:
            heads.append(box)
        else:
            k = a["keypoints"]
            persons.append(LabelledPerson(box, tuple((k[i], k[i + 1], int(k[i + 2])) for i in range(0, len(k), 3))))
    return out


def read_yolo(label_path: Path, width: int, height: int) -> list[LabelledPerson]:
    """Read a YOLO pose (or detection) label file back into pixels of a ``width`` x ``height`` image."""
    people = []
    for line in Path(label_path).read_text(encoding="utf-8").splitlines():
        v = [float(t) for t in line.split()[1:]]
        cx, cy, w, h = v[0] * width, v[1] * height, v[2] * width, v[3] * height
        kps = tuple((v[i] * width, v[i + 1] * height, int(v[i + 2])) for i in range(4, len(v), 3))
        people.append(LabelledPerson((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), kps))
    return people
