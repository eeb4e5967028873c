"""Two sync agents at once, as real processes: the systemd unit's ``annotator sync`` and an
``annotator sync --once`` started by hand on the same config and store.

One agent per store (``<store root>/sync.lock``, an ``flock``): the second is refused at once with
exit code 2 and one line naming the first one's pid, and changes nothing; the lock dies with its
holder, kill -9 included. Without it both formed batches from the same store and journal: objects
were sent twice and the second agent failed with a traceback ("images are in a batch already")."""
from __future__ import annotations

import collections
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from procs import command_env
from reviewdata import fill_store
from service.store import Store

REPO = Path(__file__).resolve().parents[2]
SENT = re.compile(r"sync\.uploader: sent (\S+) \(")


def _config(tmp_path: Path) -> Path:
    config = tmp_path / "annotator.toml"
    config.write_text(f"""
[store]
root = "{tmp_path / 'store'}"
[sync]
appliance_id = "box-1"
batch_size = 1
poll_interval = 0.2
retry_base = 0.01
[sync.target]
kind = "local"
root = "{tmp_path / 'bucket'}"
""")
    return config


def _start(config: Path, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "sync.cli", "--log-level", "DEBUG", "sync", "--config",
                                 str(config), *extra], cwd=REPO, env=command_env(), stdout=f, stderr=subprocess.STDOUT)


def _wait(cond, proc: subprocess.Popen[bytes], log: Path, seconds: float = 45.0) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        assert proc.poll() is None, f"the agent exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


def _uploaded(root: Path) -> int:
    store = Store(root)
    try:
        return store.counts().get("uploaded", 0)
    finally:
        store.close()


def _check_bucket(tmp_path: Path, review: list[str], *logs: Path) -> None:
    """Every image in exactly one manifest line, every object sent at most once (the agents' logs)."""
    lines = [json.loads(t) for m in sorted((tmp_path / "bucket" / "manifests" / "box-1").glob("*.manifest"))
             for t in m.read_text().splitlines()]
    assert sorted(line["image-id"] for line in lines) == sorted(review)
    sent = collections.Counter(k for log in logs for k in SENT.findall(log.read_text()))
    assert sent and max(sent.values()) == 1, {k: n for k, n in sent.items() if n > 1}
    assert _uploaded(tmp_path / "store") == len(review)


def test_a_second_agent_on_the_same_store_is_refused_at_once_naming_the_first(tmp_path: Path) -> None:
    store, review, _ = fill_store(tmp_path / "store", review=30, auto=2)
    store.close()
    config = _config(tmp_path)
    a_log, b_log = tmp_path / "a.log", tmp_path / "b.log"
    first = _start(config, a_log)  # the systemd unit's agent
    try:
        _wait(lambda: "sync tasks:" in a_log.read_text(), first, a_log)
        second = _start(config, b_log, "--once")  # by hand, while the first one works
        assert second.wait(60) == 2, b_log.read_text()
        said = b_log.read_text()
        assert f"another sync agent (pid {first.pid})" in said and "Traceback" not in said, said
        assert "sent " not in said  # it changed nothing
        _wait(lambda: _uploaded(tmp_path / "store") == len(review), first, a_log)
        first.send_signal(signal.SIGTERM)
        assert first.wait(30) == 0, a_log.read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(10)
    assert "Traceback" not in a_log.read_text()
    _check_bucket(tmp_path, review, a_log, b_log)


def test_the_lock_dies_with_an_agent_killed_with_sigkill(tmp_path: Path) -> None:
    store, review, _ = fill_store(tmp_path / "store", review=12)
    store.close()
    config = _config(tmp_path)
    a_log, b_log = tmp_path / "a.log", tmp_path / "b.log"
    first = _start(config, a_log)
    try:
        _wait(lambda: "sync tasks:" in a_log.read_text(), first, a_log)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(10)
    second = _start(config, b_log, "--once")  # the lock file is left with a dead pid in it: no matter
    assert second.wait(60) == 0, b_log.read_text()[-3000:]
    _check_bucket(tmp_path, review, a_log, b_log)


def test_a_store_this_user_may_not_write_is_said_not_a_traceback(tmp_path, monkeypatch) -> None:
    """No lock file yet in a store root this user may not write: the read-only fallback's
    FileNotFoundError escaped ``annotator sync`` as a traceback."""
    import errno
    import os as os_mod

    import pytest

    import service.lockfile as lockfile
    from sync.agent import hold_store
    from sync.errors import SyncConfigError

    real_open = os_mod.open

    def denied(path, flags, *a):  # noqa: ANN001, ANN202 - what a folder without write permission answers
        if str(path).endswith("sync.lock"):
            if flags & os_mod.O_CREAT:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        return real_open(path, flags, *a)

    monkeypatch.setattr(lockfile.os, "open", denied)
    with pytest.raises(SyncConfigError, match=r"may not create .*sync.lock \(Permission denied\); run the agent"):
        hold_store(tmp_path)


def test_a_lock_file_another_user_made_unreadable_is_named_with_its_owner(tmp_path, monkeypatch) -> None:
    """``sync.lock`` left mode 600 by a command run as root: the agent was told it "may not
    create" a file that exists; now the owner, the mode and what to do are said."""
    import errno
    import os as os_mod

    import pytest

    import service.lockfile as lockfile
    from sync.agent import hold_store
    from sync.errors import SyncConfigError

    lock = tmp_path / "sync.lock"
    lock.write_text("123\n")
    lock.chmod(0o600)
    real_open = os_mod.open

    def denied(path, flags, *a):  # noqa: ANN001, ANN202 - what another user's 0600 file answers
        if str(path).endswith("sync.lock"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *a)

    monkeypatch.setattr(lockfile.os, "open", denied)
    with pytest.raises(SyncConfigError, match=r"may not open .*sync.lock \(Permission denied; it belongs to \w+, "
                                              r"mode 600.*remove it \(sudo rm "):
        hold_store(tmp_path)
