"""Confidence calibration: the two pose confidences of each key point re-estimated from context.

The visibility rule (``service.visibility``) compares the main and the visible-only confidence
of a point with per-point thresholds. The raw confidences of small pose models are noisy and
blind to where the point sits: a hip low in a rear passenger's box is nearly always behind the
front seat, a point in the lower third of the driver's box behind the wheel. A bundle may carry
a ``confidence_calibration``: two small multilayer perceptrons fitted on labelled validation
images (``exporter.confcal_fit``) that map, per point,

    features ("cabin-v1") = [logit(main conf), logit(visible conf), one-hot key point index,
                point x, y relative to the person box (0..1), box x1, y1, w, h relative to
                the image, point x, y relative to the image, person confidence]
    features ("cabin-v2") = cabin-v1 + the whole person as context: every key point's
                logit(main conf), logit(visible conf), x and y relative to the box (4 K more)

to ``P(in view)`` and ``P(visible | in view)``. The main confidence becomes ``P(in view)``, the
visible confidence ``P(visible) = P(in view) * P(visible | in view)``: the same meanings as the
raw pair (the visible-only model answers "visible?", never more sure than "in view?"), so the
threshold rule applies unchanged, with thresholds chosen for the calibrated values, and the
judge's distances to the thresholds and its check that the visible-only model does not see
what the main model does not claim keep their meaning. A person the visible-only model did not
find keeps visible confidence 0 (never visible).

Pure numpy: ``point_features`` and ``Mlp.__call__`` run in the daemon and in the fitting code,
so both see exactly the same features.

Why the context (v2): whether a point is hidden depends on the rest of the body, not only on the
point. A person turned to the side hides the far arm behind the torso; a wrist is occluded when
its elbow is; a rear passenger's low points share the seat back. Given the person's other
points, the perceptrons lift visibility accuracy on the synthetic test set by about one point
(docs/training.md, "Confidence calibration"). Bundles fitted with cabin-v1 still load and run.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import BundleError
from .record import Person

FEATURES_V1 = "cabin-v1"  # per point only (bundles fitted before v2)
FEATURES = "cabin-v2"  # per point + whole-person context: what new fits use
LAYOUTS = (FEATURES_V1, FEATURES)  # a bundle names the layout it was fitted with
_EPS = 1e-4


def logit(p: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)) with p clipped to [1e-4, 1 - 1e-4] (finite for 0 and 1)."""
    q = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1.0 - _EPS)
    return np.log(q / (1.0 - q))


def feature_count(kpt_count: int, layout: str = FEATURES) -> int:
    """Length of one point's feature vector for ``kpt_count`` key points in ``layout``."""
    if layout not in LAYOUTS:
        raise BundleError(f"confidence_calibration.features: {layout!r} is not supported; expected one of {LAYOUTS}")
    return kpt_count + 11 + (4 * kpt_count if layout == FEATURES else 0)


def point_features(
    main_conf: np.ndarray,
    vis_conf: np.ndarray,
    kpt_xy: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    width: int,
    height: int,
    layout: str = FEATURES,
) -> np.ndarray:
    """Features ``float64 [P, K, feature_count(K, layout)]`` of every point of ``P`` persons
    (layouts: module doc).

    ``main_conf``/``vis_conf`` ``[P, K]`` in 0..1; ``kpt_xy`` ``[P, K, 2]`` and ``boxes``
    ``[P, 4]`` (x1, y1, x2, y2) in image pixels; ``scores`` ``[P]``; image ``width``/``height``.
    """
    main_conf = np.asarray(main_conf, dtype=np.float64)
    p, k = main_conf.shape
    out = np.zeros((p, k, feature_count(k, layout)), dtype=np.float64)
    if p == 0:
        return out
    boxes = np.asarray(boxes, dtype=np.float64).reshape(p, 4)
    xy = np.asarray(kpt_xy, dtype=np.float64).reshape(p, k, 2)
    w, h = float(max(width, 1)), float(max(height, 1))
    bw = np.maximum(boxes[:, 2] - boxes[:, 0], 1.0)
    bh = np.maximum(boxes[:, 3] - boxes[:, 1], 1.0)
    out[..., 0] = logit(main_conf)
    out[..., 1] = logit(np.asarray(vis_conf, dtype=np.float64).reshape(p, k))
    out[..., 2:2 + k] = np.eye(k)[None, :, :]
    c = 2 + k
    out[..., c] = (xy[..., 0] - boxes[:, None, 0]) / bw[:, None]
    out[..., c + 1] = (xy[..., 1] - boxes[:, None, 1]) / bh[:, None]
    out[..., c + 2] = (boxes[:, 0] / w)[:, None]
    out[..., c + 3] = (boxes[:, 1] / h)[:, None]
    out[..., c + 4] = (bw / w)[:, None]
    out[..., c + 5] = (bh / h)[:, None]
    out[..., c + 6] = xy[..., 0] / w
    out[..., c + 7] = xy[..., 1] / h
    out[..., c + 8] = np.asarray(scores, dtype=np.float64).reshape(p)[:, None]
    if layout == FEATURES:  # the person's every point, the same for each of its points
        person = np.concatenate([out[..., 0], out[..., 1], out[..., c], out[..., c + 1]], axis=1)  # [P, 4K]
        out[..., c + 9:] = person[:, None, :]
    return out


def _matrix(value: Any, what: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise BundleError(f"confidence_calibration.{what}: expected numbers, got {value!r:.80}") from exc
    if not np.all(np.isfinite(arr)):
        raise BundleError(f"confidence_calibration.{what}: contains NaN or infinite values")
    return arr


def _block_diagonal(blocks: Sequence[np.ndarray]) -> np.ndarray:
    out = np.zeros((sum(b.shape[0] for b in blocks), sum(b.shape[1] for b in blocks)))
    r = c = 0
    for b in blocks:
        out[r:r + b.shape[0], c:c + b.shape[1]] = b
        r, c = r + b.shape[0], c + b.shape[1]
    return out


@dataclass(frozen=True)
class Mlp:
    """Standardise, then dense layers with ReLU between them, then a sigmoid: ``[N, F] -> [N]``."""

    mean: np.ndarray  # [F]
    scale: np.ndarray  # [F], > 0
    weights: tuple[np.ndarray, ...]  # [F, H1], [H1, H2], ..., [Hn, 1]
    biases: tuple[np.ndarray, ...]

    def __post_init__(self) -> None:
        f = self.mean.shape[0]
        if self.scale.shape != (f,) or np.any(self.scale <= 0):
            raise BundleError(f"confidence_calibration: scale: expected {f} positive values, got shape {self.scale.shape}")
        if not self.weights or len(self.weights) != len(self.biases):
            raise BundleError("confidence_calibration: expected as many weight matrices as bias vectors (at least one)")
        rows = f
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            if w.ndim != 2 or w.shape[0] != rows or b.shape != (w.shape[1],):
                raise BundleError(f"confidence_calibration: layer {i}: expected weights [{rows}, H] and bias [H], "
                                  f"got {list(w.shape)} and {list(b.shape)}")
            rows = w.shape[1]
        if rows != 1:
            raise BundleError(f"confidence_calibration: the last layer must have 1 output, got {rows}")

    @property
    def inputs(self) -> int:
        return int(self.mean.shape[0])

    def logits(self, x: np.ndarray) -> np.ndarray:
        h = (np.asarray(x, dtype=np.float64) - self.mean) / self.scale
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = h @ w + b
            if i < len(self.weights) - 1:
                h = np.maximum(h, 0.0)
        return h[..., 0]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Probabilities ``[...]`` for features ``[..., F]``."""
        return 1.0 / (1.0 + np.exp(-np.clip(self.logits(x), -60, 60)))

    def to_json(self) -> dict[str, Any]:
        r = lambda a: np.round(a, 6).tolist()  # noqa: E731
        return {"mean": r(self.mean), "scale": r(self.scale), "weights": [r(w) for w in self.weights],
                "biases": [r(b) for b in self.biases]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any], what: str) -> "Mlp":
        try:
            return cls(_matrix(d["mean"], f"{what}.mean").reshape(-1), _matrix(d["scale"], f"{what}.scale").reshape(-1),
                       tuple(_matrix(w, f"{what}.weights") for w in d["weights"]),
                       tuple(_matrix(b, f"{what}.biases").reshape(-1) for b in d["biases"]))
        except (KeyError, TypeError) as exc:
            raise BundleError(f"confidence_calibration.{what}: expected mean, scale, weights, biases ({exc!r})") from exc

    @classmethod
    def average(cls, members: Sequence["Mlp"]) -> "Mlp":
        """One perceptron whose logit is the mean of the ``members``' logits (same inputs, same
        depth): their hidden layers side by side, block-diagonal after the first. An ensemble
        this way is still a plain ``Mlp`` in the bundle and one matrix product per layer."""
        if len(members) == 1:
            return members[0]
        first = members[0]
        if any(m.inputs != first.inputs or len(m.weights) != len(first.weights) for m in members):
            raise ValueError("average: members need the same inputs and depth")
        # Undo each member's standardisation inside its first layer; standardise once with the first's.
        layers = [[(m.weights[0] * (first.scale / m.scale)[:, None],
                    m.biases[0] + ((first.mean - m.mean) / m.scale) @ m.weights[0])] + list(zip(m.weights[1:], m.biases[1:]))
                  for m in members]
        weights, biases = [], []
        for i, per_member in enumerate(zip(*layers)):
            ws, bs = [w for w, _ in per_member], [b for _, b in per_member]
            if i == len(first.weights) - 1:  # the output: the mean of the members' logits
                weights.append(np.concatenate(ws, axis=0) / len(members) if i else np.mean(ws, axis=0))
                biases.append(np.mean(bs, axis=0))
            else:  # hidden units side by side: the first layer's columns, block-diagonal after it
                weights.append(np.concatenate(ws, axis=1) if i == 0 else _block_diagonal(ws))
                biases.append(np.concatenate(bs))
        return cls(first.mean, first.scale, tuple(weights), tuple(biases))


@dataclass(frozen=True)
class ConfidenceCalibration:
    """The two calibrators of a bundle (``in_view``: main confidence; ``visible``: visible
    confidence given in view) and how they were fitted."""

    in_view: Mlp
    visible: Mlp
    features: str = FEATURES
    method: str = ""

    def check(self, kpt_count: int) -> None:
        """Raise ``BundleError`` unless both calibrators take this schema's feature layout."""
        want = feature_count(kpt_count, self.features)
        for name, m in (("in_view", self.in_view), ("visible", self.visible)):
            if m.inputs != want:
                raise BundleError(f"confidence_calibration.{name}: takes {m.inputs} features, expected {want} "
                                  f"for {kpt_count} key points")

    def apply(self, features: np.ndarray, vis_matched: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated (main, visible) = (P(in view), P(visible)) ``float32 [P, K]`` from
        ``point_features``; persons with ``vis_matched[p]`` False keep visible confidence 0."""
        main = self.in_view(features)
        vis = (main * self.visible(features)).astype(np.float32)
        main = main.astype(np.float32)
        vis[~np.asarray(vis_matched, dtype=bool)] = 0.0
        return main, vis

    def to_json(self) -> dict[str, Any]:
        return {"features": self.features, "method": self.method, "in_view": self.in_view.to_json(),
                "visible": self.visible.to_json()}

    @classmethod
    def from_json(cls, d: Mapping[str, Any], kpt_count: int) -> "ConfidenceCalibration":
        if not isinstance(d, Mapping) or "in_view" not in d or "visible" not in d:
            raise BundleError("confidence_calibration: expected an object with 'in_view' and 'visible'")
        cal = cls(Mlp.from_json(d["in_view"], "in_view"), Mlp.from_json(d["visible"], "visible"),
                  str(d.get("features", FEATURES_V1)), str(d.get("method", "")))
        cal.check(kpt_count)
        return cal


# OpenBLAS's thread count: (get, set) symbol pairs, as numpy's wheels (scipy-openblas, 64-bit
# integers) and other builds name them.
_BLAS_THREAD_SYMBOLS = (("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
                        ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
                        ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
                        ("openblas_get_num_threads", "openblas_set_num_threads"))
_blas_lock = threading.Lock()
_blas_libs: list[tuple[Any, Any]] | None = None  # (get, set) of each OpenBLAS loaded, found once
_blas_users = 0
_blas_saved: list[int] = []


def _openblas_thread_controls() -> list[tuple[Any, Any]]:
    """(get, set) thread-count functions of the OpenBLAS libraries this process has loaded
    (numpy's among them), from ``/proc/self/maps``; none elsewhere than on Linux, or when
    numpy uses another BLAS (then nothing is changed)."""
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split(maxsplit=5)[5].strip() for line in f
                            if "openblas" in line.lower() and len(line.split(maxsplit=5)) == 6})
    except OSError:
        return []
    found = []
    for path in paths:
        try:  # only a library already loaded (RTLD_NOLOAD): a file replaced since is not loaded anew
            lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        except (OSError, AttributeError):  # gone (" (deleted)"), or no RTLD_NOLOAD here
            continue
        for get_name, set_name in _BLAS_THREAD_SYMBOLS:
            get, set_ = getattr(lib, get_name, None), getattr(lib, set_name, None)
            if get is not None and set_ is not None:
                get.restype, get.argtypes = ctypes.c_int, []
                set_.restype, set_.argtypes = None, [ctypes.c_int]
                found.append((get, set_))
                break
    return found


@contextlib.contextmanager
def single_threaded_blas():  # type: ignore[no-untyped-def]
    """numpy's matrix products on one thread while inside (reference-counted across threads;
    the thread count the process had comes back when the last one leaves).

    The calibrators' products are small (a person's 19 points x 106 features x 192 hidden
    units), yet OpenBLAS hands each to its thread pool, whose threads then spin waiting for
    more beside the onnxruntime sessions: on a 2-core box, calibrating an image of 5 persons
    took 27 ms (17 ms of CPU) instead of 0.8 ms, 18 ms of CPU per image in the daemon (156 ms
    of CPU per image in all, 117 ms on one thread). For the calibrators' products one thread gives
    the same bits (checked on the demo bundle: 1-59 persons, 1-16 threads, and 200 images'
    records); in general OpenBLAS's thread count can change a product's last bits. Scoped, not for the
    whole process: the exporter fits the calibrators with large products in the process that
    ran the engine. Nothing changes where numpy uses another BLAS or outside Linux."""
    global _blas_libs, _blas_users, _blas_saved
    with _blas_lock:
        if _blas_libs is None:
            _blas_libs = _openblas_thread_controls()
        libs = _blas_libs
        if _blas_users == 0:
            _blas_saved = [get() for get, _ in libs]
            for (_, set_), n in zip(libs, _blas_saved):
                if n != 1:
                    set_(1)
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                for (_, set_), n in zip(libs, _blas_saved):
                    if n != 1:
                        set_(n)


def calibrate_persons(
    cal: ConfidenceCalibration,
    main_conf: np.ndarray,
    vis_conf: np.ndarray,
    vis_matched: Sequence[bool] | np.ndarray,
    kpt_xy: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    width: int,
    height: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``cal.apply(point_features(...))``: calibrated (main, visible) confidences ``[P, K]``,
    the products on one thread (``single_threaded_blas``)."""
    feats = point_features(main_conf, vis_conf, kpt_xy, boxes, scores, width, height, cal.features)
    with single_threaded_blas():
        return cal.apply(feats, np.asarray(vis_matched, dtype=bool).reshape(-1))


def person_features(persons: Sequence[Person], width: int, height: int,
                    kpt_map: Sequence[int] | np.ndarray | None = None, layout: str = FEATURES) -> np.ndarray:
    """``point_features`` of annotation records' persons ``[P, K, F]``, from the confidences
    they carry (uncalibrated when the engine ran without a calibration). ``kpt_map`` picks
    and orders the key points (default: all, in order); the one-hot part follows that order."""
    if not persons:
        k = len(kpt_map) if kpt_map is not None else 0
        return np.zeros((0, k, feature_count(k, layout)))
    idx = np.asarray(kpt_map if kpt_map is not None else range(len(persons[0].keypoints)), dtype=np.int64)
    kps = [[p.keypoints[i] for i in idx] for p in persons]
    return point_features(
        np.array([[kp.main_conf for kp in row] for row in kps]),
        np.array([[kp.visible_conf for kp in row] for row in kps]),
        np.array([[(kp.x, kp.y) for kp in row] for row in kps]),
        np.array([p.box for p in persons]), np.array([p.conf for p in persons]), width, height, layout)
