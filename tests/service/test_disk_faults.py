"""The daemon when its disks fail under it: full (ENOSPC), read-only, I/O errors, a sidecar folder
that cannot be written. A full disk is not the image's fault: nothing is quarantined for it, the
work waits and resumes by itself once the disk takes writes again, each image annotated once."""
from __future__ import annotations

import errno
import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import pytest

import service.daemon as daemon_mod
from procs import command_env, free_port, start_serve, wait_for
from service.cli_daemon import DEMO_BUNDLE
from service.config import load_config
from service.daemon import Daemon
from service.dropfolder import PROCESSED, QUARANTINE, DropFolder
import service.errors as errors
from service.imageio import DecodedImage
from service.store import Store


def _jpeg(seed: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    assert ok
    return buf.tobytes()


def _config(tmp_path: Path, **more: Any) -> Any:
    values = {"store.root": str(tmp_path / "store"), "store.lease_seconds": 1.0, "store.min_free_mb": 0,
              "engine.bundle": str(DEMO_BUNDLE), "engine.batch_size": 4, "engine.workers": 2,
              "outputs.sidecar_dir": str(tmp_path / "sidecars"), **more}
    return load_config(None, env={}, overrides=values)


def _wait(cond: Callable[[], bool], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def _sqlite_full() -> sqlite3.OperationalError:
    exc = sqlite3.OperationalError("database or disk is full")
    exc.sqlite_errorcode = sqlite3.SQLITE_FULL  # type: ignore[attr-defined]
    return exc


@pytest.mark.parametrize("fault", ["sidecar_enospc", "complete_sqlite_full", "sidecar_eacces"])
def test_a_full_disk_under_the_finisher_quarantines_nothing_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                         fault: str) -> None:
    """The sidecar write (ENOSPC) or the completion (SQLITE_FULL) fails for longer than
    ``max_attempts`` leases: each failed batch's lease expired and counted as a claim, and the
    images were failed and quarantined as a "crash loop on this image". Now their leases are
    given back uncounted, claims wait, status says why, and once the disk takes writes again
    every image is annotated exactly once."""
    monkeypatch.setattr(daemon_mod, "IO_RETRY_SECONDS", 0.2, raising=False)
    monkeypatch.setattr(daemon_mod, "IO_RETRY_MAX_SECONDS", 0.5, raising=False)
    full = {"on": True, "tries": 0}
    from service.metrics import MetricsRecorder

    metrics = MetricsRecorder()
    # Leases of 2 s: with 1 s, a box busy with other work let a slow batch's lease run out for
    # real twice (an honest crash-loop count), which is not what this test is about.
    d = Daemon(_config(tmp_path, **{"store.lease_seconds": 2.0, "engine.workers": 1}), metrics=metrics)
    paused = lambda: [m.samples[0].value for m in metrics.registry.collect() if m.name == "annotator_paused"]  # noqa: E731
    d.store.max_attempts = 3  # one lease of a first (warm-up) batch may run out for real on a busy box
    if fault == "sidecar_enospc":
        real_write = daemon_mod.write_sidecars

        def write(folder: Path, records: Any) -> Any:
            if full["on"]:
                full["tries"] += 1
                raise OSError(errno.ENOSPC, "No space left on device", str(folder))
            return real_write(folder, records)

        monkeypatch.setattr(daemon_mod, "write_sidecars", write)
    elif fault == "sidecar_eacces":  # a setting, not the disk: said as such, the images wait all the same
        real_write = daemon_mod.write_sidecars

        def write(folder: Path, records: Any) -> Any:
            if full["on"]:
                full["tries"] += 1
                raise PermissionError(errno.EACCES, "Permission denied", str(folder / "x.json"))
            return real_write(folder, records)

        monkeypatch.setattr(daemon_mod, "write_sidecars", write)
    else:
        real_complete = d.store.complete_many

        def complete(owner: str, completions: Any) -> Any:
            if full["on"]:
                full["tries"] += 1
                raise _sqlite_full()
            return real_complete(owner, completions)

        d.store.complete_many = complete  # type: ignore[method-assign]
    ids = [d.store.ingest(_jpeg(i), "test:disk")[0] for i in range(3)]
    d.start()
    try:
        _wait(lambda: full["tries"] >= 3)
        time.sleep(7.0)  # more than max_attempts leases of 2 s
        assert [d.store.get(i).state for i in ids] == ["received"] * 3
        assert not d.quarantine_dir.exists() or not any(d.quarantine_dir.iterdir())
        reason = d.status().paused_reason or ""
        if fault == "sidecar_eacces":
            assert reason.startswith("no write permission: Permission denied: ") and "sidecars/x.json" in reason
            assert "needs write permission" in reason and "disk fault" not in reason
        else:
            assert reason.startswith("disk fault: ") and "MB free on" in reason
        assert paused() == [1]  # the Prometheus gauge too (it read only the store's floor)
        full["on"] = False
        _wait(lambda: all(d.store.get(i).state in ("auto_accepted", "review_pending") for i in ids))
        assert d.store.counter("annotated") == 3 and d.store.counter("failed") == 0
        assert sorted(p.name for p in d.sidecar_dir.iterdir()) == sorted(f"{i}.json" for i in ids)
        _wait(lambda: d.status().paused_reason is None, 10)
        assert paused() == [0]
    finally:
        d.close()


@pytest.mark.parametrize("code,kind", [(errno.ENOSPC, "StoreFull"), (errno.EIO, "StoreUnavailable"),
                                       (errno.EROFS, "StoreUnavailable")])
def test_submit_when_the_store_cannot_write_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int,
                                                    kind: str) -> None:
    """A failed image write under ``submit`` raised the bare OSError (gRPC INTERNAL "internal
    error"): now ``StoreFull`` for a full disk, ``StoreUnavailable`` for an I/O error or a read-only
    file system, naming the file and the free space; nothing is stored."""
    d = Daemon(_config(tmp_path))
    try:
        def fails(path: Any, data: bytes, **kw: Any) -> None:
            raise OSError(code, os.strerror(code), str(path))

        monkeypatch.setattr("service.store.write_bytes_atomic", fails)
        with pytest.raises(errors.StoreError, match=r"MB free on .*store") as info:
            d.submit(_jpeg(1), "test:grpc")
        assert type(info.value).__name__ == kind
        assert os.strerror(code) in str(info.value) and errors.is_io_fault(info.value)
        assert d.store.counts()["received"] == 0
    finally:
        d.close()


def test_drop_folder_holds_every_file_when_the_store_cannot_write(tmp_path: Path) -> None:
    """An I/O error or a read-only store (not only a full one) ends the scan and holds the files:
    each file was read, decoded and refused in turn, once per scan, with one error line each."""
    calls: list[bytes] = []
    broken = {"on": True}

    def sink(data: bytes, source: str, meta: dict, decoded: DecodedImage) -> None:
        calls.append(data)
        if broken["on"]:
            raise OSError(errno.EROFS, "Read-only file system", "/store/images/ab/x")

    now = [0.0]
    drop = DropFolder(tmp_path / "drop", sink, "move", stable_seconds=0.0, clock=lambda: now[0],
                      pause_retry_seconds=5.0)
    for i in range(3):
        (tmp_path / "drop" / f"{i}.jpg").write_bytes(_jpeg(i))
    assert drop.scan_once() == 0
    assert len(calls) == 1  # held after the first refusal
    assert drop.scan_once() == 0 and len(calls) == 1  # nothing read while held
    assert sorted(p.name for p in (tmp_path / "drop").iterdir()) == ["0.jpg", "1.jpg", "2.jpg"]
    broken["on"] = False
    now[0] += 6.0
    assert drop.scan_once() == 3  # the held files come back without waiting for a full walk
    assert not (tmp_path / "drop" / QUARANTINE).exists()
    assert len(list((tmp_path / "drop" / PROCESSED).iterdir())) == 3


def test_real_daemon_with_an_unwritable_sidecar_folder_survives_kill_and_recovers(tmp_path: Path) -> None:
    """``annotator serve`` whose sidecar folder cannot be written (a file stands where the folder
    belongs: every sidecar write fails) quarantined each dropped image after ``max_attempts``
    leases. Now the images wait in the store; a kill -9 meanwhile loses nothing, and the next
    daemon, once the folder can be written, annotates each exactly once."""
    drop, sidecars, store_root = tmp_path / "drop", tmp_path / "sidecars", tmp_path / "store"
    sidecars.write_text("not a folder")
    config = tmp_path / "annotator.toml"
    config.write_text(f'''[server]
listen = "127.0.0.1:{free_port()}"
[store]
root = "{store_root}"
lease_seconds = 0.5
min_free_mb = 0
[engine]
bundle = "{DEMO_BUNDLE}"
workers = 1
[drop]
folder = "{drop}"
stable_seconds = 0.0
poll_interval = 0.1
[outputs]
sidecar_dir = "{sidecars}"
''')
    os.unlink(sidecars)  # serve refuses a file at start; it appears afterwards
    log = tmp_path / "serve.log"
    proc = start_serve(config, log, tmp_path, command_env())
    try:
        wait_for(lambda: "watching drop folder" in log.read_text(), proc, log, 60)
        sidecars.write_text("not a folder")
        drop.mkdir(exist_ok=True)
        for i in range(3):
            (drop / f"{i}.tmp").write_bytes(_jpeg(10 + i))
            os.replace(drop / f"{i}.tmp", drop / f"{i}.jpg")
        wait_for(lambda: (drop / PROCESSED).is_dir() and len(list((drop / PROCESSED).iterdir())) == 3, proc, log, 30)
        deadline = time.monotonic() + 8  # more than max_attempts (5) leases of 0.5 s, each retry alone
        while time.monotonic() < deadline and not (drop / QUARANTINE).exists():
            time.sleep(0.2)
        store = Store(store_root)
        try:
            assert store.counts()["received"] == 3 and store.counter("failed") == 0
        finally:
            store.close()
        assert not (drop / QUARANTINE).exists(), log.read_text()[-2000:]
        assert "cannot write: File exists: " in log.read_text(), log.read_text()[-2000:]  # a setting, not the disk
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    sidecars.unlink()
    proc = start_serve(config, log, tmp_path, command_env())
    try:
        store = Store(store_root)
        try:
            wait_for(lambda: store.counter("annotated") == 3, proc, log, 60)
            assert store.counter("failed") == 0
            assert sorted(p.stem for p in sidecars.iterdir()) == sorted(
                r.image_id for r in store.list()[0] if r.state in ("auto_accepted", "review_pending"))
        finally:
            store.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


@pytest.mark.parametrize("exc", [errors.StoreUnavailable("the store cannot write (Input/output error)"),
                                 OSError(errno.EIO, "Input/output error"),
                                 OSError(errno.EROFS, "Read-only file system"),
                                 sqlite3.OperationalError("disk I/O error")])
def test_grpc_status_of_a_failing_disk_is_unavailable_with_a_message(exc: BaseException) -> None:
    """A disk that fails (not full) is UNAVAILABLE, worth a retry, with what failed; it was
    INTERNAL "internal error (details are in the server log)" for a bare OSError."""
    import grpc

    from service.server import status_for

    if isinstance(exc, sqlite3.OperationalError):
        exc.sqlite_errorcode = sqlite3.SQLITE_IOERR_WRITE  # type: ignore[attr-defined]
    code, text = status_for(exc)
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "cannot write" in text and "internal error" not in text


def test_a_transaction_raises_its_own_error_when_sqlite_already_rolled_back(tmp_path: Path) -> None:
    """After a disk I/O error SQLite often rolls the transaction back by itself; the ROLLBACK
    that followed failed with "cannot rollback - no transaction is active", and that error
    replaced the disk's, so no caller could tell a disk fault from a bug."""
    from service.sqlite import transaction

    db = sqlite3.connect(tmp_path / "t.sqlite3", isolation_level=None)
    db.execute("CREATE TABLE t (x)")
    disk = OSError(errno.EIO, "Input/output error")
    with pytest.raises(OSError) as caught:
        with transaction(db):
            db.execute("INSERT INTO t VALUES (1)")
            db.execute("ROLLBACK")  # what SQLite does by itself after SQLITE_IOERR / SQLITE_FULL
            raise disk
    assert caught.value is disk and not db.in_transaction
    with transaction(db):  # the connection goes on
        db.execute("INSERT INTO t VALUES (2)")
    assert db.execute("SELECT x FROM t").fetchall() == [(2,)]


def test_an_io_error_reading_bundle_json_is_not_the_bundles_fault(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """An I/O error (or too many open files) reading bundle.json was a BundleError: the model
    pull refused a good bundle for good on one failing read. Now the OSError goes up (retried)."""
    import shutil

    from service.bundle import load_bundle
    from service.errors import BundleError

    shutil.copytree(DEMO_BUNDLE, tmp_path / "b")
    read_text = Path.read_text

    def failing(self: Path, *a: Any, **kw: Any) -> str:
        if self.name == "bundle.json":
            raise OSError(errno.EIO, "Input/output error", str(self))
        return read_text(self, *a, **kw)

    monkeypatch.setattr(Path, "read_text", failing)
    with pytest.raises(OSError) as caught:
        load_bundle(tmp_path / "b")
    assert not isinstance(caught.value, BundleError) and caught.value.errno == errno.EIO
    monkeypatch.setattr(Path, "read_text", read_text)
    (tmp_path / "b" / "bundle.json").write_bytes(b"\xff not json")
    with pytest.raises(BundleError, match="cannot be read as JSON"):
        load_bundle(tmp_path / "b")


def test_one_unreadable_image_file_does_not_stall_the_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EIO reading one image's file (a bad sector) was taken for a disk fault of its batch: the
    leases were given back uncounted, the same batch formed again and failed again, every 5-60 s,
    for ever: nothing annotated, the bad image never failed (review pass's finding). Now the
    others are annotated and the unreadable one fails with its reason after max_attempts."""
    from service.store import Store

    monkeypatch.setattr(daemon_mod, "IO_RETRY_SECONDS", 0.2, raising=False)
    d = Daemon(_config(tmp_path, **{"engine.workers": 1, "store.lease_seconds": 0.5}))
    d.store.max_attempts = 2
    ids = [d.store.ingest(_jpeg(i), "test:eio")[0] for i in range(6)]
    bad = ids[0]
    real = Store.image_bytes

    def image_bytes(self: Store, image_id: str) -> bytes:
        if image_id == bad:
            raise OSError(errno.EIO, "Input/output error", str(self.image_path(image_id)))
        return real(self, image_id)

    monkeypatch.setattr(Store, "image_bytes", image_bytes)
    d.start()
    try:
        _wait(lambda: all(d.store.get(i).state in ("auto_accepted", "review_pending") for i in ids[1:]), 60)
        _wait(lambda: d.store.get(bad).state == "failed", 60)
        assert d.store.counter("annotated") == 5
    finally:
        d.close()


def test_a_file_the_service_user_may_not_read_is_failed_precondition_naming_it() -> None:
    """A bundle.json (or store file) the service user may not read was INTERNAL "internal error
    (details are in the server log)" for ReloadModels (review pass): it is a setting to fix."""
    import grpc

    from service.server import status_for

    code, text = status_for(PermissionError(errno.EACCES, "Permission denied", "/srv/models/b1/bundle.json"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "/srv/models/b1/bundle.json" in text and "Permission denied" in text and "service user" in text
