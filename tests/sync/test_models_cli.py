"""`annotator models pull | rollback` reload the daemon at the config's [server] listen (`adopt` installs only)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import pytest

from service.bundle import Bundle
from service.config import load_config
from service.daemon import Daemon
from service.server import create_server
from sync.models_cli import register

from s3servers import free_port
from test_models import publish

pytestmark = pytest.mark.slow


def models_cli(config: Path, registry: Path, capsys: pytest.CaptureFixture[str]) -> Callable[..., str]:
    """``run("models", "pull", ...)``: an ``annotator models`` command with this config and registry,
    which must exit 0; its stdout."""
    parser = argparse.ArgumentParser(prog="annotator")
    register(parser.add_subparsers(dest="command", required=True))

    def run(*argv: str) -> str:
        args = parser.parse_args([*argv, "--config", str(config), "--registry", str(registry)])
        assert args.func(args) == 0
        return capsys.readouterr().out

    return run


def test_pull_and_rollback_reload_the_daemon_at_server_listen(tmp_path: Path, pose_bundle: Bundle,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """[sync.models] daemon defaults to [server] listen, as the example config says, but only the
    agent applied it: `models pull` and `models rollback` moved `current` and left the daemon on
    the old bundle until a restart (a rollback, the emergency path, too). A daemon that is not
    running (the connection refused) is no error: the pull switches, and the daemon starts on it."""
    port = free_port()
    config = tmp_path / "annotator.toml"
    config.write_text(f'[server]\nlisten = "127.0.0.1:{port}"\n[store]\nroot = "store"\n'
                      f'[engine]\nbundle = "store/models/current"\n')
    run = models_cli(config, tmp_path / "registry", capsys)

    from service.store import Store

    Store(tmp_path / "store").close()
    assert f"{pose_bundle.id} installed as current" in run("models", "adopt", str(pose_bundle.path))
    publish(tmp_path / "registry", pose_bundle, "b-next", "2030-01-01T00:00:00Z", None)
    out = run("models", "pull", "--once")  # no daemon runs yet
    assert f"no daemon answers at 127.0.0.1:{port}" in out and "switched to b-next" in out
    daemon = Daemon(load_config(config, env={}))
    daemon.start()
    server, bound = create_server(daemon.config, daemon)
    try:
        assert bound == port and daemon.bundle.id == "b-next"
        assert f"rolled back to {pose_bundle.id}" in run("models", "rollback")
        assert daemon.bundle.id == pose_bundle.id
        publish(tmp_path / "registry", pose_bundle, "b-third", "2030-02-01T00:00:00Z", None)
        assert "switched to b-third" in run("models", "pull", "--once")
        assert daemon.bundle.id == "b-third"
    finally:
        server.stop(grace=1.0).wait(5)
        daemon.close()


def test_only_a_refused_connection_counts_as_no_daemon(capsys: pytest.CaptureFixture[str]) -> None:
    """Any UNAVAILABLE counted as "no daemon": a rollback against a daemon that refused the TLS
    handshake, or answered busy, reported success while that daemon kept serving the bundle it
    had just refused."""
    import grpc

    from sync.errors import RetryableError
    from sync.models_cli import _unless_down

    class Unavailable(grpc.RpcError):
        def __init__(self, details: str) -> None:
            self._details = details

        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.UNAVAILABLE

        def details(self) -> str:
            return self._details

    def failing(details: str):  # type: ignore[no-untyped-def]
        def reload(path: str) -> None:
            raise RetryableError(f"daemon: {details}") from Unavailable(details)
        return reload

    refused = "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:9: Connection refused"
    assert _unless_down(failing(refused), "127.0.0.1:9")("models/current") is None
    assert "no daemon answers at 127.0.0.1:9" in capsys.readouterr().out
    for details in ("failed to connect to all addresses; last error: UNKNOWN: Ssl handshake failed",
                    "server busy: 32 Annotate calls are already waiting"):
        with pytest.raises(RetryableError):
            _unless_down(failing(details), "127.0.0.1:9")("models/current")


def test_a_polling_pull_says_nothing_new_once(tmp_path: Path, pose_bundle: Bundle, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """`annotator models pull` (no --once) polls like the agent: it printed "no newer bundle
    accepted" at every poll, for good; now once while nothing changes, naming --once."""
    import threading

    from service.store import Store

    config = tmp_path / "annotator.toml"
    config.write_text(f'[server]\nlisten = "127.0.0.1:{free_port()}"\n[store]\nroot = "store"\n'
                      f'[engine]\nbundle = "store/models/current"\n')
    Store(tmp_path / "store").close()
    parser = argparse.ArgumentParser(prog="annotator")
    register(parser.add_subparsers(dest="command", required=True))
    (tmp_path / "registry").mkdir()
    args = parser.parse_args(["models", "adopt", str(pose_bundle.path), "--config", str(config)])
    assert args.func(args) == 0
    capsys.readouterr()

    class FourPolls(threading.Event):
        polls = 0

        def wait(self, timeout: float | None = None) -> bool:
            FourPolls.polls += 1
            return FourPolls.polls >= 4

    monkeypatch.setattr("sync.models_cli.threading.Event", FourPolls)
    args = parser.parse_args(["models", "pull", "--config", str(config), "--registry", str(tmp_path / "registry")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert FourPolls.polls == 4 and out.count("no newer bundle accepted") == 1, out
    assert "--once: one pass" in out


def test_models_say_when_the_daemon_loads_another_bundle_than_current(tmp_path: Path, pose_bundle: Bundle,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A config whose engine.bundle names a bundle folder (the demo's: the shipped bundle), not
    <models root>/current: `models pull` said the pulled bundle "becomes active at the daemon's
    next start", and the daemon loaded engine.bundle at every start, the retrained bundle never
    used. adopt, pull and rollback say so now, naming the key, where it was set and the fix; the
    agent's check (doctor's WARN) too. A config naming current (through a symlinked folder
    above it too) hears nothing."""
    from sync.agent import bundle_warning, validated_settings
    from sync.config import load_sync_config

    from service.store import Store

    Store(tmp_path / "store").close()
    config = tmp_path / "annotator.toml"
    run = models_cli(config, tmp_path / "registry", capsys)

    config.write_text(f'[server]\nlisten = "127.0.0.1:{free_port()}"\n[store]\nroot = "store"\n'
                      f'[engine]\nbundle = "{pose_bundle.path}"\n[sync.models.registry]\nkind = "local"\n'
                      f'root = "registry"\n')
    (tmp_path / "registry").mkdir()
    out = run("models", "adopt", str(pose_bundle.path))
    current = tmp_path / "store" / "models" / "current"
    assert f"note: engine.bundle is {pose_bundle.path} (from {config}), not {current}" in out
    assert f'engine.bundle = "{current}"' in out
    publish(tmp_path / "registry", pose_bundle, "b-next", "2030-01-01T00:00:00Z", None)
    assert "switched to b-next" in (out := run("models", "pull", "--once")) and "note: engine.bundle is" in out
    assert "note: engine.bundle is" in run("models", "rollback")
    cfg = load_sync_config(config, env={})
    assert "engine.bundle is" in (bundle_warning(cfg, validated_settings(cfg, {})[1]) or "")

    (tmp_path / "link").symlink_to(tmp_path)  # the same current through another path
    config.write_text(config.read_text().replace(str(pose_bundle.path), str(tmp_path / "link/store/models/current")))
    assert "note:" not in run("models", "pull", "--once")
    cfg = load_sync_config(config, env={})
    assert bundle_warning(cfg, validated_settings(cfg, {})[1]) is None
