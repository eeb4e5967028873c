"""Waiting for another program's upgrade of an old store as long as that program runs (``Store._upgrade``).

The upgrade of the store of an older release (``tests/upgrade/fixtures/release-31c2004``) runs
in committed steps; other programs that open the store meanwhile (the sync agent, ``annotator
export``, a second daemon) waited and gave up when no step was done for five minutes
(``UPGRADE_STALL_S``), saying "database is locked ... a running daemon never holds it this long"
while the upgrader was alive and building one index of millions of images on a slow card. Now
the upgrader holds ``upgrade.lock`` (a flock, pid and step written in it) and waiters wait as
long as it is held; a write lock with no upgrade behind it (an ``sqlite3`` shell) still ends the
wait at the busy timeout, and a kill -9 of the upgrader lets the next opener take up its steps.

Real processes: the upgrader stops inside its ``images_by_bundle`` step (a trace callback, write
lock held) until the test lets it go or kills it; the waiter runs with HEAD's stall bound shrunk
to 1 s (its hook, ignored now), so a step longer than that outlasted it; facing the shell it
keeps HEAD's five minutes.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from test_upgrade_store_layout import _states

REPO = Path(__file__).resolve().parents[2]
STEP = "CREATE INDEX IF NOT EXISTS images_by_bundle"
LIMIT = 60.0  # the most any wait below takes on a loaded box (a guard, not a measure)

UPGRADER = """
import os, sys, time
import service.sqlite, service.systemd
service.systemd.EXTEND_EVERY_S = 0.2
plain = service.sqlite.connect
root, step = sys.argv[1], sys.argv[2]
def connect(*args, **kwargs):
    conn = plain(*args, **kwargs)
    def trace(statement):
        if step in statement:  # the write lock is held (BEGIN IMMEDIATE): one long step
            open(os.path.join(root, "in-step"), "w").close()
            while not os.path.exists(os.path.join(root, "go")):
                time.sleep(0.05)
    conn.set_trace_callback(trace)
    return conn
service.sqlite.connect = connect
from service.store import Store
Store(root).close()
print("upgraded", flush=True)
"""

WAITER = """
import json, logging, os, sqlite3, sys
import service.store, service.systemd
from service.sqlite import open_failure
logging.basicConfig(level=logging.INFO, format="%(message)s")
if len(sys.argv) > 2:  # HEAD's bound of five minutes, shrunk: the step outlasts it
    service.store.UPGRADE_STALL_S = float(sys.argv[2])
service.systemd.EXTEND_EVERY_S = 0.2
service.store.UPGRADE_REMIND_S = float(os.environ.get("UPGRADE_REMIND_S", "300"))
try:
    store = service.store.Store(sys.argv[1], busy_timeout_ms=200)
except sqlite3.OperationalError as exc:  # what ``open_existing`` says (annotator export, show, prune)
    print(f"annotator export: {open_failure('store', sys.argv[1], exc)}", flush=True)
    sys.exit(1)
print("opened", json.dumps({k: v for k, v in store.counts().items() if v}), flush=True)
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    return {**env, "PYTHONPATH": str(REPO), **extra}


def _names(db_path: Path) -> set[str]:
    db = sqlite3.connect(db_path)
    try:
        return {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
    finally:
        db.close()


def _upgrader(root: Path, umask: int = -1, **env: str) -> subprocess.Popen:
    """An upgrader stopped inside its ``images_by_bundle`` step (write lock held), until ``go``."""
    proc = subprocess.Popen([sys.executable, "-c", UPGRADER, str(root), STEP], env=_env(**env),
                            stdout=subprocess.PIPE, text=True, umask=umask)
    deadline = time.monotonic() + LIMIT
    while not (root / "in-step").exists():
        assert proc.poll() is None, "the upgrader ended before its step"
        assert time.monotonic() < deadline, "the upgrader never reached its step"
        time.sleep(0.05)
    return proc


class Waiter:
    """A second program opening the store (as ``annotator export`` does), its stderr read as it comes."""

    def __init__(self, root: Path, stall: str = "1.0", user: str | None = None, **env: str) -> None:
        """``stall``: HEAD's bound on a wait without a step done ("": its five minutes); ``user``:
        run as that user (root only)."""
        self.proc = subprocess.Popen([*as_user(user), sys.executable, "-c", WAITER, str(root),
                                      *([stall] if stall else [])],
                                     env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._eof = False
        self._said = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._said:
                self.lines.append(line.rstrip("\n"))
                self._said.notify_all()
        with self._said:
            self._eof = True
            self._said.notify_all()

    def said(self, text: str) -> str:
        """The first line of its log with ``text``, waiting for it while the waiter runs."""
        with self._said:
            ok = self._said.wait_for(lambda: any(text in line for line in self.lines) or self._eof,
                                     LIMIT)
            found = [line for line in self.lines if text in line]
        assert ok and found, f"the waiter never said {text!r}: rc={self.proc.poll()} {self.lines}"
        return found[0]

    def outlives(self, seconds: float) -> bool:
        """Whether it is still waiting ``seconds`` from now (several times HEAD's shrunk bound)."""
        try:
            self.proc.wait(seconds)
            return False
        except subprocess.TimeoutExpired:
            return True

    def result(self) -> tuple[int, str]:
        """(exit status, stdout) once it ends; ``TimeoutExpired`` if it still waits after ``LIMIT``."""
        assert self.proc.stdout is not None
        self.proc.wait(LIMIT)
        return self.proc.returncode, self.proc.stdout.read()


def as_user(user: str | None) -> list[str]:
    """The command prefix that runs a command as ``user`` (root only; None: as this one). setpriv,
    as Popen's own ``user=`` may not run the interpreter (a venv linking into root's home)."""
    if user is None:
        return []
    import pwd
    return ["setpriv", f"--reuid={user}", f"--regid={pwd.getpwnam(user).pw_gid}", "--clear-groups"]


def _upgrader_and_waiter(old_store: Path, reap: list) -> tuple[Counter, subprocess.Popen, "Waiter", str, bool]:
    """An upgrader stopped inside a step and a waiter that said it waits and has outlived HEAD's
    bound three times: (the rows per state before, the upgrader, the waiter, its line, alive)."""
    states = _states(old_store / "store.sqlite3")
    upgrader = _upgrader(old_store)
    reap.append(upgrader)
    waiter = Waiter(old_store)
    reap.append(waiter.proc)
    line = waiter.said("waiting for it")
    return states, upgrader, waiter, line, waiter.outlives(3.0)


def test_a_waiter_waits_while_the_upgrader_runs_however_long_its_step(old_store: Path, reap: list) -> None:
    """One step longer than the stall bound: the waiter (a second program) waits on, naming the
    upgrader's pid and its step, and opens the upgraded store once the upgrader is done (it said
    "database is locked ... a running daemon never holds it this long" and exited)."""
    db_path = old_store / "store.sqlite3"
    states, upgrader, waiter, line, alive = _upgrader_and_waiter(old_store, reap)
    (old_store / "go").touch()
    rc, out = waiter.result()
    assert alive, f"the waiter gave up while the upgrader ran: rc={rc} {out!r} {waiter.lines}"
    assert f"pid {upgrader.pid} " in line and "images_by_bundle" in line, line
    assert rc == 0 and out.startswith("opened"), (out, waiter.lines)
    assert upgrader.wait(LIMIT) == 0
    assert {"images_by_bundle", "images_by_camera", "state_counts"} <= _names(db_path)
    assert _states(db_path) == states


def test_kill_9_of_the_upgrader_mid_step_hands_the_steps_to_the_waiter(old_store: Path, reap: list) -> None:
    """``kill -9`` of the upgrader inside a step: the kernel drops its locks, the waiter, which
    waited as long as it ran, takes up the steps left and opens the store with every row."""
    db_path = old_store / "store.sqlite3"
    states, upgrader, waiter, _, alive = _upgrader_and_waiter(old_store, reap)
    upgrader.send_signal(signal.SIGKILL)
    assert upgrader.wait(LIMIT) == -signal.SIGKILL
    rc, out = waiter.result()
    assert alive, f"the waiter gave up while the upgrader ran: rc={rc} {out!r} {waiter.lines}"
    assert rc == 0 and out.startswith("opened"), (out, waiter.lines)
    waiter.said("bringing a store of an earlier release up")  # the steps left, done by the waiter
    assert {"images_by_bundle", "images_by_camera", "state_counts", "state_counts_update"} <= _names(db_path)
    assert _states(db_path) == states
    assert Counter(json.loads(out.split(" ", 1)[1])) == states


@pytest.mark.skipif(shutil.which("sqlite3") is None, reason="needs the sqlite3 shell")
def test_an_sqlite3_shell_holding_the_lock_of_an_old_store_fails_as_a_lock(old_store: Path, reap: list) -> None:
    """An ``sqlite3`` shell in a write transaction on an old store, no upgrade running: the open
    fails after its busy timeout with the lock message (it waited five minutes, saying another
    program was bringing the store up to date), and says no upgrader is being waited for."""
    shell = subprocess.Popen(["sqlite3", str(old_store / "store.sqlite3")], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    reap.append(shell)
    assert shell.stdin is not None and shell.stdout is not None
    shell.stdin.write("BEGIN IMMEDIATE;\nSELECT 'held';\n")
    shell.stdin.flush()
    assert shell.stdout.readline().strip() == "held"
    waiter = Waiter(old_store, stall="")
    reap.append(waiter.proc)
    try:
        rc, out = waiter.result()
    except subprocess.TimeoutExpired:
        pytest.fail(f"the open still waits on a lock no upgrade holds: {waiter.lines}")
    finally:
        shell.stdin.write("ROLLBACK;\n.quit\n")
        shell.stdin.flush()
        shell.wait(LIMIT)
    assert rc == 1 and "database is locked; another program holds it" in out, (out, waiter.lines)
    assert not [line for line in waiter.lines if "waiting for it" in line], waiter.lines
    assert "images_by_bundle" not in _names(old_store / "store.sqlite3")  # nothing done under the shell


def _messages(sock: socket.socket, until: str) -> list[str]:
    """Datagrams from the notify socket up to the first containing ``until``."""
    got: list[str] = []
    while not any(until in m for m in got):
        got.append(sock.recv(4096).decode())
    return got


def test_under_systemd_the_upgrader_and_its_waiter_ask_for_more_start_time(old_store: Path, tmp_path: Path,
                                                                           reap: list) -> None:
    """``Type=notify`` with ``TimeoutStartSec``: while one long step runs, the upgrader and the
    program waiting for it each send ``EXTEND_TIMEOUT_USEC`` with a STATUS saying the step,
    again and again (systemd killed the unit at the start timeout, and its restart as well),
    over a real notify socket."""
    socks = []
    for name in ("upgrader.sock", "waiter.sock"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(tmp_path / name))
        sock.settimeout(LIMIT)
        socks.append(sock)
    try:
        upgrader = _upgrader(old_store, NOTIFY_SOCKET=str(tmp_path / "upgrader.sock"))
        reap.append(upgrader)
        waiter = Waiter(old_store, NOTIFY_SOCKET=str(tmp_path / "waiter.sock"))
        reap.append(waiter.proc)
        mine = [m for m in _messages(socks[0], "images_by_bundle") if "images_by_bundle" in m]
        mine += [socks[0].recv(4096).decode() for _ in range(2)]  # and again while the step runs
        theirs = _messages(socks[1], "waiting for pid")
        theirs += [socks[1].recv(4096).decode() for _ in range(2)]
        (old_store / "go").touch()
        assert waiter.result()[0] == 0
        assert upgrader.wait(LIMIT) == 0
        last = _messages(socks[0], "brought up")
    finally:
        for sock in socks:
            sock.close()
    for m in mine:
        assert m.splitlines() == ["EXTEND_TIMEOUT_USEC=600000", "STATUS=bringing the store up to this release's "
                                  "layout: step 5 of 7, index images_by_bundle"], m
    for m in theirs[-3:]:
        assert m.splitlines()[0] == "EXTEND_TIMEOUT_USEC=600000", m
        assert f"waiting for pid {upgrader.pid}" in m and "images_by_bundle" in m, m
    assert last[-1] == "STATUS=store brought up to this release's layout"


def test_serve_stops_at_sigterm_while_it_waits_for_another_programs_upgrade(old_store: Path, tmp_path: Path,
                                                                              reap: list, pose_bundle: Any) -> None:
    """Review: SIGTERM only set an Event read once the daemon served, so ``annotator serve``
    waiting for another program's upgrade went on waiting (and extending systemd's stop timeout
    with EXTEND_TIMEOUT_USEC), then started fully and only then stopped. It ends at once now,
    with 0, having served nothing."""
    upgrader = _upgrader(old_store)
    reap.append(upgrader)
    config = tmp_path / "annotator.toml"
    config.write_text(f'[engine]\nbundle = "{pose_bundle.path}"\n[store]\nroot = "{old_store}"\n'
                      '[server]\nlisten = "127.0.0.1:0"\n')
    serve = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--config", str(config)], env=_env(),
                             stderr=subprocess.PIPE, text=True)
    reap.append(serve)
    lines: list[str] = []
    assert serve.stderr is not None
    for line in serve.stderr:  # until it says it waits for the upgrader
        lines.append(line)
        if "waiting for it" in line:
            break
    assert any(f"pid {upgrader.pid} " in line for line in lines), lines
    serve.send_signal(signal.SIGTERM)
    try:
        rc = serve.wait(LIMIT)  # HEAD: still waiting (the upgrader holds its step until "go")
    finally:
        (old_store / "go").touch()
    assert rc == 0, serve.stderr.read()
    assert "annotator serving on port" not in "".join(lines) + serve.stderr.read()
    assert upgrader.wait(LIMIT) == 0
