"""A real Label Studio server on loopback for the tests (from the separate ``.venv-ls``).

Started with a clean environment as ``shared/LABEL_STUDIO.md`` describes (token auth with the
legacy token, local files served from ``document_root``, webhooks to loopback allowed, no
outbound traffic), on a free port bound to 127.0.0.1; stopped with SIGTERM.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol, TypeVar

REPO = Path(__file__).resolve().parents[2]
LS_BIN = REPO / ".venv-ls" / "bin" / "label-studio"
USER, PASSWORD, TOKEN = "reviewer@example.com", "review-pass-1", "edge-test-token-1234"


class _Closable(Protocol):
    def close(self) -> None: ...


W = TypeVar("W", bound=_Closable)


def submit_all(store: Any, backend: Any, outbox: Path) -> Any:
    """Upload ``store``'s review images (into a local folder ``outbox``) and submit them to the
    review ``backend`` until nothing is left, as the sync agent's two tasks do; the uploader,
    for the test's world to close (the set-up the Label Studio test worlds shared)."""
    from sync.objectstore import LocalFolderStore
    from sync.submit import ReviewSubmitTask
    from sync.uploader import Uploader, UploadSettings

    uploader = Uploader(store, LocalFolderStore(outbox), UploadSettings("box-1"))
    submit = ReviewSubmitTask(uploader.journal, store, uploader.target, backend)
    while uploader.run_once() | submit.run_once():
        pass
    return uploader


def close_all(*things: Any) -> None:
    """Close a world's dataset, uploader, store (...) in this order; None (never opened) skipped."""
    for thing in things:
        if thing is not None:
            thing.close()


def opened(world: W) -> Iterator[W]:
    """A fixture's body (``yield from opened(World(...))``): the world, closed after the test."""
    try:
        yield world
    finally:
        world.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LabelStudioServer:
    url: str
    token: str
    user: str
    document_root: Path
    proc: subprocess.Popen
    log_path: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start(base: Path, timeout: float = 240.0) -> LabelStudioServer:
    """Start Label Studio with its data under ``base``; raises RuntimeError with the log tail."""
    for sub in ("home", "data", "docroot"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(base / "home"),
           "LABEL_STUDIO_BASE_DATA_DIR": str(base / "data"),
           "LABEL_STUDIO_USERNAME": USER, "LABEL_STUDIO_PASSWORD": PASSWORD, "LABEL_STUDIO_USER_TOKEN": TOKEN,
           "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
           "LOCAL_FILES_SERVING_ENABLED": "true", "LOCAL_FILES_DOCUMENT_ROOT": str(base / "docroot"),
           "SSRF_PROTECTION_ENABLED": "false", "LATEST_VERSION_CHECK": "false", "SENTRY_DSN": "",
           "FRONTEND_SENTRY_DSN": "", "COLLECT_ANALYTICS": "false", "SECRET_KEY": "edge-tests-only"}
    log_path = base / "label-studio.log"
    with open(log_path, "wb") as log, open(os.devnull, "rb") as stdin:
        proc = subprocess.Popen([str(LS_BIN), "start", "--no-browser", "--internal-host", "127.0.0.1",
                                 "--port", str(port)], env=env, cwd=base, stdin=stdin, stdout=log,
                                stderr=subprocess.STDOUT)
    server = LabelStudioServer(f"http://127.0.0.1:{port}", TOKEN, USER, base / "docroot", proc, log_path)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=2) as resp:
                if json.loads(resp.read()).get("status") == "UP":
                    return server
        except (urllib.error.URLError, OSError, ValueError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"Label Studio did not become healthy on {server.url}:\n{tail}")
        time.sleep(0.5)
