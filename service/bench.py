"""``annotator bench``: images/s measured side by side in one run, on the same images and bundle.

(a) the bundle's raw ONNX sessions alone (pre-letterboxed tensors, batch 1, one model after
    another: the floor the daemon cannot beat);
(b) the daemon end to end, as configured by default plus JSON sidecars: the drop-folder path
    (written in with the rename-into-place convention -> annotated in the store, sidecar
    written) and gRPC streaming (request -> response), each on a fresh store so nothing is
    de-duplicated; plus unary gRPC latency p50/p99. ``drop.stable_seconds`` is 0 here: files
    arrive by atomic rename, so the stability wait (default 2 s, for writers that do not
    rename) would measure sleeping, not work. Part (b) runs in a child process (spawned, so it
    inherits nothing), whose peak RSS is the daemon's (plus its small bench clients);
(c) ultralytics ``YOLO(onnx).predict`` of the same models one after another (skipped with a
    message when ultralytics is not installed; imported last because importing it sets
    ``OMP_NUM_THREADS=1`` in the process).

Ratios b/a and b/c are printed; peak RSS comes from ``resource.getrusage``: of the daemon's
child process, and of the bench process itself (before and after the ultralytics part; it also
holds every image's pre-letterboxed tensors for (a)). Not a timed test: numbers depend on the
machine.
"""
from __future__ import annotations

import gc
import logging
import os
import resource
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnxruntime as ort

from .bundle import load_bundle
from .engine import open_session, select_providers
from .geometry import letterbox, to_tensor
from .imageio import read_image

log = logging.getLogger(__name__)


@dataclass
class BenchReport:
    """Images/s per path, latencies in ms, peak RSS in MiB; ``notes`` explain skipped parts."""

    images: int
    bundle_id: str
    models: list[str]
    rates: dict[str, float] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)
    rss_mib: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    gpu_rate: str | None = None  # the name of part (a) on a GPU provider, when it ran

    def ratio(self, a: str, b: str) -> float | None:
        return self.rates[a] / self.rates[b] if self.rates.get(a) and self.rates.get(b) else None

    def text(self) -> str:
        lines = [f"bench: {self.images} images, bundle {self.bundle_id}, models {', '.join(self.models)}",
                 f"  os.cpu_count={os.cpu_count()}"]
        for name, rate in self.rates.items():
            lines.append(f"  {name:<34} {rate:8.2f} images/s")
        pairs = [(b, a) for b in ("daemon drop folder", "daemon gRPC stream")
                 for a in ("raw onnx sessions", self.gpu_rate, "ultralytics predict") if a]
        if self.gpu_rate:
            pairs.insert(0, (self.gpu_rate, "raw onnx sessions"))
        for b, a in pairs:
            r = self.ratio(b, a)
            if r is not None:
                lines.append(f"  ratio {b} / {a}: {r:.2f}")
        for name, ms in self.latency_ms.items():
            lines.append(f"  gRPC Annotate latency {name}: {ms:.1f} ms")
        for name, mib in self.rss_mib.items():
            lines.append(f"  peak RSS {name}: {mib:.0f} MiB")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def bench_raw(bundle_path: Path, files: list[Path], repeat: int = 1,
              providers: Sequence[str] = ("CPUExecutionProvider",)) -> tuple[float, list[str]]:
    """(a) images/s of the bundle's sessions run one after another on pre-letterboxed tensors,
    and the providers the sessions really run on (onnxruntime falls back to the CPU when a GPU
    provider cannot load)."""
    bundle = load_bundle(bundle_path)
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the engine does
    sessions = []
    for role in bundle.models:
        s, _ = open_session(str(bundle.model_path(role)), providers, opts)
        inp = s.get_inputs()[0]
        sessions.append((s, inp.name, tuple(bundle.models[role].imgsz)))
    active = sessions[0][0].get_providers()
    tensors = []
    for f in files:
        pixels = read_image(f).pixels
        tensors.append([to_tensor([letterbox(pixels, size)[0]]) for _, _, size in sessions])
    for (s, name, _), t in zip(sessions, tensors[0]):  # warm-up
        s.run(None, {name: t})
    start = time.perf_counter()
    for _ in range(repeat):
        for per_image in tensors:
            for (s, name, _), t in zip(sessions, per_image):
                s.run(None, {name: t})
    return len(files) * repeat / (time.perf_counter() - start), active


def _config(root: Path, bundle_path: Path, drop: Path | None, providers: Sequence[str] = (),
            sets: Mapping[str, str] = {}) -> object:
    from .config import load_config

    values: dict[str, object] = {"server.listen": "127.0.0.1:0", "store.root": str(root / "store"),
                                 "store.min_free_mb": 0, "engine.bundle": str(bundle_path),
                                 "outputs.sidecar_dir": str(root / "sidecars"), "engine.providers": list(providers)}
    if drop is not None:  # files arrive by rename: no stability wait (see the module docstring)
        values.update({"drop.folder": str(drop), "drop.stable_seconds": 0.0, "drop.poll_interval": 0.05})
    return load_config(None, env={}, overrides={**values, **sets})


def _wait_annotated(daemon: object, n: int, timeout: float = 600.0) -> None:
    store = daemon.store  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout
    while True:
        counts = store.counts()
        if counts["auto_accepted"] + counts["review_pending"] + counts["failed"] >= n:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"bench: only {counts} after {timeout} s")
        time.sleep(0.01)


def _daemon_child(bundle_path: Path, files: list[Path], providers: Sequence[str],
                  sets: Mapping[str, str]) -> tuple[dict, dict, float, list]:
    """Run ``bench_daemon`` in this (child) process: (rates, latency_ms, peak RSS MiB, notes)."""
    logging.basicConfig(level=logging.WARNING)
    report = BenchReport(len(files), "", [])
    bench_daemon(bundle_path, files, report, providers, sets)
    return report.rates, report.latency_ms, _peak_rss_mib(), report.notes


def bench_daemon_process(bundle_path: Path, files: list[Path], report: BenchReport,
                         providers: Sequence[str] = (), sets: Mapping[str, str] = {}) -> None:
    """(b) in a fresh spawned process, so its peak RSS is the daemon's alone."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        rates, latency, rss, notes = pool.apply(_daemon_child, (bundle_path, files, list(providers), dict(sets)))
    report.rates.update(rates)
    report.latency_ms.update(latency)
    report.rss_mib["daemon process (b)"] = rss
    report.notes.extend(notes)


def bench_daemon(bundle_path: Path, files: list[Path], report: BenchReport, providers: Sequence[str] = (),
                 sets: Mapping[str, str] = {}) -> None:
    """(b) the drop-folder path, gRPC streaming and unary latency, each on a fresh store."""
    from .client import AnnotatorClient, ImageMeta, annotate_request
    from .daemon import Daemon
    from .server import create_server

    data = [f.read_bytes() for f in files]
    with tempfile.TemporaryDirectory(prefix="annotator-bench-") as tmp:
        root = Path(tmp)
        drop = root / "drop"
        drop.mkdir()  # the bench's own: not the daemon's first-start making it, with its warning
        daemon = Daemon(_config(root / "a", bundle_path, drop, providers, sets))  # type: ignore[arg-type]
        daemon.start()
        engine = daemon._engine
        report.notes.append(f"daemon engine runs on {', '.join(engine.active_providers)}, "
                            f"{engine.batch_size} image(s) per session.run")
        del engine
        try:
            daemon.annotate_now(data[0], "bench:warm-up")  # warm the sessions (excluded below)
            start = time.perf_counter()
            for i, blob in enumerate(data[1:]):
                (drop / f".in{i}").write_bytes(blob)
                os.replace(drop / f".in{i}", drop / f"img{i:05d}.jpg")
            _wait_annotated(daemon, len(data))
            report.rates["daemon drop folder"] = (len(data) - 1) / (time.perf_counter() - start)
        finally:
            daemon.close()
            del daemon
            gc.collect()  # free this daemon's sessions (cycles) before the next one loads its own
        for phase in ("b", "c"):
            daemon = Daemon(_config(root / phase, bundle_path, None, providers, sets))  # type: ignore[arg-type]
            daemon.start()
            server, port = create_server(daemon.config, daemon)  # type: ignore[arg-type]
            try:
                with AnnotatorClient(f"127.0.0.1:{port}", timeout=120) as client:
                    client.annotate(data[0], request_id="warm-up")
                    start = time.perf_counter()
                    if phase == "b":
                        answers = list(client.annotate_stream(annotate_request(b, ImageMeta(request_id=str(i)))
                                                              for i, b in enumerate(data[1:])))
                        assert len(answers) == len(data) - 1
                        report.rates["daemon gRPC stream"] = len(answers) / (time.perf_counter() - start)
                    else:
                        lat = []
                        for blob in data[1:]:
                            t0 = time.perf_counter()
                            client.annotate(blob)
                            lat.append((time.perf_counter() - t0) * 1000.0)
                        report.rates["daemon gRPC unary (sequential)"] = len(lat) / (time.perf_counter() - start)
                        report.latency_ms["p50"] = float(np.percentile(lat, 50))
                        report.latency_ms["p99"] = float(np.percentile(lat, 99))
            finally:
                server.stop(grace=1.0).wait(5)
                daemon.close()
                del daemon, server
                gc.collect()


def bench_ultralytics(bundle_path: Path, files: list[Path], report: BenchReport) -> None:
    """(c) ``YOLO(onnx).predict`` of each model one after another, per image."""
    try:
        os.environ.setdefault("YOLO_OFFLINE", "1")
        from ultralytics import YOLO
    except ImportError:
        report.notes.append("ultralytics is not installed (train extra): comparison (c) skipped")
        return
    bundle = load_bundle(bundle_path)
    models = [(YOLO(str(bundle.model_path(r)), task=bundle.models[r].task), bundle.models[r].imgsz[0])
              for r in bundle.models]
    paths = [str(f) for f in files]
    for m, size in models:  # warm-up
        m.predict(paths[0], imgsz=size, verbose=False)
    start = time.perf_counter()
    for p in paths:
        for m, size in models:
            m.predict(p, imgsz=size, verbose=False)
    report.rates["ultralytics predict"] = len(paths) / (time.perf_counter() - start)


def run_bench(bundle_path: Path, files: list[Path], repeat: int = 1, skip_ultralytics: bool = False,
              providers: Sequence[str] | None = None, sets: Mapping[str, str] = {}) -> BenchReport:
    """Run (a), (b), (c) on the same images and bundle; see the module docstring.

    ``providers``: what the daemon's engine is given (None: the engine's default order). Part (a)
    always runs on the CPU provider, the baseline, and again on a GPU provider when one is chosen.
    ``sets``: config overrides for the daemon (``engine.run_batch`` say), as ``serve --set`` takes."""
    if len(files) < 2:
        raise ValueError(f"bench: need at least 2 images, got {len(files)}")
    bundle = load_bundle(bundle_path)
    report = BenchReport(len(files), bundle.id, list(bundle.models))
    chosen = select_providers(providers)
    bench_daemon_process(bundle_path, files, report, chosen, sets)
    report.rates["raw onnx sessions"], _ = bench_raw(bundle_path, files, repeat)
    if chosen[0] != "CPUExecutionProvider":
        rate, active = bench_raw(bundle_path, files, repeat, chosen)
        name = active[0].removesuffix("ExecutionProvider")
        report.rates[f"raw onnx sessions on {name}"] = rate
        report.gpu_rate = f"raw onnx sessions on {name}"
        if active[0] != chosen[0]:
            report.notes.append(f"{chosen[0]} was asked for but the sessions run on {', '.join(active)}: "
                                "run `annotator doctor`")
    report.rss_mib["bench process without ultralytics"] = _peak_rss_mib()
    if skip_ultralytics:
        report.notes.append("ultralytics comparison (c) skipped (--no-ultralytics)")
    else:
        bench_ultralytics(bundle_path, files, report)
        if "ultralytics predict" in report.rates:  # it ran: not where it is not installed (the runtime-only venv)
            report.rss_mib["bench process after ultralytics"] = _peak_rss_mib()
    report.notes.append("the daemon decodes JPEGs, judges, writes a sidecar (fsync) per image and one SQLite "
                        "transaction per batch; (a) and (c) do not write anything")
    report.notes.append("drop folder: files arrive by atomic rename, drop.stable_seconds = 0 (no stability wait)")
    return report
