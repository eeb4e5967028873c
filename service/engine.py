"""The inference engine: a bundle's ONNX models run with onnxruntime, one fixed pipeline.

    decode (service.imageio) -> letterbox once per input size (service.geometry)
    -> session.run per model, in batches -> decode outputs (service.postprocess)
    -> match persons + visibility rule (service.visibility) -> ``Prediction`` records
    (with the image's appearance novelty when the bundle has a profile: service.novelty)

One ``InferenceSession`` per model, created at construction and shared: ``Engine.predict`` keeps
no per-call state on the object, so one engine may serve several threads (onnxruntime's
``run`` is thread-safe). Every coordinate in the result is in original-image pixels after
EXIF orientation.
"""
from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from typing import ContextManager, Protocol, Sequence

import numpy as np
import onnxruntime as ort

from .bundle import Bundle
from .confcal import calibrate_persons
from .errors import BundleError
from .geometry import Letterbox, letterbox, to_tensor
from .imageio import DecodedImage
from .keypoints import FLAG_VISIBILITY
from .novelty import descriptor
from .postprocess import Detections, decode_detections, decode_poses
from .record import Head, Keypoint, Person, Prediction
from .visibility import FLAG_OUTSIDE, decide_visibility, decide_visibility_main_only, match_persons

log = logging.getLogger(__name__)

# The default order when engine.providers is empty. TensorRT is left out on purpose: onnxruntime
# lists it whenever its provider library ships (every onnxruntime-gpu wheel), also on machines
# without TensorRT itself, and where TensorRT is installed it builds an engine per model at
# every start and hot swap. Name it in engine.providers to use it.
PROVIDER_PRIORITY = ("CUDAExecutionProvider", "CPUExecutionProvider")
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
FACE_POINTS = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "mouth")
# Head-from-face heuristic: the head box is a square of side FACE_TO_HEAD x the larger span of
# the confident face points (at least MIN_FACE_POINTS of them), centred on their mean and moved
# up by HEAD_SHIFT_UP x side, since eyes and nose sit below the middle of the head (forehead and
# hair above, only the chin below). Rough, but it puts a box where the head is.
MIN_FACE_POINTS = 3
FACE_TO_HEAD = 1.8
HEAD_SHIFT_UP = 0.1
LETTERBOX_MODES = ("square", "rect")
STRIDE = 32  # the largest stride of the YOLO models' heads: a rectangular input is a multiple of it


class InferenceTimer(Protocol):
    """What the engine needs of a metrics recorder (``service.metrics.MetricsRecorder`` fits)."""

    def time_inference(self, role: str) -> ContextManager[None]: ...


def select_providers(requested: Sequence[str] | None = None) -> list[str]:
    """Requested providers (or the priority list) filtered by what onnxruntime offers here.

    "Offers" means its provider library ships; whether CUDA itself loads shows only when a
    session is made (``load_gpu_libraries``, ``Engine.active_providers``)."""
    available = set(ort.get_available_providers())
    wanted = list(requested) if requested is not None else list(PROVIDER_PRIORITY)
    chosen = [p for p in wanted if p in available]
    if not chosen:
        raise BundleError(f"none of the execution providers {wanted} is available; onnxruntime has {sorted(available)}")
    return chosen


_gpu_libraries_loaded = False


def load_gpu_libraries(providers: Sequence[str]) -> None:
    """Load the CUDA and cuDNN libraries of pip's ``nvidia-*`` packages before a GPU session.

    A pip install (``onnxruntime-gpu[cuda,cudnn]``) does not put them on the loader's path;
    where the CUDA provider then cannot find them, its sessions fall back to the CPU (on the
    H200 box measured they were found without this too: a safeguard, onnxruntime's documented
    way). ``onnxruntime.preload_dlls`` (1.21+) loads them from the environment's site-packages,
    then the default path. Once per process; what it prints is logged."""
    global _gpu_libraries_loaded
    if _gpu_libraries_loaded or not any(p in GPU_PROVIDERS for p in providers):
        return
    _gpu_libraries_loaded = True
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            preload()
    except Exception as exc:  # a bad install must not stop the CPU fallback
        log.warning("onnxruntime.preload_dlls failed: %s", exc)
    for line in printed.getvalue().splitlines():
        if line.strip():
            log.warning("onnxruntime.preload_dlls: %s", line.strip())


def open_session(path: str, providers: Sequence[str],
                 opts: ort.SessionOptions | None = None) -> tuple[ort.InferenceSession, str]:
    """An onnxruntime session on ``providers`` (pip's GPU libraries loaded first) and what
    onnxruntime printed while making it: the banner of a GPU provider that did not load, after
    which ``session.get_providers()`` names the fallback. Errors are onnxruntime's own."""
    load_gpu_libraries(providers)
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        session = ort.InferenceSession(str(path), opts, providers=list(providers))
    return session, printed.getvalue()


def _finite(conf: np.ndarray) -> np.ndarray:
    """Confidences with NaN and infinities as 0 (a model that overflowed, e.g. after the fp16
    conversion): the scoring would take NaN as fully certain (its distance to a threshold
    compares false) and the point would leave the judge's doubt unnoticed."""
    conf = np.asarray(conf, dtype=np.float32)
    return np.where(np.isfinite(conf), conf, np.float32(0.0))


@dataclass(frozen=True)
class _Model:
    """One loaded model: its session and what was read from the ONNX file."""

    role: str
    session: ort.InferenceSession
    input_name: str
    size: tuple[int, int]  # network input (height, width)
    fixed_batch: int | None  # None when the batch axis is dynamic
    task: str
    num_classes: int
    kpt_shape: tuple[int, int] | None
    dynamic_hw: bool = False  # the ONNX input's height and width are free (ultralytics dynamic=True)

    def net_size(self, image_hw: tuple[int, int], mode: str) -> tuple[int, int]:
        """The network input for an image of ``image_hw``: the model's size ("square"), or in
        "rect" mode, where the ONNX allows it, the image scaled into that size with its short
        side padded only up to the next multiple of ``STRIDE`` (ultralytics' rectangular
        inference: a 640 x 480 camera runs at 320 x 256, 80 % of the square's pixels)."""
        if mode != "rect" or not self.dynamic_hw:
            return self.size
        h, w = image_hw
        r = min(self.size[0] / h, self.size[1] / w)
        return (min(self.size[0], -(-max(round(h * r), 1) // STRIDE) * STRIDE),
                min(self.size[1], -(-max(round(w * r), 1) // STRIDE) * STRIDE))


class Engine:
    """Runs a verified ``Bundle`` on images. See the module docstring for the pipeline."""

    def __init__(
        self,
        bundle: Bundle,
        providers: Sequence[str] | None = None,
        intra_op_threads: int = 0,
        batch_size: int = 8,
        metrics: InferenceTimer | None = None,
        letterbox: str = "square",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        if letterbox not in LETTERBOX_MODES:
            raise ValueError(f"letterbox: expected one of {LETTERBOX_MODES}, got {letterbox!r}")
        self.letterbox = letterbox
        self.bundle = bundle
        self.batch_size = batch_size
        self.metrics = metrics  # duck-typed: the engine imports no metrics library
        self.providers = select_providers(providers)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(intra_op_threads)
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # The sessions share the cores: idle ones must not spin (2x measured, ENVIRONMENT.md).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.models: dict[str, _Model] = {}
        self.active_providers: list[str] = list(self.providers)  # what the sessions really run on
        for role, entry in bundle.models.items():
            path = bundle.model_path(role)
            try:
                session, printed = open_session(str(path), self.providers, opts)
            except Exception as exc:  # onnxruntime raises several unrelated types
                raise BundleError(f"models.{role}: cannot load {path}: {exc}") from exc
            active = session.get_providers()
            if active[0] != self.providers[0]:
                said = " ".join(line.strip("* ") for line in printed.splitlines() if "EP Error" in line)
                log.warning("models.%s: %s was asked for but onnxruntime runs it on %s%s; `annotator doctor` "
                            "says what is missing", role, self.providers[0], ", ".join(active),
                            f" ({said})" if said else "")
            self.active_providers = list(active)
            inp = session.get_inputs()[0]
            n, _, h, w = inp.shape
            size = (h if isinstance(h, int) else entry.imgsz[0], w if isinstance(w, int) else entry.imgsz[1])
            self.models[role] = _Model(
                role, session, inp.name, (int(size[0]), int(size[1])), n if isinstance(n, int) else None,
                entry.task, len(entry.names), entry.kpt_shape, not isinstance(h, int) and not isinstance(w, int),
            )
        # On a GPU every run gets the same batch shape (padded): onnxruntime's CUDA provider tunes
        # its convolutions for each new input shape, and the daemon's batches vary in size (1..8),
        # which made batches of 8 slower than batches of 1 there (README, "GPU").
        self.pad_batches = self.active_providers[0] in GPU_PROVIDERS
        if "pose_visible" in self.models and "pose_main" not in self.models:
            log.warning("bundle %s has a pose_visible model but no pose_main: no persons will be reported", bundle.id)
        log.info("engine for bundle %s: models %s, providers %s", bundle.id, sorted(self.models),
                 ", ".join(self.active_providers))

    # -- pipeline -------------------------------------------------------------------------

    def predict_arrays(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        """``predict`` for in-memory HxW / HxWx1 / HxWx3 / HxWx4 arrays (BGR, uint8 or 16 bit)."""
        return self.predict([DecodedImage.from_array(im) for im in images])

    def predict(self, images: Sequence[DecodedImage]) -> list[Prediction]:
        """One ``Prediction`` per image, in order; coordinates in original pixels."""
        if not images:
            return []
        boxed: dict[tuple[int, int, int], tuple[np.ndarray, Letterbox]] = {}  # (image, net h, net w) -> letterboxed
        found: dict[str, list[Detections]] = {}
        tensors: dict[tuple, np.ndarray] = {}  # one float tensor per chunk and input size, shared by the models
        for role, m in self.models.items():
            # Images of one network input size run together (in "rect" mode an image's aspect
            # sets its size; a camera's stream has one); each image is letterboxed once per size.
            groups: dict[tuple[int, int], list[int]] = {}
            for i, im in enumerate(images):
                groups.setdefault(m.net_size(im.pixels.shape[:2], self.letterbox), []).append(i)
            dets: list[Detections | None] = [None] * len(images)
            for size, idx in groups.items():
                for i in idx:
                    if (i, *size) not in boxed:
                        boxed[(i, *size)] = letterbox(images[i].pixels, size)
                arrays = [boxed[(i, *size)][0] for i in idx]
                outputs = self._run(m, arrays, tensors, size, tuple(idx))
                for i, out in zip(idx, outputs):
                    dets[i] = self._decode(m, out, boxed[(i, *size)][1], images[i])
            found[role] = dets  # type: ignore[assignment]
        return [self._assemble(i, im, found) for i, im in enumerate(images)]

    def _run(self, m: _Model, arrays: list[np.ndarray], tensors: dict[tuple, np.ndarray] | None = None,
             size: tuple[int, int] | None = None, group: tuple[int, ...] = ()) -> list[np.ndarray]:
        """Run one model over letterboxed images; returns one [R, A] output per image.

        ``tensors``: the float tensors built for the other models of this ``predict`` (the three
        models of a bundle usually share one input size): each is built once, not once a model
        (onnxruntime does not write to its inputs)."""
        step = m.fixed_batch if m.fixed_batch is not None else self.batch_size
        outs: list[np.ndarray] = []
        for start in range(0, len(arrays), step):
            chunk = arrays[start:start + step]
            padded = len(chunk) < step and (m.fixed_batch is not None or self.pad_batches)  # one shape per model
            key = (size or m.size, group, start, step, padded)
            tensor = tensors.get(key) if tensors is not None else None
            if tensor is None:
                tensor = to_tensor(chunk)
                if padded:
                    pad = np.zeros((step - len(chunk), *tensor.shape[1:]), np.float32)
                    tensor = np.concatenate([tensor, pad])
                if tensors is not None:
                    tensors[key] = tensor
            timed = self.metrics.time_inference(m.role) if self.metrics is not None else contextlib.nullcontext()
            with timed:
                result = m.session.run(None, {m.input_name: tensor})[0]
            outs.extend(result[: len(chunk)])
        return outs

    def _decode(self, m: _Model, out: np.ndarray, lb: Letterbox, im: DecodedImage) -> Detections:
        t = self.bundle.thresholds
        if m.task == "pose":
            assert m.kpt_shape is not None
            return decode_poses(out, m.kpt_shape, lb, im.scale_xy, im.width, im.height,
                                conf=t.person_conf, iou=t.nms_iou, num_classes=m.num_classes,
                                sigmas=self.bundle.keypoints.sigmas)
        return decode_detections(out, lb, im.scale_xy, im.width, im.height, m.num_classes,
                                 conf=t.det_conf, iou=t.nms_iou)

    def _assemble(self, i: int, im: DecodedImage, found: dict[str, list[Detections]]) -> Prediction:
        persons = self._persons(found["pose_main"][i], found["pose_visible"][i] if "pose_visible" in found else None,
                                im.width, im.height) if "pose_main" in found else ()
        if "head" in found:
            d = found["head"][i]
            heads = tuple(Head(tuple(map(float, b)), float(s)) for b, s in zip(d.boxes, d.scores))  # type: ignore[arg-type]
        elif self.bundle.head_from_face:
            heads = tuple(h for p in persons if (h := self.head_from_face(p, im.width, im.height)) is not None)
        else:
            heads = ()
        profile = self.bundle.appearance
        novelty = profile.novelty(descriptor(im.pixels)) if profile is not None else None
        return Prediction(width=im.width, height=im.height, heads=heads, persons=tuple(persons), novelty=novelty)

    def _persons(self, main: Detections, visible: Detections | None, width: int, height: int) -> tuple[Person, ...]:
        """Apply the visibility rule to the main model's persons (after the bundle's confidence
        calibration, when it has one: ``service.confcal``)."""
        t = self.bundle.thresholds
        assert main.keypoints is not None
        main_conf = _finite(main.keypoints[..., 2])
        match_conf = np.zeros(len(main), np.float32)
        if self.bundle.visibility_mode == "main_only" or visible is None:
            vis_conf = main_conf.copy()
            flags = decide_visibility_main_only(main_conf, t.main)
        else:
            assert visible.keypoints is not None
            vis_conf = np.zeros_like(main_conf)
            for p, j in enumerate(match_persons(main.boxes, visible.boxes, t.match_iou, main.scores)):
                if j is not None:
                    vis_conf[p] = _finite(visible.keypoints[j, :, 2])
                    match_conf[p] = visible.scores[j]
            cal = self.bundle.confidence_calibration
            if cal is not None and len(main):
                main_conf, vis_conf = calibrate_persons(cal, main_conf, vis_conf, match_conf > 0,
                                                        main.keypoints[..., :2], main.boxes, main.scores, width, height)
            flags = decide_visibility(main_conf, vis_conf, t.main, t.visible)
        if main.off_image is not None:  # placed beyond the frame: outside, however sure the model is
            flags = np.where(main.off_image, FLAG_OUTSIDE, flags)
        persons = []
        for p in range(len(main)):
            kpts = []
            for k in range(main_conf.shape[1]):
                # x, y keep the main model's estimate even for outside points (record.Keypoint).
                x, y = float(main.keypoints[p, k, 0]), float(main.keypoints[p, k, 1])
                kpts.append(Keypoint(x, y, float(main_conf[p, k]), float(vis_conf[p, k]), FLAG_VISIBILITY[int(flags[p, k])]))
            persons.append(Person(tuple(map(float, main.boxes[p])), float(main.scores[p]), tuple(kpts),  # type: ignore[arg-type]
                                  float(match_conf[p])))
        return tuple(persons)

    def head_from_face(self, person: Person, width: int, height: int) -> Head | None:
        """A head box derived from a person's confident face points (heuristic above), or None."""
        names = self.bundle.keypoints.names
        pts = [kp for n, kp in zip(names, person.keypoints) if n in FACE_POINTS and kp.visibility != "outside"]
        if len(pts) < MIN_FACE_POINTS:
            return None
        xy = np.array([(kp.x, kp.y) for kp in pts], dtype=np.float32)
        span = float(max(np.ptp(xy[:, 0]), np.ptp(xy[:, 1])))
        side = max(FACE_TO_HEAD * span, 2.0)
        cx, cy = float(xy[:, 0].mean()), float(xy[:, 1].mean()) - HEAD_SHIFT_UP * side
        x1, y1 = min(max(cx - side / 2, 0.0), width), min(max(cy - side / 2, 0.0), height)
        x2, y2 = min(max(cx + side / 2, 0.0), width), min(max(cy + side / 2, 0.0), height)
        conf = person.conf * float(np.mean([kp.main_conf for kp in pts]))
        return Head((x1, y1, x2, y2), conf)
