"""Backups, restores and moving the appliance to another box.

``appliance_id`` defaults to the host name, and the reviews of what a box sent are collected
under that id (Ground Truth's ``groundtruth/output/<id>``, Label Studio's ``edge review <id>``).
A store restored on a new workstation (or a renamed host) with no ``appliance_id`` in its file
went on under the new name: new uploads went to ``manifests/<new>/``, and no review of the jobs
it had sent before was ever merged (a real agent: the output of a job of ``oldbox`` answered,
the agent running for minutes on host ``vm``, the image stayed ``uploaded``, without a word).
Without ``appliance_id`` in the file the store's journal now names the id (the store keeps its
identity; a container made again has a new host name too), with a warning saying how to choose.
"""
from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path

import pytest

from reviewdata import fill_store
from service.store import UPLOADED
from sync.config import default_appliance_id, load_sync_config
from sync.objectstore import LocalFolderStore
from sync.uploader import JOURNAL_NAME, Uploader, UploadSettings
from test_uploader import FAST, drain


def _config(tmp_path: Path, appliance_id: str | None) -> Path:
    line = f'appliance_id = "{appliance_id}"\n' if appliance_id else ""
    path = tmp_path / f"annotator-{appliance_id or 'default'}.toml"
    path.write_text(f'[store]\nroot = "{tmp_path / "store"}"\n[sync]\n{line}[sync.target]\nkind = "local"\n'
                    f'root = "{tmp_path / "bucket"}"\n')
    return path


def _uploaded_as(tmp_path: Path, appliance_id: str) -> list[str]:
    store, review, _ = fill_store(tmp_path / "store", review=3)
    try:
        drain(Uploader(store, LocalFolderStore(tmp_path / "bucket"),
                       UploadSettings(appliance_id, batch_size=2, retry=FAST)))
        assert {store.get(i).state for i in review} == {UPLOADED}
    finally:
        store.close()
    return review


def test_a_moved_store_with_the_default_id_goes_on_under_its_journals_id(tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    assert default_appliance_id() != "oldbox"
    _uploaded_as(tmp_path, "oldbox")
    config = _config(tmp_path, None)
    caplog.set_level(logging.WARNING, logger="sync.config")
    assert load_sync_config(config, env={}).appliance_id == "oldbox"
    (said,) = [r.getMessage() for r in caplog.records]
    assert "going on as 'oldbox'" in said and str(config) in said
    assert f'appliance_id = "{default_appliance_id()}"' in said  # how to start anew instead


def test_an_id_set_in_the_file_is_taken(tmp_path: Path) -> None:
    _uploaded_as(tmp_path, "oldbox")
    assert load_sync_config(_config(tmp_path, "oldbox"), env={}).appliance_id == "oldbox"
    # starting anew under another name is the operator's choice, said in the file
    assert load_sync_config(_config(tmp_path, "newbox"), env={}).appliance_id == "newbox"


def test_the_same_host_and_a_fresh_store_take_the_default(tmp_path: Path) -> None:
    assert load_sync_config(_config(tmp_path, None), env={}).appliance_id == default_appliance_id()
    _uploaded_as(tmp_path, default_appliance_id())
    assert load_sync_config(_config(tmp_path, None), env={}).appliance_id == default_appliance_id()


def test_a_journal_that_cannot_be_read_is_left_to_the_agent(tmp_path: Path) -> None:
    from sync.config import journal_appliance_id

    (tmp_path / "store").mkdir()
    (tmp_path / "store" / JOURNAL_NAME).write_bytes(b"not a database" * 100)
    assert journal_appliance_id(tmp_path / "store") is None
    assert load_sync_config(_config(tmp_path, None), env={}).appliance_id == default_appliance_id()


def test_a_batch_open_before_its_manifest_names_its_id_by_the_preannotations(tmp_path: Path) -> None:
    from sync.config import journal_appliance_id

    assert journal_appliance_id(tmp_path / "store") is None
    _uploaded_as(tmp_path, "oldbox")
    db = sqlite3.connect(tmp_path / "store" / JOURNAL_NAME)
    with db:
        db.execute("UPDATE batches SET manifest_key = NULL")
    db.close()
    assert journal_appliance_id(tmp_path / "store") == "oldbox"


def test_doctor_warns_where_the_file_names_another_id_than_the_journal(tmp_path: Path) -> None:
    from service.doctor import WARN, check_sync

    _uploaded_as(tmp_path, "oldbox")
    check = check_sync(_config(tmp_path, "cabin-02"), env={})
    assert check.level == WARN and "'oldbox'" in check.detail and 'appliance_id = "oldbox"' in check.advice
    assert check_sync(_config(tmp_path, "oldbox"), env={}).level != WARN


def test_doctor_fails_a_torn_database_naming_it_and_the_safe_copy(tmp_path: Path) -> None:
    """A store copied torn (or off a failing disk): the daemon and the agent exited with a
    traceback at start ('database disk image is malformed') while doctor said OK throughout."""
    from types import SimpleNamespace

    from service.doctor import FAIL, OK, check_databases

    cfg = SimpleNamespace(store=SimpleNamespace(root=tmp_path / "store"))
    _uploaded_as(tmp_path, "oldbox")
    assert check_databases(cfg).level == OK
    journal = tmp_path / "store" / JOURNAL_NAME
    for extra in (Path(f"{journal}-wal"), Path(f"{journal}-shm")):
        extra.unlink(missing_ok=True)
    with open(journal, "r+b") as f:
        f.truncate(journal.stat().st_size // 2)
    check = check_databases(cfg)
    assert check.level == FAIL and str(journal) in check.detail and ".backup" in check.advice
    assert "store.sqlite3:" not in check.detail  # the daemon's database is intact


def test_a_damaged_store_is_one_line_naming_doctor_not_a_traceback(tmp_path: Path) -> None:
    """serve, sync, export (every command through ``annotator``'s main) ended with an sqlite3
    traceback on a damaged database (a copy restored, a failing disk): one line, exit 2, naming
    doctor, whose databases check names the file."""
    import subprocess
    import sys

    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "store.sqlite3").write_bytes(b"not a database at all" * 1000)
    config = _config(tmp_path, "box")
    repo = Path(__file__).resolve().parents[2]
    for argv in (["export", "--coco", str(tmp_path / "o.json")], ["sync", "--once"]):
        got = subprocess.run([sys.executable, "-m", "service.cli", *argv, "--config", str(config)], cwd=repo,
                             capture_output=True, text=True, timeout=120)
        assert got.returncode == 2 and "Traceback" not in got.stderr, got.stderr
        assert "a database of the store: file is not a database; run annotator doctor" in got.stderr


def test_the_journal_is_not_read_where_the_store_folder_may_not_be_searched(tmp_path: Path) -> None:
    """Looking up the journal's id used ``Path.is_file``, which raises for a store root in a folder
    this user may not search (``annotator doctor`` or ``models list`` run by an operator, not the
    service user, on a 0750 /var/lib/annotator): the whole [sync] config then failed to load with
    "Permission denied". Without CAP_DAC_OVERRIDE (root) the config loads, on the host name."""
    import shutil
    import subprocess
    import sys

    setpriv = shutil.which("setpriv")
    prefix = [setpriv or "setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    if prefix and (setpriv is None or subprocess.run([*prefix, "true"], capture_output=True).returncode != 0):
        pytest.skip("root without a way to drop CAP_DAC_OVERRIDE: file permissions cannot be tested")
    _uploaded_as(tmp_path, "oldbox")
    config = _config(tmp_path, None)
    os.chmod(tmp_path / "store", 0o000)
    try:
        code = ("import sys; from pathlib import Path; from sync.config import load_sync_config; "
                "print(load_sync_config(Path(sys.argv[1]), env={}).appliance_id)")
        got = subprocess.run([*prefix, sys.executable, "-c", code, str(config)], cwd=Path(__file__).resolve().parents[2],
                             capture_output=True, text=True, timeout=120)
    finally:
        os.chmod(tmp_path / "store", 0o755)
    assert got.returncode == 0 and got.stdout.strip() == default_appliance_id(), got.stderr[-500:]
