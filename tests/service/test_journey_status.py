"""``annotator status`` on an appliance whose config names another port than 50051: the journey
through the README (``annotator serve --config F``, then ``annotator status``) said "is the daemon
running?" of a daemon that was serving, and ``--config`` was refused although ``serve``, ``show``,
``doctor`` and ``sync`` all take it."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from service.ops_cli import register


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_status_finds_the_daemon_through_its_config(served: tuple[Any, int], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    daemon, port = served
    config = tmp_path / "annotator.toml"
    config.write_text(f'[server]\nlisten = "0.0.0.0:{port}"\nallow_insecure = true\n', encoding="utf-8")
    assert run(["status", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("annotator ") and f"127.0.0.1:{port}" in out.splitlines()[0]
    assert daemon.bundle.id in out
    monkeypatch.setenv("ANNOTATOR_CONFIG", str(config))  # as the example config says it names the file
    assert run(["status"]) == 0
    assert daemon.bundle.id in capsys.readouterr().out


def test_status_of_a_config_with_port_zero_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`annotator demo` writes listen = "127.0.0.1:0": no port to ask; said, not guessed."""
    from service.cli import main

    config = tmp_path / "annotator.toml"
    config.write_text('[server]\nlisten = "127.0.0.1:0"\n', encoding="utf-8")
    assert main(["status", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "picks its port at start" in err and "--server" in err and "Traceback" not in err


def test_unreachable_default_daemon_names_config_and_server(monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("ANNOTATOR_CONFIG", raising=False)
    monkeypatch.setattr("service.ops_cli.DEFAULT_SERVER", "127.0.0.1:1")  # nobody listens on port 1
    assert run(["status", "--timeout", "2"]) == 1
    err = capsys.readouterr().err
    assert "UNAVAILABLE" in err and "--config" in err and "--server" in err


def test_healthcheck_with_config_asks_the_configured_port(served: tuple[Any, int], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`healthcheck --config F` read F only for TLS and asked 127.0.0.1:50051."""
    _, port = served
    config = tmp_path / "annotator.toml"
    config.write_text(f'[server]\nlisten = "127.0.0.1:{port}"\n', encoding="utf-8")
    assert run(["healthcheck", "--config", str(config)]) == 0
    assert capsys.readouterr().out.strip() == f"127.0.0.1:{port}: SERVING"


def test_status_with_server_does_not_read_the_config(served: tuple[Any, int], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """``--server`` names the daemon: an ``$ANNOTATOR_CONFIG`` this user cannot read (install.sh
    makes it 0640 root:annotator) must not stop ``status``, and its TLS is not for another daemon."""
    daemon, port = served
    monkeypatch.setenv("ANNOTATOR_CONFIG", str(tmp_path / "unreadable.toml"))  # no such file
    assert run(["status", "--server", f"127.0.0.1:{port}"]) == 0
    assert daemon.bundle.id in capsys.readouterr().out
