"""``serve.lock`` made by root (``sudo annotator serve`` once), then used by the service user
(daemon-life audit; real processes, the service user being ``nobody``).

- made with umask 022 (0644): the service user holds it (flock needs no write) but cannot write
  its pid there, so a second daemon was told root's long-gone pid; the kernel's record of the
  lock (``/proc/locks``) names the holder now, in both orders;
- made with umask 077 (0600): the service user cannot open it at all, and ``serve`` went on
  without the lock: two daemons served one store (both "annotator serving on port ..."); now it
  refuses with what to do.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOBODY = 65534

pytestmark = pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0 or not Path("/proc/locks").exists(),
                                reason="needs root (to act as root, then as nobody) and Linux")

AS = r'''
import os, pwd, sys
from pathlib import Path
from service.cli_daemon import _hold_store
from service.errors import ConfigError
from service.lockfile import Held, hold
user, what, path = sys.argv[1:4]
if user != "root":  # modules are loaded: the interpreter's own folders may be closed to nobody
    os.setgid(65534); os.setgroups([]); os.setuid(65534)
if what == "hold":
    fd = hold(Path(path))
    print("HOLDS", os.getpid(), flush=True)
    sys.stdin.read()  # until the test closes it
elif what == "try":
    try:
        hold(Path(path))
        print("HOLDS", os.getpid(), flush=True)
    except Held as exc:
        print("HELD", exc.pid, flush=True)
else:
    try:
        print("LOCKED", _hold_store(Path(path)) is not None, flush=True)
    except ConfigError as exc:
        print("REFUSED", exc, flush=True)
'''


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _run(tmp_path: Path, user: str, what: str, path: Path) -> str:
    script = tmp_path / "as.py"
    script.write_text(AS)
    return subprocess.run([sys.executable, str(script), user, what, str(path)], capture_output=True, text=True,
                          env=_env(), timeout=60, cwd=ROOT).stdout.strip()


def _holder(tmp_path: Path, user: str, path: Path) -> tuple[subprocess.Popen[str], str]:
    script = tmp_path / "as.py"
    script.write_text(AS)
    proc = subprocess.Popen([sys.executable, str(script), user, "hold", str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    assert line[:1] == ["HOLDS"], line
    return proc, line[1]


@pytest.fixture
def store() -> Iterator[Path]:
    """A store folder of nobody's, where nobody can reach it (pytest's tmp_path is under a 0700 folder)."""
    top = Path(tempfile.mkdtemp(prefix="daemonlife-lock-"))
    os.chmod(top, 0o755)
    (top / "store").mkdir()
    os.chown(top / "store", NOBODY, -1)
    yield top / "store"
    shutil.rmtree(top, ignore_errors=True)


@pytest.mark.parametrize("first", ["root", "nobody"])
def test_a_second_daemon_is_told_the_pid_of_the_holder_whoever_made_the_lock_file(tmp_path: Path, store: Path,
                                                                                   first: str) -> None:
    lock = store / "serve.lock"
    old = os.umask(0o022)
    try:
        made = _run(tmp_path, first, "try", lock)  # the one-off run that made the file and left its pid
    finally:
        os.umask(old)
    assert made.startswith("HOLDS") and lock.read_text().split() == [made.split()[1]]
    second = "nobody" if first == "root" else "root"
    for holder_user, contender in ((second, "nobody"), (second, "root"), ("nobody", "nobody")):
        holder, pid = _holder(tmp_path, holder_user, lock)
        try:
            # HEAD (root first): "HELD <the pid of root's one-off run>", which ended long ago
            assert _run(tmp_path, contender, "try", lock) == f"HELD {pid}", (first, holder_user, contender)
        finally:
            holder.communicate("", timeout=30)


def test_serve_refuses_a_lock_file_it_cannot_open_instead_of_running_unlocked(tmp_path: Path, store: Path) -> None:
    lock = store / "serve.lock"
    lock.write_text("1\n")
    os.chmod(lock, 0o600)  # root's `annotator serve` with umask 077
    out = _run(tmp_path, "nobody", "serve", store)
    # HEAD: "LOCKED False": serve went on without the lock, and a second daemon was not refused
    assert out.startswith(f"REFUSED store.root: this user may not open {lock}"), out
    assert f"sudo chown nobody {lock}" in out and f"sudo rm {lock}" in out and "belongs to root" in out
    os.chown(lock, NOBODY, -1)  # what it says to do
    assert _run(tmp_path, "nobody", "serve", store) == "LOCKED True"
