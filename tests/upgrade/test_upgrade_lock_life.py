"""``upgrade.lock`` when its holder is stopped or hung, after the upgrade, and made by another user.

Real processes on a copy of release 31c2004's store (the upgrader of ``test_upgrade_liveness``,
held inside its ``images_by_bundle`` step until ``go``; its waiter, as ``annotator export``
opens the store):

- an upgrader stopped with SIGSTOP (Ctrl-Z of an ``annotator export`` in a terminal): its waiter
  waited for ever without a word, and under systemd asked for more start time for ever; it now
  says so (pid, command line, step, how to resume or end it), sends systemd its STATUS without
  ``EXTEND_TIMEOUT_USEC`` while it is stopped, and says when it is resumed;
- an upgrader that does nothing on one step (hung): named with its state and CPU every
  ``UPGRADE_REMIND_S``;
- ``upgrade.lock`` stayed in the store root after the upgrade (a dead pid and its last step in
  it): removed by the upgrader, and one a kill left by the next open;
- one root made (``sudo annotator export`` with umask 077, mode 600): the service user ran the
  steps without the lock, beside the root upgrade (failing at the busy timeout); it now waits for
  root's program, refuses one nobody holds naming the file, owner and fix, and the file is made
  readable by all.
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from service.store import UPGRADE_LOCK, Store
from test_upgrade_liveness import LIMIT, REPO, Waiter, _env, _messages, _names, _upgrader, as_user

OTHER = "nobody"


def _stat_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[0]


def _stop(proc: subprocess.Popen) -> None:
    """SIGSTOP, returning once the kernel shows it stopped."""
    proc.send_signal(signal.SIGSTOP)
    while _stat_state(proc.pid) not in "Tt":
        pass


def test_a_stopped_upgrader_is_said_and_systemd_gets_no_more_time_while_it_is(old_store: Path, tmp_path: Path,
                                                                             reap: list) -> None:
    """SIGSTOP of the upgrader inside a step: the waiter says it is stopped, naming its pid,
    command line and step and how to resume or end it; under systemd it sends its STATUS without
    ``EXTEND_TIMEOUT_USEC`` while the upgrader stays stopped (HEAD: more time for ever, not a
    word), then asks again once it is resumed, and opens the store when it is done."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "waiter.sock"))
    sock.settimeout(LIMIT)
    try:
        upgrader = _upgrader(old_store)
        reap.append(upgrader)
        _stop(upgrader)
        waiter = Waiter(old_store, NOTIFY_SOCKET=str(tmp_path / "waiter.sock"))
        reap.append(waiter.proc)
        line = waiter.said("is stopped")
        stopped = _messages(sock, "is stopped")
        stopped += [sock.recv(4096).decode() for _ in range(3)]  # and on, while it stays stopped
        upgrader.send_signal(signal.SIGCONT)
        waiter.said(f"pid {upgrader.pid} resumed")
        again = [m for m in _messages(sock, "EXTEND_TIMEOUT_USEC") if "EXTEND_TIMEOUT_USEC" in m]
        (old_store / "go").touch()
        rc, out = waiter.result()
    finally:
        sock.close()
    assert f"pid {upgrader.pid} ({sys.executable} -c " in line and "step 5 of 7: index images_by_bundle" in line, line
    assert f"kill -CONT {upgrader.pid}" in line and f"kill {upgrader.pid}:" in line, line
    last = stopped[[i for i, m in enumerate(stopped) if "is stopped" in m][0]:]
    assert len(last) >= 3 and not [m for m in last if "EXTEND_TIMEOUT_USEC" in m], stopped
    assert f"STATUS=waiting for pid {upgrader.pid}" in last[-1] and "resume or end it" in last[-1], last
    assert "images_by_bundle" in again[-1], again
    assert rc == 0 and out.startswith("opened"), (out, waiter.lines)
    assert upgrader.wait(LIMIT) == 0


def test_a_waiter_names_an_upgrader_doing_nothing_on_one_step(old_store: Path, reap: list) -> None:
    """An upgrader that uses no CPU on its step (hung): each ``UPGRADE_REMIND_S`` (shrunk to 1 s)
    the waiter names it, its step and state (HEAD: one line at the start, then silence)."""
    upgrader = _upgrader(old_store)
    reap.append(upgrader)
    waiter = Waiter(old_store, UPGRADE_REMIND_S="1")
    reap.append(waiter.proc)
    line = waiter.said("still waiting for")
    (old_store / "go").touch()
    assert waiter.result()[0] == 0
    assert f"pid {upgrader.pid} ({sys.executable} -c " in line and "images_by_bundle" in line, line
    assert "it used no CPU in the last 1 s (state S)" in line and f"kill {upgrader.pid}" in line, line


def test_the_upgrade_lock_goes_when_the_upgrade_is_done_and_a_killed_ones_at_the_next_open(
        old_store: Path, reap: list) -> None:
    """The upgrader removes ``upgrade.lock`` when done (HEAD: left with its pid and last step, as
    if an upgrade still ran); one a kill -9 left goes with the waiter that finished the steps, and
    one left on a store already up to date goes with the next open."""
    upgrader = _upgrader(old_store)
    reap.append(upgrader)
    waiter = Waiter(old_store)
    reap.append(waiter.proc)
    waiter.said("waiting for it")
    upgrader.send_signal(signal.SIGKILL)
    upgrader.wait(LIMIT)
    assert waiter.result()[0] == 0
    assert not (old_store / UPGRADE_LOCK).exists(), (old_store / UPGRADE_LOCK).read_text()
    (old_store / UPGRADE_LOCK).write_text("12345\nstep 5 of 7: index images_by_bundle\n")  # a kill's, now done
    Store(old_store).close()
    assert not (old_store / UPGRADE_LOCK).exists()


@pytest.fixture
def others_store(old_store: Path) -> Iterator[Path]:
    """The old store, owned by ``OTHER`` (the service user), where ``OTHER`` can reach it."""
    if os.getuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv: a lock file another user made")
    try:
        user = pwd.getpwnam(OTHER)
    except KeyError:
        pytest.skip(f"no user {OTHER}")
    probe = subprocess.run([*as_user(OTHER), sys.executable, "-c", "import service.store"], cwd=REPO, env=_env(),
                           capture_output=True, text=True, timeout=LIMIT)
    if probe.returncode != 0:  # a checkout in a private folder (mktemp -d makes one 0700, as CI's clone)
        pytest.skip(f"{OTHER} cannot run this checkout's code at {REPO}: {probe.stderr.strip()[-200:]}")
    top = Path(tempfile.mkdtemp(prefix="upgrade-other-user-"))
    try:
        os.chmod(top, 0o755)
        root = top / "store"
        shutil.copytree(old_store, root)
        for folder, _, files in os.walk(root):
            for name in [folder, *(os.path.join(folder, f) for f in files)]:
                os.chown(name, user.pw_uid, user.pw_gid)
        yield root
    finally:
        shutil.rmtree(top)


def test_the_service_user_waits_for_roots_upgrade_whose_lock_file_it_may_not_read(others_store: Path,
                                                                                 reap: list) -> None:
    """``sudo annotator export`` (umask 077) upgrading the service user's store: its lock file is
    readable by all now (HEAD: mode 600); one of mode 600 all the same is waited on while root's
    program holds it, naming root's pid (HEAD: the service user's program ran the steps without the
    lock and failed at its busy timeout, 'database is locked')."""
    upgrader = _upgrader(others_store, umask=0o077)
    reap.append(upgrader)
    lock = others_store / UPGRADE_LOCK
    mode = lock.stat().st_mode & 0o777
    lock.chmod(0o600)
    waiter = Waiter(others_store, user=OTHER)
    reap.append(waiter.proc)
    line = waiter.said("waiting for it")
    alive = waiter.outlives(2.0)
    (others_store / "go").touch()
    rc, out = waiter.result()
    assert mode == 0o644, oct(mode)
    assert f"pid {upgrader.pid} (" in line, line
    assert alive and rc == 0 and out.startswith("opened"), "\n".join([out, *waiter.lines])
    assert upgrader.wait(LIMIT) == 0 and not lock.exists()


def test_another_users_lock_file_nobody_holds_is_refused_naming_it_and_the_fix(others_store: Path) -> None:
    """A mode-600 ``upgrade.lock`` of root's that nobody holds (root's upgrade killed): the
    service user's ``annotator export`` refuses in one line naming the file, its owner and the fix
    (HEAD: it ran the steps without the lock, where a second program of its own could do the same)."""
    lock = others_store / UPGRADE_LOCK
    lock.write_text("1\nstep 5 of 7: index images_by_bundle\n")
    lock.chmod(0o600)
    got = subprocess.run([*as_user(OTHER), sys.executable, "-m", "service.cli", "export", "--set",
                          f"store.root={others_store}", "--coco", str(others_store / "export.json")],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=LIMIT)
    assert got.returncode == 2, (got.stdout, got.stderr)
    last = got.stderr.strip().splitlines()[-1]
    assert last.startswith("annotator export: error: store ") and str(lock) in last, got.stderr
    assert "belongs to root, mode 600" in last and f"sudo chown {OTHER} {lock}" in last, last
    assert "images_by_bundle" not in _names(others_store / "store.sqlite3")  # nothing done without the lock
