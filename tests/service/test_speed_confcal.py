"""The person-context calibration runs numpy's matrix products on one thread, with the same bits.

On a 2-core box OpenBLAS handed each of the calibrators' small products to its thread pool,
whose threads then spun beside the onnxruntime sessions: calibrating one image took 27 ms
instead of 0.8 ms and the daemon ran about a quarter slower (``service.confcal.single_threaded_blas``).
These tests check the calibrated confidences are unchanged bit for bit, and that the products
run on one thread while the process's own thread count comes back afterwards. No timings.
"""
from __future__ import annotations

import ctypes
import threading

import numpy as np
import pytest

from service.bundle import load_bundle
from service.cli_daemon import DEMO_BUNDLE
from service.confcal import ConfidenceCalibration, calibrate_persons, point_features

K = 19


def _openblas() -> tuple:
    """(get, set) of the thread count of the OpenBLAS numpy loaded, found here on its own (not
    with the code under test); skips where there is none (another BLAS, not Linux)."""
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({ln.split(maxsplit=5)[5].strip() for ln in f
                            if "openblas" in ln.lower() and len(ln.split(maxsplit=5)) == 6})
    except OSError:
        pytest.skip("no /proc/self/maps")
    for path in paths:
        lib = ctypes.CDLL(path)
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", ""):
                get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                set_ = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                if get is not None and set_ is not None:
                    get.restype, get.argtypes = ctypes.c_int, []
                    set_.restype, set_.argtypes = None, [ctypes.c_int]
                    return get, set_
    pytest.skip("numpy uses no OpenBLAS here")


@pytest.fixture(scope="module")
def cal() -> ConfidenceCalibration:
    cal = load_bundle(DEMO_BUNDLE).confidence_calibration
    assert cal is not None, "the demo bundle carries a person-context calibration"
    return cal


def _persons(rng: np.random.Generator, p: int) -> tuple:
    x1, y1 = rng.uniform(0, 300, p), rng.uniform(0, 200, p)
    boxes = np.stack([x1, y1, x1 + rng.uniform(40, 300, p), y1 + rng.uniform(60, 280, p)], axis=1).astype(np.float32)
    xy = (boxes[:, None, :2] + rng.random((p, K, 2)) * (boxes[:, None, 2:] - boxes[:, None, :2])).astype(np.float32)
    return (rng.random((p, K)).astype(np.float32), rng.random((p, K)).astype(np.float32),
            rng.random(p) > 0.2, xy, boxes, rng.uniform(0.3, 1.0, p).astype(np.float32))


def test_calibrated_confidences_are_the_same_bits_as_with_the_process_blas_threads(cal: ConfidenceCalibration) -> None:
    get, set_ = _openblas()
    before = get()
    set_(2)  # OpenBLAS's pool in use for the reference, also on a 1-core machine
    try:
        rng = np.random.default_rng(7)
        for p in (1, 2, 5, 9, 20):
            main_conf, vis_conf, matched, xy, boxes, scores = _persons(rng, p)
            feats = point_features(main_conf, vis_conf, xy, boxes, scores, 640, 480, cal.features)
            want_main, want_vis = cal.apply(feats, matched)  # products on the process's 2 threads
            got_main, got_vis = calibrate_persons(cal, main_conf, vis_conf, matched, xy, boxes, scores, 640, 480)
            assert got_main.dtype == want_main.dtype == np.float32
            assert np.array_equal(got_main, want_main) and np.array_equal(got_vis, want_vis), p
    finally:
        set_(before)


def test_calibration_products_run_on_one_thread_and_the_count_comes_back(
        cal: ConfidenceCalibration, monkeypatch: pytest.MonkeyPatch) -> None:
    get, set_ = _openblas()
    before = get()
    set_(2)
    seen: list[int] = []
    apply = ConfidenceCalibration.apply

    def spying(self: ConfidenceCalibration, features: np.ndarray, vis_matched: np.ndarray) -> tuple:
        seen.append(get())
        return apply(self, features, vis_matched)

    monkeypatch.setattr(ConfidenceCalibration, "apply", spying)
    try:
        args = _persons(np.random.default_rng(3), 5)
        calibrate_persons(cal, args[0], args[1], args[2], args[3], args[4], args[5], 640, 480)
        assert seen == [1], f"the calibrators' products ran on {seen} OpenBLAS threads, expected 1"
        assert get() == 2, "the process's OpenBLAS thread count is given back after the calibration"
    finally:
        set_(before)


def test_threads_calibrating_together_give_the_count_back_once_all_are_done(
        cal: ConfidenceCalibration, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two engine workers calibrate at once: the first one out must not give the threads back
    under the other, and the last one out restores them (also when the calibration raised)."""
    get, set_ = _openblas()
    before = get()
    set_(2)
    inside, release = threading.Barrier(2), threading.Event()
    seen: list[int] = []
    apply = ConfidenceCalibration.apply

    def slow(self: ConfidenceCalibration, features: np.ndarray, vis_matched: np.ndarray) -> tuple:
        inside.wait(10)
        if threading.current_thread().name == "first":
            release.set()  # leaves first; the other checks the count after that
            raise RuntimeError("a failed calibration")
        assert release.wait(10)
        first_out.wait(10)
        seen.append(get())
        return apply(self, features, vis_matched)

    first_out = threading.Event()
    monkeypatch.setattr(ConfidenceCalibration, "apply", slow)
    args = _persons(np.random.default_rng(5), 3)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            calibrate_persons(cal, *args[:5], args[5], 640, 480)
        except RuntimeError as exc:
            errors.append(exc)
        finally:
            if threading.current_thread().name == "first":
                first_out.set()

    try:
        threads = [threading.Thread(target=run, name=name) for name in ("first", "second")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert len(errors) == 1, errors
        assert seen == [1], f"after the first worker left, the second's products ran on {seen} threads, expected 1"
        assert get() == 2, "the last one out gives the process's thread count back"
    finally:
        set_(before)
