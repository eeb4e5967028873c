"""The model bundle contract: ``bundle.json`` plus the ONNX files it names.

A bundle is a directory::

    bundle.json        the manifest (schema below, ``FORMAT`` = 1)
    head.onnx          head-box detector (optional)
    pose_main.onnx     pose model trained on visible + occluded points (optional)
    pose_visible.onnx  pose model trained on visible points only (optional)

``bundle.json``::

    {"format": 1, "id": "20261124T233000-1a2b3c4d", "created": "2026-11-24T23:30:00Z",
     "models": {"head": {"file": "head.onnx", "sha256": "...", "imgsz": [320, 320],
                         "task": "detect", "names": ["head"]},
                "pose_main": {..., "task": "pose", "names": ["person"], "kpt_shape": [19, 3]},
                "pose_visible": {...}},
     "keypoints": {"names": [...], "flip_idx": [...], "skeleton": [[0, 1], ...], "sigmas": [...]},
     "thresholds": {"det_conf": 0.25, "person_conf": 0.25, "nms_iou": 0.7, "match_iou": 0.5,
                    "main": 0.6 | [per key point], "visible": 0.6 | [per key point],
                    "method": "how they were chosen"},
     "visibility_mode": "two_model" | "main_only",
     "confidence_calibration": {...} (optional; ``service.confcal``),
     "head_from_face": false,
     "judgement": {"score_threshold": 0.5, "audit_fraction": 0.02},
     "metrics": {...}, "lineage": {...},
     "appearance": {...} (optional; ``service.novelty``: what the training images looked like)}

Loading verifies every checksum and that each ONNX file's inputs and outputs have the layout
that its entry declares; a bundle that fails is refused with ``BundleError`` naming the problem.
"""
from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .confcal import ConfidenceCalibration
from .durable import write_json_atomic  # also importable from here, as before
from .errors import BundleError
from .keypoints import KeypointSchema
from .novelty import AppearanceProfile

FORMAT = 1
MODEL_ROLES = ("head", "pose_main", "pose_visible")
VISIBILITY_MODES = ("two_model", "main_only")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def new_bundle_id(seed_text: str = "") -> str:
    """Time plus a short hash: sortable, unique, e.g. ``20261124T233000-1a2b3c4d``."""
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    tail = hashlib.sha256((seed_text + secrets.token_hex(8)).encode()).hexdigest()[:8]
    return f"{now}-{tail}"


MAX_ID_LENGTH = 200  # characters, as before the byte bound
# Bytes of UTF-8: a file system's name holds 255, and the longest name made from an id,
# ``<id>.reason.txt`` under refused/, adds 11 (".<id>.replaced" 10, ".<id>.partial" 9). Not 200
# bytes: a 70-character CJK id (210 bytes) installed by an earlier release must still load.
MAX_ID_BYTES = 244
PLAIN_NAME_RULE = (f"1 to {MAX_ID_LENGTH} characters and at most {MAX_ID_BYTES} bytes of UTF-8, no '/', '\\' or "
                   "control characters, not starting with '.'")


def plain_name_problem(text: str) -> str | None:
    """None when ``text`` can name a file or folder in every place a bundle goes, else why not.

    The one rule for bundle ids (``check_bundle_id``) and the file names a bundle lists (its
    models, ``lineage.weights``), which the registry, the pull and the publication apply too:
    they each had their own. What it keeps out: '/' and '\\' (a folder part, which a bucket
    key refuses: ``sync.objectstore.check_key``), '.', '..' and hidden names (the pull clears
    ``.<id>.partial`` as left-overs; a folder store takes ``.*.tmp`` for a write a kill cut
    short and removes it), control characters, and more than ``MAX_ID_BYTES`` bytes: a
    100-character CJK id (300 bytes) was published to a bucket and then stopped every pull
    with ENAMETOOLONG on ``staging/.<id>.partial``, refusing nothing (no ``refused/<id>.reason.txt``
    fits either); text that is not UTF-8 (a lone surrogate from a JSON escape) is no key."""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return "not valid UTF-8"
    if not text or len(text) > MAX_ID_LENGTH or size > MAX_ID_BYTES:
        return f"{len(text)} characters, {size} bytes of UTF-8"
    if text.startswith("."):
        return "starts with '.'"
    if "/" in text or "\\" in text:
        return "has a '/' or '\\'"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        return "has a control character"
    return None


def check_plain_name(value: Any, what: str, where: Any, kind: str = "file") -> str:
    """``value`` as text when ``plain_name_problem`` finds nothing, else ``BundleError``
    (one message for every place: ``where``, ``what`` and the rule)."""
    text = str(value)
    problem = plain_name_problem(text)
    if problem is not None:
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:80] + "..."
        raise BundleError(f"{where}: {what} {shown} is not a plain {kind} name ({problem}; expected "
                          f"{PLAIN_NAME_RULE})")
    return text


def check_bundle_id(value: Any, where: Any = "bundle.json") -> str:
    """``value`` when it can be a bundle id, else ``BundleError``. The id names folders
    (``staging/<id>``, ``bundles/<id>``, ``refused/<id>.reason.txt``) and registry keys: an id
    ``../../data`` made ``annotator models adopt`` remove and replace a folder outside the models
    root, a hidden name (``.x.partial``) is what the pull clears as left-overs
    (``plain_name_problem``: the rule)."""
    return check_plain_name(value, "bundle id", where, kind="folder")


def _per_point(value: Any, count: int, key: str) -> tuple[float, ...]:
    if isinstance(value, (int, float)):
        return tuple([float(value)] * count)
    if isinstance(value, (list, tuple)) and len(value) == count:
        return tuple(float(v) for v in value)
    raise BundleError(f"thresholds.{key}: expected a number or a list of {count} numbers, got {value!r}")


@dataclass(frozen=True)
class ModelEntry:
    """One ONNX model of a bundle. ``imgsz`` is (height, width) of the network input."""

    role: str
    file: str
    sha256: str
    imgsz: tuple[int, int]
    task: str  # "detect" | "pose"
    names: tuple[str, ...]
    kpt_shape: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.role not in MODEL_ROLES:
            raise BundleError(f"models: unknown role {self.role!r}; expected one of {MODEL_ROLES}")
        if self.task not in ("detect", "pose"):
            raise BundleError(f"models.{self.role}.task: expected 'detect' or 'pose', got {self.task!r}")
        if self.task == "pose" and self.kpt_shape is None:
            raise BundleError(f"models.{self.role}: a pose model needs kpt_shape")
        if self.kpt_shape is not None and len(self.kpt_shape) != 2:
            raise BundleError(f"models.{self.role}.kpt_shape: expected [points, values per point], got "
                              f"{list(self.kpt_shape)}")
        check_plain_name(self.file, "file name", f"models.{self.role}.file")

    @property
    def output_channels(self) -> int:
        """Rows of the raw ultralytics output: 4 box + classes (+ 3 per key point)."""
        n = 4 + len(self.names)
        if self.kpt_shape is not None:
            n += self.kpt_shape[0] * self.kpt_shape[1]
        return n

    def to_json(self) -> dict:
        d: dict[str, Any] = {
            "file": self.file, "sha256": self.sha256, "imgsz": list(self.imgsz),
            "task": self.task, "names": list(self.names),
        }
        if self.kpt_shape is not None:
            d["kpt_shape"] = list(self.kpt_shape)
        return d

    @classmethod
    def from_json(cls, role: str, d: Mapping[str, Any]) -> "ModelEntry":
        try:
            imgsz = d["imgsz"]
            if isinstance(imgsz, int):
                imgsz = [imgsz, imgsz]
            return cls(
                role=role, file=str(d["file"]), sha256=str(d["sha256"]),
                imgsz=(int(imgsz[0]), int(imgsz[1])), task=str(d["task"]),
                names=tuple(d["names"]),
                kpt_shape=tuple(d["kpt_shape"]) if d.get("kpt_shape") else None,  # type: ignore[arg-type]
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise BundleError(f"models.{role}: malformed entry ({exc!r}); got {dict(d)!r}") from exc


@dataclass(frozen=True)
class Thresholds:
    """Decision thresholds. ``main``/``visible`` hold one value per key point."""

    det_conf: float
    person_conf: float
    nms_iou: float
    match_iou: float
    main: tuple[float, ...]
    visible: tuple[float, ...]
    method: str = ""

    def to_json(self) -> dict:
        def compact(v: tuple[float, ...]) -> float | list[float]:
            return v[0] if len(set(v)) == 1 else [round(x, 4) for x in v]

        return {
            "det_conf": self.det_conf, "person_conf": self.person_conf, "nms_iou": self.nms_iou,
            "match_iou": self.match_iou, "main": compact(self.main), "visible": compact(self.visible),
            "method": self.method,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any], kpt_count: int) -> "Thresholds":
        return cls(
            det_conf=float(d.get("det_conf", 0.25)),
            person_conf=float(d.get("person_conf", d.get("det_conf", 0.25))),
            nms_iou=float(d.get("nms_iou", 0.7)),
            match_iou=float(d.get("match_iou", 0.5)),
            main=_per_point(d.get("main", 0.6), kpt_count, "main"),
            visible=_per_point(d.get("visible", 0.6), kpt_count, "visible"),
            method=str(d.get("method", "")),
        )


@dataclass(frozen=True)
class Bundle:
    """A loaded, verified bundle. ``path`` is its directory."""

    path: Path
    id: str
    created: str
    models: Mapping[str, ModelEntry]
    keypoints: KeypointSchema
    thresholds: Thresholds
    visibility_mode: str = "two_model"
    head_from_face: bool = False
    judgement: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    lineage: Mapping[str, Any] = field(default_factory=dict)
    confidence_calibration: ConfidenceCalibration | None = None
    appearance: AppearanceProfile | None = None  # what the training images looked like (service.novelty)

    def model_path(self, role: str) -> Path:
        return self.path / self.models[role].file

    def to_json(self) -> dict:
        return {
            "format": FORMAT, "id": self.id, "created": self.created,
            "models": {r: m.to_json() for r, m in self.models.items()},
            "keypoints": self.keypoints.to_json(),
            "thresholds": self.thresholds.to_json(),
            "visibility_mode": self.visibility_mode,
            **({"confidence_calibration": self.confidence_calibration.to_json()}
               if self.confidence_calibration is not None else {}),
            "head_from_face": self.head_from_face,
            "judgement": dict(self.judgement),
            "metrics": dict(self.metrics),
            "lineage": dict(self.lineage),
            **({"appearance": self.appearance.to_json()} if self.appearance is not None else {}),
        }


def parse_manifest(path: Path, data: Mapping[str, Any]) -> Bundle:
    """Build a ``Bundle`` from parsed ``bundle.json`` data (no file checks).

    Whatever is wrong with the data is a ``BundleError`` naming the file: a value of the wrong
    type (``"det_conf": "high"``, ``"thresholds": [0.5]``, a list at the top) would otherwise
    surface as a ``TypeError`` or ``AttributeError``, which the daemon's reload reports as an
    internal error and the sync agent's model pull does not refuse, so every pull stopped on it.
    """
    if not isinstance(data, Mapping):
        raise BundleError(f"{path}: bundle.json must hold a JSON object, got {type(data).__name__}")
    try:
        return _parse_manifest(path, data)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise BundleError(f"{path}: bundle.json is malformed ({type(exc).__name__}: {exc})") from exc


def _parse_manifest(path: Path, data: Mapping[str, Any]) -> Bundle:
    if data.get("format") != FORMAT:
        raise BundleError(f"{path}: bundle format {data.get('format')!r} is not supported; expected {FORMAT}")
    for key in ("id", "models", "keypoints"):
        if key not in data:
            raise BundleError(f"{path}: bundle.json has no {key!r}")
    check_bundle_id(data["id"], path)
    try:
        schema = KeypointSchema.from_json(data["keypoints"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{path}: keypoints: {exc}") from exc
    models = {}
    for role, entry in dict(data["models"]).items():
        if entry is None:
            continue
        m = ModelEntry.from_json(role, entry)
        if m.task == "pose" and m.kpt_shape and m.kpt_shape[0] != schema.count:
            raise BundleError(
                f"models.{role}.kpt_shape: {m.kpt_shape[0]} points but keypoints.names has {schema.count}"
            )
        models[role] = m
    if not models:
        raise BundleError(f"{path}: bundle names no model")
    mode = str(data.get("visibility_mode", "two_model"))
    if mode not in VISIBILITY_MODES:
        raise BundleError(f"visibility_mode: expected one of {VISIBILITY_MODES}, got {mode!r}")
    if mode == "two_model" and "pose_main" in models and "pose_visible" not in models:
        raise BundleError("visibility_mode is 'two_model' but the bundle has no pose_visible model")
    cal = None
    if data.get("confidence_calibration") is not None:
        if mode != "two_model":
            raise BundleError("confidence_calibration needs visibility_mode 'two_model' (it re-estimates both pose "
                              "confidences)")
        cal = ConfidenceCalibration.from_json(data["confidence_calibration"], schema.count)
    appearance = None
    if data.get("appearance") is not None:
        try:
            appearance = AppearanceProfile.from_json(data["appearance"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{path}: appearance: {exc}") from exc
    head_from_face = data.get("head_from_face", False)
    if not isinstance(head_from_face, bool):  # bool("false") is True
        raise BundleError(f"{path}: head_from_face: expected true or false, got {head_from_face!r}")
    return Bundle(
        path=path, id=str(data["id"]), created=str(data.get("created", "")), models=models,
        keypoints=schema, thresholds=Thresholds.from_json(data.get("thresholds", {}), schema.count),
        visibility_mode=mode, head_from_face=head_from_face,
        judgement=dict(data.get("judgement", {})), metrics=dict(data.get("metrics", {})),
        lineage=dict(data.get("lineage", {})), confidence_calibration=cal, appearance=appearance,
    )


# Where ONNX messages hold tensors (onnx.proto field numbers): message -> {field: message}.
_ONNX_FIELDS = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "function": {7: "node", 11: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}
_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION, _EXTERNAL = 13, 14, 1


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def onnx_external_data(data: bytes, kind: str = "model", depth: int = 0) -> bool:
    """Whether an ONNX model (its protobuf bytes) keeps a tensor's data in another file
    (``data_location: EXTERNAL``), walked without the ``onnx`` package (the runtime lacks it).
    ``ValueError`` for bytes that are not a well-formed protobuf."""
    if depth > 64:
        raise ValueError("messages nested more than 64 deep")
    buf, i = memoryview(data), 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
            if kind == "tensor" and field == _TENSOR_DATA_LOCATION and value == _EXTERNAL:
                return True
        elif wire == 2:
            size, i = _varint(buf, i)
            if i + size > len(buf):
                raise ValueError("a field runs past the end of the file")
            if kind == "tensor" and field == _TENSOR_EXTERNAL_DATA:
                return True
            sub = _ONNX_FIELDS.get(kind, {}).get(field)
            if sub is not None and onnx_external_data(buf[i:i + size], sub, depth + 1):
                return True
            i += size
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    if i != len(buf):
        raise ValueError("a field runs past the end of the file")
    return False


def verify_onnx_layout(entry: ModelEntry, model_path: Path) -> None:
    """Check the ONNX file's input and output shapes against the entry, without running it.

    A model whose weights live in another file (ONNX external data) is refused: that file is
    covered by no checksum in ``bundle.json``, so a bundle whose signature and checksums hold
    could still run changed weights (and the registry does not carry it)."""
    import onnxruntime as ort  # runtime dependency; imported here to keep `bundle` light

    try:
        external = onnx_external_data(model_path.read_bytes())
    except (ValueError, IndexError) as exc:
        raise BundleError(f"models.{entry.role}: {model_path.name} is not a loadable ONNX model: {exc}") from exc
    if external:
        raise BundleError(f"models.{entry.role}: {model_path.name} keeps weights in another file (ONNX external "
                          "data), which no checksum in bundle.json covers; export it as one file")
    try:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises several unrelated types for a bad file
        raise BundleError(f"models.{entry.role}: {model_path.name} is not a loadable ONNX model: {exc}") from exc
    inputs, outputs = sess.get_inputs(), sess.get_outputs()
    if len(inputs) != 1 or len(inputs[0].shape) != 4:
        raise BundleError(f"models.{entry.role}: expected one NCHW input, got {[(i.name, i.shape) for i in inputs]}")
    _, c, h, w = inputs[0].shape
    if c != 3 or (isinstance(h, int) and h != entry.imgsz[0]) or (isinstance(w, int) and w != entry.imgsz[1]):
        raise BundleError(
            f"models.{entry.role}: input shape {inputs[0].shape} does not match declared imgsz {list(entry.imgsz)}"
        )
    shape = outputs[0].shape
    if len(shape) != 3 or (isinstance(shape[1], int) and shape[1] != entry.output_channels):
        raise BundleError(
            f"models.{entry.role}: output shape {shape} does not match the declared layout "
            f"[N, {entry.output_channels}, A] (4 box + {len(entry.names)} classes"
            + (f" + {entry.kpt_shape[0]}x{entry.kpt_shape[1]} key point values)" if entry.kpt_shape else ")")
        )


def load_bundle(path: str | os.PathLike[str], verify: bool = True) -> Bundle:
    """Read ``bundle.json`` from a bundle directory and verify checksums and ONNX layouts.

    Every problem of the path itself is a ``BundleError`` saying what to fix (a name too long, a
    file where a folder belongs), not an ``OSError`` that ``ReloadModels`` answered as internal
    with the whole name in its log. Other ``OSError`` (too many open files, an I/O error, a
    permission) stay what they are: passing troubles of this machine, which the model pull
    retries, whereas a ``BundleError`` refuses the bundle for good."""
    try:
        return _load_bundle(Path(path), verify)
    except OSError as exc:
        if exc.errno not in _PATH_ERRNOS:
            raise
        shown = str(path) if len(str(path)) <= 200 else f"{str(path)[:200]}... ({len(str(path))} characters)"
        raise BundleError(f"{shown}: cannot read the bundle: {exc.strerror or exc}") from exc


_PATH_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG, errno.EISDIR, errno.ELOOP})


def _load_bundle(root: Path, verify: bool) -> Bundle:
    manifest = root / "bundle.json"
    if not manifest.is_file():
        raise BundleError(f"{root}: no bundle.json (is this a bundle directory?)")
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except OSError as exc:
        if exc.errno not in _PATH_ERRNOS:  # an I/O error, too many open files: not the bundle's fault
            raise
        raise BundleError(f"{manifest}: cannot be read: {exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        # RecursionError: arrays nested thousands deep ("[[[[..."); it escaped every caller
        # (each model pull stopped on such a bundle, a reload answered INTERNAL)
        raise BundleError(f"{manifest}: cannot be read as JSON: {exc}") from exc
    bundle = parse_manifest(root, data)
    if verify:
        for role, entry in bundle.models.items():
            mp = root / entry.file
            if not mp.is_file():
                raise BundleError(f"models.{role}: file {entry.file} is missing from {root}")
            actual = sha256_file(mp)
            if actual != entry.sha256:
                raise BundleError(
                    f"models.{role}: checksum mismatch for {entry.file}: bundle.json says {entry.sha256[:12]}..., "
                    f"file has {actual[:12]}... (corrupt or tampered)"
                )
            verify_onnx_layout(entry, mp)
    return bundle


def write_bundle(bundle: Bundle) -> Path:
    """Write ``bundle.json`` for a bundle whose ONNX files already sit in ``bundle.path``.

    Checksums in the entries are recomputed from the files so they cannot drift.
    """
    models = {}
    for role, entry in bundle.models.items():
        mp = bundle.path / entry.file
        if not mp.is_file():
            raise BundleError(f"models.{role}: {mp} does not exist")
        models[role] = ModelEntry(**{**entry.__dict__, "sha256": sha256_file(mp)})
    fixed = Bundle(**{**bundle.__dict__, "models": models})
    write_json_atomic(bundle.path / "bundle.json", fixed.to_json(), flat_number_lists=True)
    return bundle.path / "bundle.json"
