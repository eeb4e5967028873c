"""A perception engineer's first hour through the CLI: the mistakes of a hand-written config and
of wrong arguments end in one line that says what to fix and a non-zero exit code, never a
traceback or a quiet success, and nothing else is touched."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from service.cli import main
from service.store import Store

ROOT = Path(__file__).resolve().parents[2]
DEMO_BUNDLE = ROOT / "service" / "assets" / "demo_bundle"
SAMPLES = ROOT / "service" / "assets" / "samples"


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "annotator.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture()
def busy_port() -> Iterator[int]:
    """A loopback port another process listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_serve_on_a_port_in_use_is_one_line(tmp_path: Path, busy_port: int,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A second `annotator serve` (or another program on the port) ended in grpc's RuntimeError
    traceback: create_server's `if not port` check expected the port 0 older grpcio returned."""
    args = ["serve", "--set", f"server.listen=127.0.0.1:{busy_port}", "--set", f"store.root={tmp_path / 'store'}",
            "--set", f"engine.bundle={DEMO_BUNDLE}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"server.listen: cannot listen on 127.0.0.1:{busy_port}" in err and "Traceback" not in err


@pytest.mark.parametrize("key", ["drop.folder", "outputs.sidecar_dir"])
def test_serve_with_a_file_where_a_folder_belongs_names_the_key(tmp_path: Path, key: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Said "[Errno 17] File exists: '.../drop'" after the bundle had loaded, naming no key."""
    (tmp_path / "drop").write_text("not a folder")
    args = ["serve", "--set", "server.listen=127.0.0.1:0", "--set", f"store.root={tmp_path / 'store'}",
            "--set", f"engine.bundle={DEMO_BUNDLE}", "--set", f"{key}={tmp_path / 'drop'}"]
    assert main(args) == 2
    assert f"{key}: {tmp_path / 'drop'} is a file, not a folder" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()  # refused before anything was opened


def test_export_without_a_store_refuses_and_creates_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """`annotator export --coco out.json` without --config (or with a mistyped store.root) made an
    empty store in the working directory and wrote an empty export, exit 0; show and prune refuse."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ANNOTATOR_CONFIG", raising=False)
    assert main(["export", "--coco", str(tmp_path / "out.json")]) == 2
    assert "export: no store at annotator-data (store.root)" in capsys.readouterr().err
    assert not (tmp_path / "annotator-data").exists() and not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("extra, message", [
    (["--limit", "0"], "--limit must be 1 or more, got 0"),
    (["--limit", "-1"], "--limit must be 1 or more, got -1"),
    (["--images", "no-such-folder"], "images folder no-such-folder does not exist"),
])
def test_evaluate_with_wrong_arguments_refuses_before_it_runs(tmp_path: Path, extra: list[str], message: str,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """--limit 0 evaluated no image and -1 all but the last; a wrong --images skipped every image
    with a warning: all three printed a metrics table (visibility accuracy 0.18 of nothing), exit 0."""
    pytest.importorskip("pycocotools", reason="evaluate needs the eval extra")
    out = tmp_path / "eval"
    assert main(["evaluate", str(DEMO_BUNDLE), str(SAMPLES), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_sync_settings_of_the_wrong_type_name_the_type(tmp_path: Path) -> None:
    """"expected <class 'int'>" and "<class 'dict'>" are Python, not TOML."""
    from sync.agent import validated_settings
    from sync.config import load_sync_config
    from sync.errors import SyncConfigError

    cases = [("[sync]\nbatch_size = '50'\n", "sync.batch_size: expected an integer, got '50'"),
             ("[sync]\npoll_interval = '10'\n", "sync.poll_interval: expected a number, got '10'"),
             ("[sync.models]\nregistry = 'models'\n", "sync.models.registry: expected a table, got 'models'")]
    for text, message in cases:
        config = write_config(tmp_path, "[store]\nroot = 'store'\n" + text)
        with pytest.raises(SyncConfigError) as info:
            validated_settings(load_sync_config(config, env={}), {})
        assert message in str(info.value)


def test_models_pull_from_a_registry_folder_that_does_not_exist_is_an_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A mistyped --registry pulled nothing and said only "no newer bundle accepted", exit 0."""
    Store(tmp_path / "store").close()
    config = write_config(tmp_path, "[store]\nroot = 'store'\n")
    argv = ["models", "pull", "--once", "--config", str(config), "--registry", str(tmp_path / "registy")]
    assert main(argv) == 2
    assert f"model registry {tmp_path / 'registy'} is not a folder" in capsys.readouterr().err
    (tmp_path / "registry").mkdir()
    assert main([*argv[:-1], str(tmp_path / "registry")]) == 0
    assert main(["models", "list", "--config", str(config), "--registry", str(tmp_path / "registy")]) == 0
    assert "is not a folder" in capsys.readouterr().out


# -- a store, a folder or a bundle file this user may not read or write --------------------------
def _unprivileged() -> list[str]:
    """A command prefix that runs without the power to ignore file permissions: nothing for a
    normal user; for root, setpriv without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    prefix = [setpriv or "setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    if setpriv is None or subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
        pytest.skip("root without a way to drop CAP_DAC_OVERRIDE: file permissions cannot be tested")
    return prefix


def _annotator(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ANNOTATOR_CONFIG": ""}
    return subprocess.run([*_unprivileged(), sys.executable, "-m", "service.cli", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_doctor_reports_what_it_may_not_read_instead_of_ending(tmp_path: Path) -> None:
    """A drop folder and store under a folder this user may not search, and a bundle file it may
    not read: doctor ended in "annotator doctor: error: [Errno 13] Permission denied" with no
    report at all, so the one command meant to say what is wrong said nothing useful."""
    closed = tmp_path / "closed"
    closed.mkdir()
    bundle = tmp_path / "bundle"
    shutil.copytree(DEMO_BUNDLE, bundle)
    (bundle / "head.onnx").chmod(0)
    config = write_config(tmp_path, f"[store]\nroot = 'closed/store'\n[drop]\nfolder = 'closed/drop'\n"
                                    f"[engine]\nbundle = {json.dumps(str(bundle))}\n")
    closed.chmod(0)
    try:
        run = _annotator("doctor", "--config", str(config), cwd=tmp_path)
    finally:
        closed.chmod(0o755)
    assert run.returncode == 1 and "Traceback" not in run.stderr and "error:" not in run.stderr, run.stderr
    lines = {line.split("  ")[0]: line for line in run.stdout.splitlines()}
    assert "cannot look at it: Permission denied" in lines["folder drop.folder"]
    assert "cannot look at it: Permission denied" in lines["folder store.root"]
    assert "FAIL" in lines["bundle"] and "Permission denied" in lines["bundle"]
    assert {"disk", "providers", "clock", "s3", "review"} <= set(lines)  # the rest of the report is there


def test_a_store_this_user_may_not_write_is_one_line_everywhere(tmp_path: Path) -> None:
    """export, dataset status/export, models pull and sync --once on a store another user owns
    ended in "sqlite3.OperationalError: attempt to write a readonly database" tracebacks."""
    store = tmp_path / "store"
    Store(store).close()
    (tmp_path / "registry").mkdir()
    config = write_config(tmp_path, "[store]\nroot = 'store'\n")
    for folder in ("models", "dataset"):  # the folders the commands make are there: only the store is refused
        (store / folder).mkdir()
    (store / "store.sqlite3").chmod(0o444)
    store.chmod(0o555)
    try:
        for argv in (["export", "--config", str(config), "--coco", str(tmp_path / "out.json")],
                     ["dataset", "status", "--config", str(config)],
                     ["dataset", "export", str(tmp_path / "ds"), "--config", str(config)],
                     ["models", "pull", "--once", "--config", str(config), "--registry", str(tmp_path / "registry")],
                     ["sync", "--once", "--config", str(config)]):
            run = _annotator(*argv, cwd=tmp_path)
            assert run.returncode == 2 and "Traceback" not in run.stderr, (argv, run.stderr)
            assert f"cannot open the store at {store}" in run.stderr and "sudo -u annotator" in run.stderr, argv
    finally:
        store.chmod(0o755)
