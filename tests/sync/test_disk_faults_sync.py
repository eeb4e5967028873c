"""The sync agent on a full or failing local disk (ENOSPC, EFBIG, EIO): it never exits for good,
says what is wrong (the path and the free space), waits a short, growing time instead of
spinning, marks nothing done that was not, and resumes by itself once the disk answers.

Real faults come from ``RLIMIT_FSIZE`` in a subprocess (every write past the limit fails with
EFBIG, SQLite's with SQLITE_IOERR), lifted from outside with ``prlimit`` once "space returns";
in-process faults are an ``OSError`` injected where the disk is written.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from service.store import REVIEW_PENDING, UPLOADED
from sync.agent import Agent
from sync.backoff import RetryPolicy
from sync.errors import DiskFault
from sync.objectstore import LocalFolderStore
from sync.uploader import Uploader, UploadSettings

from procs import FakeClock, command_env
from reviewdata import fill_store

REPO = Path(__file__).resolve().parents[2]


def _limited(limit: int):  # noqa: ANN202
    def pre() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    return pre


def _manifest_lines(bucket: Path) -> list[str]:
    return [line for m in sorted(bucket.glob("manifests/*/*.manifest")) for line in m.read_text().splitlines()]


@pytest.mark.skipif(not hasattr(resource, "prlimit"), reason="needs prlimit (Linux)")
def test_agent_started_on_a_failing_disk_waits_and_uploads_once_it_answers(tmp_path: Path) -> None:
    """Started while every write fails (the store's WAL cannot even be opened), the agent used to
    exit 2 with "run as a user who may write it": systemd restarts it 5 times in 25 s and then
    gives up for good. Now it stays up, names the fault and the free space, and uploads every
    image exactly once when the limit is lifted."""
    store, ids, _ = fill_store(tmp_path / "store", 5)
    store.close()
    config = tmp_path / "annotator.toml"
    config.write_text('[store]\nroot = "store"\n[sync]\nappliance_id = "box-1"\nbatch_size = 3\npoll_interval = 0.2\n'
                      '[sync.target]\nkind = "local"\nroot = "bucket"\n')
    # A pipe, not a file: the file size limit would stop the log too.
    proc = subprocess.Popen([sys.executable, "-m", "sync.cli", "sync", "--config", str(config)], cwd=REPO,
                            env=command_env(extra={"YOLO_OFFLINE": "1"}), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=_limited(300))
    log = _Lines(proc)
    try:
        deadline = time.monotonic() + 60
        while "disk fault" not in log.read_text():
            assert proc.poll() is None, f"the agent exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        time.sleep(0.5)
        assert proc.poll() is None, f"the agent exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        text = log.read_text()
        assert "MB free on" in text and str(tmp_path / "store") in text, text[-3000:]
        assert not (tmp_path / "bucket" / "manifests").exists()  # nothing went up meanwhile
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        deadline = time.monotonic() + 60
        while len(_manifest_lines(tmp_path / "bucket")) < len(ids) or "batch" not in log.read_text():
            assert proc.poll() is None, f"the agent exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
    assert rc == 0, log.read_text()[-3000:]
    lines = [json.loads(line) for line in _manifest_lines(tmp_path / "bucket")]
    assert sorted(line["image-id"] for line in lines) == sorted(ids)  # each once
    from service.store import Store
    store = Store(tmp_path / "store")
    try:
        assert all(store.get(i).state == UPLOADED for i in ids)
    finally:
        store.close()


class _Lines:
    """The process's output so far (read by a thread); ``read_text()`` as for a log file."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()

    def read_text(self) -> str:
        return "".join(list(self.lines))


class _Full:
    """Makes ``LocalFolderStore.put`` fail as a full disk does while ``on``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.on = True
        real = LocalFolderStore.put

        def put(store: LocalFolderStore, key: str, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            if self.on and key.startswith("images/"):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(store, key, *args, **kwargs)

        monkeypatch.setattr(LocalFolderStore, "put", put)


def _uploader(tmp_path: Path, n: int, clock: FakeClock):  # noqa: ANN202
    store, ids, _ = fill_store(tmp_path / "store", n)
    target = LocalFolderStore(tmp_path / "bucket")
    up = Uploader(store, target, UploadSettings("box-1", batch_size=10, retry=RetryPolicy(0.001, 0.002, 2)),
                  clock=clock)
    return store, ids, up


def test_a_full_bucket_disk_waits_briefly_names_the_folder_and_marks_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """ENOSPC writing the local-folder bucket: the upload task waited 30 s, then 60, ... 900 s
    (15 minutes after space returned, nothing moved) with a traceback per try and no word of
    which folder or how much space; now a ``DiskFault`` naming the key, the folder and the
    free space, retried within 5..60 s, and nothing marked uploaded."""
    clock = FakeClock(1000.0)
    store, ids, up = _uploader(tmp_path, 3, clock)
    full = _Full(monkeypatch)
    agent = Agent([up], poll_interval=0, clock=clock)
    with caplog.at_level(logging.DEBUG, logger="sync.agent"):
        agent.run_pass()
        agent.run_pass()  # backing off: not tried again at once
    assert isinstance(agent.last_error, DiskFault), agent.last_error
    message = str(agent.last_error)
    assert "No space left on device" in message and "MB free on" in message and str(tmp_path / "bucket") in message
    assert not [r for r in caplog.records if r.exc_info], "a disk fault is no crash: no traceback"
    assert sum("disk fault" in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR) == 1
    assert all(store.get(i).state == REVIEW_PENDING for i in ids)
    full.on = False
    clock.t += 5.0  # space is back: the next try comes within seconds, not minutes
    agent.run_pass()
    agent.run_pass()
    assert agent.last_error is None
    assert all(store.get(i).state == UPLOADED for i in ids)
    assert len(_manifest_lines(tmp_path / "bucket")) == 3
    up.close()
    store.close()


def test_a_bucket_folder_that_cannot_be_created_for_a_disk_fault_does_not_stop_the_agent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``LocalFolderStore.check`` turns every ``mkdir`` failure into ``PermanentError``, which
    ends the agent (exit 2; systemd gives up after 5 starts): a full or failing disk under the
    bucket folder is the disk's fault for now, a ``DiskFault``; the upload goes on once it answers."""
    clock = FakeClock(1000.0)
    store, ids, up = _uploader(tmp_path, 2, clock)
    real_mkdir = Path.mkdir
    broken = {"on": True}

    def mkdir(self: Path, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if broken["on"] and self == tmp_path / "bucket":
            raise OSError(errno.EIO, "Input/output error", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    agent = Agent([up], poll_interval=0, clock=clock)
    agent.run_pass()  # raised PermanentError before
    assert isinstance(agent.last_error, DiskFault) and "Input/output error" in str(agent.last_error)
    broken["on"] = False
    clock.t += 5.0
    agent.run_pass()
    assert all(store.get(i).state == UPLOADED for i in ids)
    up.close()
    store.close()


def test_journal_disk_io_error_hidden_by_a_failed_rollback_is_a_disk_fault(tmp_path: Path) -> None:
    """SQLite rolls a transaction back itself after a disk I/O error in a statement; the
    ``ROLLBACK`` that follows then fails with "no transaction is active", which hid the disk
    fault (an unexpected error, 30..900 s away, with a traceback). Run under a file size limit
    in a subprocess; the journal stays whole and takes the write once the limit is gone."""
    script = f"""
import resource, signal, sys
sys.path[:0] = [{str(REPO)!r}]
from pathlib import Path
from sync.errors import DiskFault
from sync.journal import Journal
j = Journal(Path({str(tmp_path / "sync.sqlite3")!r}), clock=lambda: 0.0)
j._conn().execute("PRAGMA cache_size=2")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, resource.RLIM_INFINITY))
ids = [f"{{n:064x}}" for n in range(400)]
try:
    j.create_batch(ids, lambda seq: "b" + "x" * 2000)
    print("no fault")
except DiskFault as exc:
    print("DiskFault", exc)
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
print("batches", len(j.batches()), j._conn().execute("PRAGMA integrity_check").fetchone()[0])
j.create_batch(ids[:3], lambda seq: f"b{{seq}}")
print("after", len(j.items(j.batches()[0].batch_id)))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         env=command_env())
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("DiskFault") and "sync.sqlite3" in lines[0] and "MB free on" in lines[0], out.stdout
    assert lines[1:] == ["batches 0 ok", "after 3"], out.stdout


def test_a_bug_raised_while_handling_an_io_error_is_not_a_disk_fault() -> None:
    """``io_fault_of`` walked every exception's ``__context__``: a bug (here a KeyError) raised
    inside an ``except OSError`` was taken for the disk's fault and retried quietly without its
    traceback. The context is followed only from I/O, SQLite and the package's own errors."""
    import sqlite3

    from sync.errors import RetryableError, io_fault_of

    eio = OSError(errno.EIO, "Input/output error", "/srv/bucket/x.jpg")

    def raised(make: "Callable[[], None]") -> BaseException:
        try:
            try:
                raise eio
            except OSError:
                make()
        except BaseException as exc:  # noqa: BLE001
            return exc
        raise AssertionError("nothing raised")

    def bug() -> None:
        raise KeyError("image_id")

    def wrapped() -> None:
        raise RetryableError("upload failed")

    def rollback() -> None:
        raise sqlite3.OperationalError("cannot rollback - no transaction is active")

    assert io_fault_of(raised(bug)) is None
    assert io_fault_of(raised(wrapped)) is eio and io_fault_of(raised(rollback)) is eio
    try:
        raise ValueError("bad value") from eio
    except ValueError as exc:  # an explicit cause is followed whatever the error
        assert io_fault_of(exc) is eio
