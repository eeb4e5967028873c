"""``annotator demo``: the main job, end to end, on an embedded default. Nothing to configure.

One process tree, no network beyond loopback:

1. write ``<out>/annotator.toml``: store ``<out>/store``, drop folder ``<out>/drop``, sidecars
   ``<out>/annotations``, gRPC on ``127.0.0.1`` port 0, judge defaults from the bundle, and
   ``[sync]`` with ``[sync.target] kind = "local"`` at ``<out>/bucket`` standing in for the S3
   bucket (review kind "none": the uploader alone writes images, pre-annotations and the
   Ground Truth input manifest);
2. copy the shipped sample images into the drop folder (rename into place);
3. run the real daemon (``service.server.serve``: store, engine, judge, drop-folder watcher,
   gRPC server) in a thread until every sample is annotated (auto-accepted or review-pending),
   with a progress bar;
4. run the sync agent once (``sync.agent.build_agent(...).run(once=True)``, what
   ``annotator sync --once`` does), then stop the daemon the way SIGTERM would;
5. print the per-image table and summary, write ``annotated/*.png`` and ``contact_sheet.png``
   (``sync.demo_report``).

Re-running into the same folder is idempotent: the store recognises the images by content (they
are not annotated again; the table shows the stored results) and the uploader sends nothing it
sent before, so the bucket gets no duplicates. ``--fresh`` removes what an earlier demo wrote
in the folder and starts over.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)

CONFIG_NAME = "annotator.toml"
MARKER = "# written by `annotator demo`"
# What the demo writes under <out>; --fresh removes exactly these.
DEMO_ENTRIES = (CONFIG_NAME, "store", "drop", "annotations", "annotated", "bucket", "contact_sheet.png")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
APPLIANCE_ID = "demo"


@dataclass(frozen=True)
class DemoOptions:
    """``out``: the demo folder; ``bundle``: a bundle directory; ``samples``: images to annotate;
    ``timeout``: seconds to wait for the annotations before giving up."""

    out: Path
    bundle: Path
    samples: Path
    fresh: bool = False
    timeout: float = 100.0
    quiet_logs: bool = True


def config_text(out: Path, bundle: Path) -> str:
    """The demo's TOML file; relative paths are relative to ``out`` (the file's folder)."""
    return f"""{MARKER}; rewritten on every run. Use it with `annotator serve --config` and
# `annotator sync --once --config` to run the same appliance by hand.
[server]
listen = "127.0.0.1:0"

[store]
root = "store"
min_free_mb = 50

[drop]
folder = "drop"
processed_mode = "delete"   # the store keeps the bytes; the drop folder is only a way in
stable_seconds = 0.2        # files are renamed into place, so they are stable at once
poll_interval = 0.2

[engine]
bundle = "{bundle.as_posix()}"

[outputs]
sidecar_dir = "annotations"

# [judge]: nothing set, so the score threshold and audit fraction are the bundle's defaults.

[sync]
appliance_id = "{APPLIANCE_ID}"
poll_interval = 1.0
retry_attempts = 3

[sync.target]
kind = "local"              # a folder laid out exactly like the S3 bucket
root = "bucket"

[sync.review]
kind = "none"               # uploads only; no labelling job is started
"""


def sample_files(samples: Path) -> list[Path]:
    """The sample images, sorted by name; ``FileNotFoundError`` when there are none."""
    files = sorted(p for p in samples.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if samples.is_dir() else []
    if not files:
        raise FileNotFoundError(f"no sample images (*.jpg, *.png) in {samples}")
    return files


def prepare_folder(opts: DemoOptions) -> Path:
    """Create ``out`` (or clear an earlier demo's files with ``fresh``) and write the config."""
    from service.bundle import load_bundle
    from service.durable import write_bytes_atomic
    from service.errors import ConfigError

    if not (opts.bundle / "bundle.json").is_file():
        raise FileNotFoundError(f"no bundle at {opts.bundle} (bundle.json missing); pass --bundle DIR "
                                "(e.g. one written by `annotator train`)")
    load_bundle(opts.bundle)  # checksums and declared shapes: a clear error before anything starts
    out = opts.out
    config = out / CONFIG_NAME
    if config.exists() and not config.read_text(encoding="utf-8").startswith(MARKER):
        raise ConfigError(f"{config} exists and was not written by the demo; choose another --out")
    if opts.fresh:
        if not config.exists() and any((out / name).exists() for name in DEMO_ENTRIES):
            raise ConfigError(f"--fresh: {out} holds no demo config ({CONFIG_NAME}); refusing to remove anything there")
        for name in DEMO_ENTRIES:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        print(f"--fresh: removed the earlier demo's files from {out}")
    out.mkdir(parents=True, exist_ok=True)
    # Made here, before the daemon starts: the daemon's first-start rule made it too, but with a
    # warning that drop.folder may be wrong, at every fresh demo.
    (out / "drop").mkdir(exist_ok=True)
    write_bytes_atomic(config, config_text(out, opts.bundle.resolve()).encode("utf-8"))
    return config


def stage_samples(files: Sequence[Path], drop: Path) -> dict[str, Path]:
    """Copy ``files`` into ``drop`` by the rename-into-place convention; ``{image_id: sample}``."""
    drop.mkdir(parents=True, exist_ok=True)
    ids: dict[str, Path] = {}
    for f in files:
        data = f.read_bytes()
        ids[hashlib.sha256(data).hexdigest()] = f
        tmp = drop / f".{f.name}.tmp"
        tmp.write_bytes(data)
        tmp.replace(drop / f.name)
    return ids


def already_annotated(store_root: Path, files: Sequence[Path]) -> int:
    """How many of ``files`` an earlier run annotated already (0 when there is no store yet)."""
    from service.store import RECEIVED, Store

    if not (store_root / "store.sqlite3").is_file():
        return 0
    store = Store(store_root)
    try:
        rows = [store.get(hashlib.sha256(f.read_bytes()).hexdigest()) for f in files]
    finally:
        store.close()
    return sum(1 for r in rows if r is not None and r.state != RECEIVED)


class _DaemonThread:
    """``service.server.serve`` in a thread; ``stop()`` does what SIGTERM does to the process."""

    def __init__(self, config_path: Path) -> None:
        from service.config import load_config

        self.config = load_config(config_path, env={})  # the demo's file only, no ANNOTATOR_* surprises
        self.ready = threading.Event()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="demo-daemon", daemon=True)

    def _run(self) -> None:
        from service.server import serve

        try:
            serve(self.config, ready=self.ready, stop=self._stop)
        except BaseException as exc:  # handed to the main thread, which raises it
            self.error = exc
        finally:
            self.ready.set()

    def start(self) -> None:
        self._thread.start()
        self.ready.wait()
        if self.error is not None:
            raise self.error

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("the daemon did not stop within %.0f s", timeout)


def wait_annotated(store_root: Path, ids: Sequence[str], drop: Path, daemon: _DaemonThread, timeout: float) -> None:
    """Block until every image in ``ids`` has left ``received`` and the drop folder is empty of
    staged files; a progress bar on stderr. ``SyncError`` after ``timeout`` seconds."""
    from service.store import RECEIVED, Store

    from .demo_report import progress_bar
    from .errors import SyncError

    store = Store(store_root)
    deadline = time.monotonic() + timeout
    shown = -1
    try:
        while True:
            rows = [store.get(i) for i in ids]
            done = sum(1 for r in rows if r is not None and r.state != RECEIVED)
            waiting = [p for p in drop.iterdir() if p.is_file() and not p.name.startswith(".")]
            if done != shown:
                progress_bar("annotating", done, len(ids))
                shown = done
            if done == len(ids) and not waiting:
                sys.stderr.write("\n")
                return
            if not daemon.alive():
                raise SyncError(f"the daemon stopped early: {daemon.error or 'see the log'}")
            if time.monotonic() > deadline:
                sys.stderr.write("\n")
                raise SyncError(f"{len(ids) - done} of {len(ids)} images not annotated after {timeout:.0f} s")
            time.sleep(0.1)
    finally:
        store.close()


def run_sync_once(config_path: Path) -> None:
    """``annotator sync --once --config <config_path>`` in this process."""
    from .agent import build_agent
    from .config import load_sync_config
    from .errors import PermanentError

    agent = build_agent(load_sync_config(config_path, env={}), env={})
    agent.run(once=True)
    if agent.last_error is not None:
        raise PermanentError(f"sync left work behind: {agent.last_error}")


def run_demo(opts: DemoOptions) -> int:
    """The whole demo (module docstring); returns the process exit code."""
    from .demo_report import bucket_objects, report

    t0 = time.perf_counter()
    config = prepare_folder(opts)
    files = sample_files(opts.samples)
    daemon = _DaemonThread(config)
    store_root, drop = Path(daemon.config.store.root), Path(daemon.config.drop.folder or opts.out / "drop")
    bucket = opts.out / "bucket"
    print(f"demo folder {opts.out}: config {config.name}, store, drop folder, sidecars, bucket (a local folder "
          f"standing in for S3)")
    known = already_annotated(store_root, files)
    if known:
        print(f"{known} of {len(files)} sample images are in the store from an earlier run: the daemon recognises "
              "them and does not annotate them again (--fresh starts over)")
    daemon.start()
    try:
        before_sync = bucket_objects(bucket)
        ids = stage_samples(files, drop)
        print(f"daemon up (bundle {daemon.config.engine.bundle}); {len(ids)} sample images dropped into {drop}")
        wait_annotated(store_root, list(ids), drop, daemon, opts.timeout)
        t_annotated = time.perf_counter()
        run_sync_once(config)
    finally:
        daemon.stop()
    if daemon.error is not None:
        raise daemon.error
    report(opts.out, store_root, ids, opts.bundle, bucket, before_sync, APPLIANCE_ID)
    print(f"done in {time.perf_counter() - t0:.1f} s (annotation {t_annotated - t0:.1f} s); "
          f"run it again: the store and the bucket recognise what they already have")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The ``demo`` subcommand's handler."""
    from service.cli_daemon import DEMO_BUNDLE

    samples = Path(args.samples) if args.samples else DEMO_BUNDLE.parent / "samples"
    opts = DemoOptions(Path(args.out), Path(args.bundle or DEMO_BUNDLE), samples, args.fresh, args.timeout,
                       quiet_logs=not getattr(args, "verbose", False))
    if opts.quiet_logs:  # the table is the output; the components' INFO lines would bury it
        for name in ("service", "sync", "annotator"):
            logging.getLogger(name).setLevel(logging.WARNING)
    return run_demo(opts)


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> argparse.ArgumentParser:
    """Add ``demo`` to an ``annotator`` subparsers object (``service.cli`` wires it in)."""
    s = subparsers.add_parser("demo", help="run the appliance end to end on the sample images and the demo "
                                           "bundle, with a local folder as the bucket (no set-up needed)")
    s.add_argument("--out", default="demo-out", help="demo folder (default: demo-out); a re-run reuses it")
    s.add_argument("--bundle", help="bundle directory (default: the shipped demo bundle)")
    s.add_argument("--samples", help="folder of images to annotate (default: the shipped sample images)")
    s.add_argument("--fresh", action="store_true", help="remove what an earlier demo wrote in --out first")
    s.add_argument("--timeout", type=float, default=100.0, help="seconds to wait for the annotations")
    s.set_defaults(func=cmd_demo)
    return s
