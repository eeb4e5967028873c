"""A missing drop folder: ``annotator serve`` and ``annotator doctor`` say the same thing about it.

HEAD: the daemon made any missing drop folder, the folders above it too, without a word (a
typo'd ``/srv/annotaor/drop`` became a new, empty tree nothing writes into, and the daemon ran
on taking nothing), while doctor called every missing one a FAIL (a fresh install whose daemon
would start fine). Now: made at a first start (the folder above it exists, the store never took
a drop file), said in the log and as a status notice until a file comes; refused, with the file
that set it, where it is a typo or an unmounted disk (nothing above it, or a store fed by a drop
folder before); doctor WARNs and FAILs exactly there."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from service.client import AnnotatorClient
from service.config import load_config
from service.daemon import Daemon
from service.doctor import FAIL, WARN, run_checks
from service.errors import ConfigError
from service.store import Store

from test_operator_metrics import _free_port, _wait, serving

ROOT = Path(__file__).resolve().parents[2]
DEMO_BUNDLE = ROOT / "service" / "assets" / "demo_bundle"


def _config_file(tmp_path: Path, drop: Path) -> Path:
    path = tmp_path / "annotator.toml"
    path.write_text(f"[server]\nlisten = \"127.0.0.1:0\"\n[store]\nroot = {json.dumps(str(tmp_path / 'store'))}\n"
                    f"min_free_mb = 0\n[engine]\nbundle = {json.dumps(str(DEMO_BUNDLE))}\n"
                    f"[drop]\nfolder = {json.dumps(str(drop))}\n", encoding="utf-8")
    return path


def _drop_check(path: Path) -> Any:
    return next(c for c in run_checks(path, env={}) if c.name == "folder drop.folder")


def test_a_typo_on_a_store_fed_by_a_drop_folder_is_refused_by_serve_and_failed_by_doctor(
        tmp_path: Path, small_jpeg: Callable[[int], bytes]) -> None:
    """The appliance ran on /srv/.../drop; its config now says .../dorp: the real ``annotator
    serve`` exits 2 with one line naming drop.folder and the file, and makes nothing; doctor
    FAILs the same folder for the same reason."""
    store = Store(tmp_path / "store")
    store.ingest(small_jpeg(1), "drop:cam1/a.jpg")
    store.close()
    typo = tmp_path / "dorp"
    config = _config_file(tmp_path, typo)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ANNOTATOR_CONFIG": ""}
    run = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--config", str(config)], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    line = run.stderr.strip().splitlines()[-1]
    assert f"drop.folder: {typo} does not exist, and the store {tmp_path / 'store'} has taken files" in line
    assert f"(from {config})" in line and "install -d" in line
    assert not typo.exists()
    check = _drop_check(config)
    assert check.level == FAIL and "has taken files from a drop folder before" in check.detail
    assert str(config) in check.advice


def test_a_path_under_a_folder_that_does_not_exist_is_never_made(tmp_path: Path, make_config: Callable[..., Any]) -> None:
    """A typo in a folder above (or a disk not mounted): nothing is made, not even on a fresh store."""
    drop = tmp_path / "srv" / "annotaor" / "drop"
    with pytest.raises(ConfigError, match=r"drop\.folder: .* does not exist, nor does .*annotaor .*from the command line"):
        Daemon(make_config(drop__folder=str(drop)))
    assert not (tmp_path / "srv").exists()
    check = _drop_check(_config_file(tmp_path, drop))
    assert check.level == FAIL and "nor does" in check.detail


def test_a_first_start_makes_the_folder_and_says_so_until_a_file_comes(
        tmp_path: Path, make_config: Callable[..., Any], photo_variants: Callable[[int], list[bytes]]) -> None:
    """A fresh install (the folder above exists, an empty store): doctor WARNs (it FAILed, while
    the daemon started fine), the daemon makes the folder, and the status carries a notice that
    names where drop.folder was set until the first file comes into it."""
    drop = tmp_path / "drop"
    check = _drop_check(_config_file(tmp_path, drop))
    assert check.level == WARN and "makes it" in check.detail and "typo" in check.advice
    grpc_port = _free_port()
    config = make_config(server__listen=f"127.0.0.1:{grpc_port}", drop__folder=str(drop),
                         drop__stable_seconds=0.1, drop__poll_interval=0.1, engine__workers=1, engine__threads=1)
    with serving(config), AnnotatorClient(f"127.0.0.1:{grpc_port}", timeout=30, retries=0) as client:
        assert drop.is_dir()
        notices = list(client.status().notices)
        assert any(f"the drop folder {drop} did not exist and was made at this start (from the command line)" in n
                   for n in notices), notices
        (drop / "a.jpg").write_bytes(photo_variants(1)[0])
        _wait(lambda: client.status().counters["drop_taken"] == 1, "the file to be taken", 60)
        assert not any("was made at this start" in n for n in client.status().notices)


def test_a_folder_from_the_environment_is_named_so(tmp_path: Path) -> None:
    """The source named is where the value came from (here ANNOTATOR_DROP__FOLDER), not the file."""
    config = _config_file(tmp_path, tmp_path / "drop")
    cfg = load_config(config, env={"ANNOTATOR_DROP__FOLDER": str(tmp_path / "x" / "y")})
    assert cfg.source_of("drop.folder") == "from environment ANNOTATOR_DROP__FOLDER"
    assert cfg.source_of("store.root") == f"from {config}"
    assert cfg.source_of("judge.threshold") == "the default"


def test_a_drop_folder_in_memory_is_made_again_after_a_reboot(tmp_path: Path, small_jpeg: Callable[[int], bytes]) -> None:
    """Review: a drop folder under /dev/shm or /run (tmpfs) is gone after every boot; with a store
    fed by it before, the daemon refused to start after each reboot (and systemd gave up after
    its restart burst). A folder in memory is made again, as at a first start."""
    from service.dropfolder import missing_drop_folder, on_tmpfs

    shm = Path("/dev/shm")
    if not shm.is_dir() or not on_tmpfs(shm) or not os.access(shm, os.W_OK):
        pytest.skip("needs a writable tmpfs at /dev/shm")
    assert not on_tmpfs(tmp_path) or str(tmp_path).startswith(("/dev/shm", "/run"))
    store = Store(tmp_path / "store")
    store.ingest(small_jpeg(1), "drop:cam1/a.jpg")
    store.close()
    parent = shm / f"drop-made-{os.getpid()}-{os.urandom(4).hex()}"
    parent.mkdir()
    try:
        assert missing_drop_folder(parent / "drop", tmp_path / "store") is None  # HEAD: "not a first start"
        daemon = Daemon(load_config(_config_file(tmp_path, parent / "drop"), env={}))
        try:
            assert (parent / "drop").is_dir()
        finally:
            daemon.close()
    finally:
        import shutil

        shutil.rmtree(parent, ignore_errors=True)
