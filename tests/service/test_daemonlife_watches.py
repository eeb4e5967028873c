"""The drop folder's inotify watches (daemon-life audit).

- ``processed/`` mirrors every recording folder (``<camera>/<session>/``) ever taken and keeps it,
  and the recursive watch held one inotify watch for each: 2000 recordings, 4013 watches (2005
  with the fix), against a per-user limit of 8192 on kernels before 5.11;
- past the limit ``DropFolder.start`` raised ENOSPC, so ``annotator serve`` did not start at all
  (and systemd restarted it for ever); now the files are found by the full walks, said once.

The limit is lowered for real in a user namespace (``unshare -Ur``: ``user.max_inotify_watches``
is per namespace since Linux 5.11); watches are counted in ``/proc/self/fdinfo``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from service.dropfolder import DropFolder

ROOT = Path(__file__).resolve().parents[2]


def _watches() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fdinfo"):
        try:
            with open(f"/proc/self/fdinfo/{fd}") as f:
                n += sum(1 for line in f if line.startswith("inotify wd:"))
        except OSError:
            pass
    return n


def _jpeg() -> bytes:
    return cv2.imencode(".jpg", np.full((16, 16, 3), 90, np.uint8))[1].tobytes()


def _drop(path: Path, data: bytes) -> None:
    tmp = path.with_name("." + path.name)
    tmp.write_bytes(data)
    os.rename(tmp, path)


@pytest.mark.skipif(not Path("/proc/self/fdinfo").is_dir(), reason="Linux inotify")
def test_processed_and_quarantine_folders_hold_no_inotify_watch(tmp_path: Path) -> None:
    root = tmp_path / "drop"
    for i in range(60):  # 60 recordings taken earlier: their empty folders and their mirrors
        (root / f"cam{i % 3}" / f"s{i}").mkdir(parents=True)
        (root / "processed" / f"cam{i % 3}" / f"s{i}").mkdir(parents=True)
        (root / "processed" / f"cam{i % 3}" / f"s{i}" / "f.jpg").write_bytes(b"x")
    (root / "quarantine" / "cam0" / "s0").mkdir(parents=True)
    live = sum(1 for _ in os.walk(root)) - sum(1 for _ in os.walk(root / "processed")) \
        - sum(1 for _ in os.walk(root / "quarantine"))  # the drop folder, 3 cameras, 60 recordings
    taken: list[str] = []
    folder = DropFolder(root, lambda data, source, meta, decoded: taken.append(meta["path"]),
                        stable_seconds=0.0, poll_interval=0.05)
    folder._walk = lambda: []  # type: ignore[method-assign]  # only events find files here
    before = _watches()
    folder.start()
    try:
        assert _watches() - before == live == 64  # 131 on HEAD: processed/ and quarantine/ too
        (root / "processed" / "cam9" / "new").mkdir(parents=True)  # made while it runs: not watched either
        (root / "cam9" / "new").mkdir(parents=True)  # a new camera and recording: watched
        deadline = time.monotonic() + 30
        while _watches() - before < live + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        _drop(root / "cam9" / "new" / "a.jpg", _jpeg())
        while not taken and time.monotonic() < deadline:
            time.sleep(0.05)
        assert taken == ["cam9/new/a.jpg"]
        assert _watches() - before == live + 2
        assert (root / "processed" / "cam9" / "new" / "a.jpg").is_file()
    finally:
        folder.stop()


OVER_LIMIT = r'''
import logging, os, sys, time
from pathlib import Path
import cv2, numpy as np
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
from service.dropfolder import DropFolder
root = Path(sys.argv[1])
for i in range(40):  # 45 folders to watch, 20 watches allowed
    (root / f"cam{i % 4}" / f"s{i}").mkdir(parents=True)
taken = []
folder = DropFolder(root, lambda data, source, meta, decoded: taken.append(meta["path"]), stable_seconds=0.0,
                    poll_interval=0.05)
folder.start()
data = cv2.imencode(".jpg", np.full((16, 16, 3), 90, np.uint8))[1].tobytes()
(root / "cam0" / "s0" / "a.jpg").write_bytes(data)
folder.request_full_scan()  # the walk every 30-600 s, now
deadline = time.monotonic() + 30
while not taken and time.monotonic() < deadline:
    time.sleep(0.05)
folder._keep_watching()  # not again within the hour: no second warning
print("TAKEN", taken, "LOST", folder.watch_lost is not None, flush=True)
folder.stop()
'''


def test_a_drop_folder_with_more_folders_than_inotify_watches_still_starts(tmp_path: Path) -> None:
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) not installed")
    probe = subprocess.run(["unshare", "-Ur", "sh", "-c", "echo 20 > /proc/sys/user/max_inotify_watches"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot lower the inotify limit in a user namespace: {probe.stderr.decode().strip()}")
    script = tmp_path / "over.py"
    script.write_text(OVER_LIMIT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(["unshare", "-Ur", "sh", "-c", 'echo 20 > /proc/sys/user/max_inotify_watches && exec "$@"',
                           "sh", sys.executable, str(script), str(tmp_path / "drop")],
                          capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out  # HEAD: OSError [Errno 28] inotify watch limit reached, from start()
    assert "TAKEN ['cam0/s0/a.jpg'] LOST True" in out, out
    warnings = [line for line in out.splitlines() if line.startswith("WARNING service.dropfolder")]
    assert len(warnings) == 1, out
    assert "45 folders to watch, fs.inotify.max_user_watches is 20" in warnings[0]
    assert "raise the limit" in warnings[0] and "Traceback" not in out


RETRIES = r'''
import logging, os, sys
from pathlib import Path
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
from service.dropfolder import DropFolder
root = Path(sys.argv[1])
for i in range(40):
    (root / f"cam{i % 4}" / f"s{i}").mkdir(parents=True)

def inotify_fds():
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify"
        except OSError:
            pass
    return n

folder = DropFolder(root, lambda *a: None, stable_seconds=0.0, poll_interval=0.05)
folder.start()
before = inotify_fds()
for _ in range(30):  # the hourly retry, 30 times
    folder._observer.stop()
    folder._watch()
print("LOST", folder.watch_lost is not None, "LEAKED", inotify_fds() - before, flush=True)
print("SAID", folder.watch_lost, flush=True)
folder.stop()
'''


def _in_namespace(tmp_path: Path, limits: str, script: str) -> str:
    """``script`` run with the user-namespace inotify ``limits`` (``name=value ...``), its output."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) not installed")
    sets = " && ".join(f"echo {v} > /proc/sys/user/max_inotify_{k}" for k, v in
                       (item.split("=") for item in limits.split()))
    probe = subprocess.run(["unshare", "-Ur", "sh", "-c", sets], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot lower the inotify limits in a user namespace: {probe.stderr.decode().strip()}")
    path = tmp_path / "script.py"
    path.write_text(script)
    done = subprocess.run(["unshare", "-Ur", "sh", "-c", sets + ' && exec "$@"', "sh", sys.executable, str(path),
                           str(tmp_path / "drop")], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120, cwd=ROOT)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    return out


def test_a_watch_retried_past_the_limit_leaks_no_inotify_instance(tmp_path: Path) -> None:
    """Each failed retry left its inotify instance open (watchdog 7.1.1 closes a reader only
    once its thread has read): 300 retries held 78, and at 128 instances a user's every inotify
    program fails (the daemon's own retries then raised EMFILE)."""
    out = _in_namespace(tmp_path, "watches=20", RETRIES)
    assert "LOST True LEAKED 0" in out, out


def test_no_inotify_instance_to_spare_still_starts_and_names_the_instance_limit(tmp_path: Path) -> None:
    """No instance left (other programs hold them): ``schedule`` raised EMFILE outside the
    fallback and ``annotator serve`` exited; the message then named the watch limit."""
    out = _in_namespace(tmp_path, "instances=0", RETRIES)
    assert "LOST True LEAKED 0" in out, out
    assert "fs.inotify.max_user_instances is 0" in out and "max_user_watches" not in out.split("SAID", 1)[1], out
