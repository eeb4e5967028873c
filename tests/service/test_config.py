"""Configuration: precedence, validation errors that name the key, unknown-key suggestions."""
from __future__ import annotations

from pathlib import Path

import pytest

from service.config import KEYS, Config, load_config
from service.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "annotator.example.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "annotator.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_are_safe() -> None:
    cfg = load_config(None, env={})
    assert cfg == Config()
    assert cfg.server.listen == "127.0.0.1:50051"
    assert cfg.server.max_message_bytes == 32 * 1024 * 1024
    assert cfg.drop.max_pixels == 50_000_000
    assert cfg.judge.threshold is None and cfg.judge.score_threshold is None


def test_precedence_command_line_over_env_over_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nlisten = "127.0.0.1:1"\nmax_message_bytes = 2048\n'
                           '[judge]\nthreshold = 0.2\nseed = 3\n[store]\nroot = "data"\n')
    env = {"ANNOTATOR_SERVER__LISTEN": "127.0.0.1:2", "ANNOTATOR_JUDGE__THRESHOLD": "0.3",
           "ANNOTATOR_ENGINE__PROVIDERS": "CUDAExecutionProvider, CPUExecutionProvider",
           "ANNOTATOR_JUDGE__HOURLY_BUDGET": "none", "ANNOTATOR_JUDGE__NEAR_DUPLICATE": "off",
           "ANNOTATOR_UNRELATED": "ignored", "HOME": "/root"}
    cfg = load_config(path, env=env, overrides={"server.listen": "127.0.0.1:3", "drop.max_bytes": "4096"})
    assert cfg.server.listen == "127.0.0.1:3"  # command line
    assert cfg.judge.threshold == 0.3  # environment over file
    assert cfg.server.max_message_bytes == 2048 and cfg.judge.seed == 3  # file over default
    assert cfg.drop.max_bytes == 4096 and cfg.drop.stable_seconds == 2.0
    assert cfg.engine.providers == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert cfg.judge.hourly_budget is None and cfg.judge.near_duplicate is False
    assert cfg.store.root == tmp_path / "data"  # relative to the file's folder
    assert load_config(None, env={"ANNOTATOR_CONFIG": str(path)}).judge.seed == 3


@pytest.mark.parametrize("text, env, overrides, message", [
    ("[judge]\nthreshold = 1.5\n", {}, {}, "judge.threshold: expected a number in [0, 1], got 1.5"),
    ("[judge]\nthreshold = 'high'\n", {}, {}, "judge.threshold: expected a number, got 'high'"),
    ("", {"ANNOTATOR_ENGINE__BATCH_SIZE": "eight"}, {}, "engine.batch_size: expected an integer, got 'eight'"),
    ("", {}, {"drop.processed_mode": "copy"}, "drop.processed_mode: expected one of 'move', 'keep', 'delete'"),
    ("[server]\nlisten = 'localhost'\n", {}, {}, "server.listen: expected host:port"),
    ("[server]\ntls_cert = 'a.pem'\n", {}, {}, "server.tls_cert: tls_cert and tls_key must be set together"),
    ("[server]\nlisten = '0.0.0.0:50051'\n", {}, {}, "server.listen: 0.0.0.0:50051 is reachable"),
    ("[store]\nlease_seconds = 0\n", {}, {}, "store.lease_seconds: expected a number of seconds > 0"),
    ("[judge]\nnear_duplicate = 1\n", {}, {}, "judge.near_duplicate: expected true or false"),
    ("[judge]\nreview_share = 5\n", {}, {}, "judge.review_share: expected a share in (0, 1], e.g. 0.05"),
    ("", {"ANNOTATOR_JUDGE__REVIEW_WINDOW": "3"}, {}, "judge.review_window: expected an integer number of images"),
    ("[judge]\nscore_fn = 'mymodule'\n", {}, {}, "judge.score_fn: expected 'default' or 'package.module:function'"),
    ("[store]\nroot = 5\n", {}, {}, "store.root: expected a path"),
    ("[engine]\nletterbox = 'stretch'\n", {}, {}, "engine.letterbox: expected 'square' or 'rect'"),
    ("[retention]\nauto_image_days = 0\n", {}, {}, "retention.auto_image_days: expected a number of days > 0"),
    ("", {"ANNOTATOR_RETENTION__INTERVAL_MINUTES": "0.5"}, {}, "retention.interval_minutes: expected a number of minutes >= 1"),
    ("judge = 3\n", {}, {}, "judge: expected a [judge] table"),
    ("[judge\n", {}, {}, "cannot be read as TOML"),
])
def test_errors_name_the_key(tmp_path: Path, text: str, env: dict, overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env=env, overrides=overrides)
    assert message in str(info.value)


def test_error_says_where_the_value_came_from(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"from environment ANNOTATOR_JUDGE__AUDIT_FRACTION"):
        load_config(None, env={"ANNOTATOR_JUDGE__AUDIT_FRACTION": "2"})


@pytest.mark.parametrize("text, env, overrides, message", [
    ("[server]\nlistne = '127.0.0.1:1'\n", {}, {}, "server.listne: unknown key (from"),
    ("[server]\nlistne = '127.0.0.1:1'\n", {}, {}, "did you mean 'server.listen'?"),
    ("[sever]\nlisten = '127.0.0.1:1'\n", {}, {}, "did you mean 'server'?"),
    ("", {"ANNOTATOR_JUDGE__TRESHOLD": "0.5"}, {}, "did you mean 'judge.threshold'?"),
    ("", {}, {"store.lease_second": "5"}, "did you mean 'store.lease_seconds'?"),
    ("[synk]\nbatch_size = 5\n", {}, {}, "did you mean 'sync'?"),
    ("[sync]\nbatch_size = 5\n[exporter]\nx = 1\n", {}, {}, "exporter: unknown key"),
])
def test_unknown_keys_get_a_suggestion(tmp_path: Path, text: str, env: dict, overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env=env, overrides=overrides)
    assert message in str(info.value)


def test_sync_table_is_passed_through_raw(tmp_path: Path) -> None:
    text = ("[store]\nroot = 'data'\n[sync]\nappliance_id = 'lab-1'\nunknown_to_service = [1, 2]\n"
            "[sync.target]\nkind = 's3'\nbucket = 'edge'\n[sync.review]\nbackend = 'labelstudio'\n"
            "[sync.registry]\nroot = 'models'\n")
    cfg = load_config(write(tmp_path, text), env={})
    assert cfg.store.root == tmp_path / "data"
    assert cfg.extra["sync"] == {"appliance_id": "lab-1", "unknown_to_service": [1, 2],
                                 "target": {"kind": "s3", "bucket": "edge"}, "review": {"backend": "labelstudio"},
                                 "registry": {"root": "models"}}  # raw: not validated, paths untouched
    assert "sync" not in cfg.to_dict()
    with pytest.raises(TypeError):
        cfg.extra["sync"] = {}  # type: ignore[index]
    assert dict(load_config(None, env={}).extra) == {}


@pytest.mark.parametrize("name, message", [
    ("ANNOTATOR_STORE_ROOT", "did you mean ANNOTATOR_STORE__ROOT?"),
    ("ANNOTATOR_SERVER_TOKEN", "did you mean ANNOTATOR_SERVER__TOKEN?"),
    ("ANNOTATOR_ENGINE_RUN_BATCH", "did you mean ANNOTATOR_ENGINE__RUN_BATCH?"),
])
def test_a_single_underscore_after_the_section_is_refused_not_ignored(tmp_path: Path, name: str,
                                                                      message: str) -> None:
    """ANNOTATOR_STORE_ROOT (one underscore) was skipped without a word: the daemon ran on the
    file's store, not the one the operator set."""
    with pytest.raises(ConfigError) as info:
        load_config(None, env={name: "x-secret-value"})
    assert message in str(info.value) and "x-secret-value" not in str(info.value)
    # the other ANNOTATOR_* variables (the clients' token, the config file, Label Studio's token) stay free
    load_config(None, env={"ANNOTATOR_TOKEN": "t", "ANNOTATOR_LABEL_STUDIO_TOKEN": "t", "ANNOTATOR_UNRELATED": "x"})


def test_a_sync_key_that_is_not_a_table_is_refused(tmp_path: Path) -> None:
    """``sync = "s3"`` above the first table: passed through as it was, then the agent, doctor
    and export ended in "dictionary update sequence element #0 has length 1"."""
    with pytest.raises(ConfigError, match=r"sync: expected a \[sync\] table, got 's3'"):
        load_config(write(tmp_path, "sync = 's3'\n[store]\nroot = 'data'\n"), env={})


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", env={})


def test_tls_and_token_open_non_loopback(tmp_path: Path) -> None:
    cfg = load_config(None, env={"ANNOTATOR_SERVER__TOKEN": "s3cret"}, overrides={"server.listen": "0.0.0.0:50051"})
    assert cfg.server.token == "s3cret"
    cfg = load_config(write(tmp_path, "[server]\nlisten = '[::1]:9'\n"), env={})
    assert cfg.server.listen == "[::1]:9"


def test_require() -> None:
    with pytest.raises(ConfigError, match="engine.bundle: required"):
        load_config(None, env={}).require("engine.bundle")
    load_config(None, env={}, overrides={"engine.bundle": "/b"}).require("engine.bundle")


def test_example_file_documents_every_key_and_loads() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    for key in KEYS:
        section, _, name = key.partition(".")
        body = text.split(f"[{section}]\n", 1)[1].split("\n[", 1)[0]
        assert f"\n{name} =" in "\n" + body or f"\n# {name} =" in "\n" + body, key
    cfg = load_config(EXAMPLE, env={})
    assert cfg.to_dict()["server"] == Config().to_dict()["server"]
    assert cfg.judge == Config().judge and cfg.drop == Config().drop and cfg.engine == Config().engine


@pytest.mark.parametrize("env, listen, error", [
    ({}, "", None),  # off by default
    ({"ANNOTATOR_METRICS__LISTEN": "127.0.0.1:9464"}, "127.0.0.1:9464", None),
    ({"ANNOTATOR_METRICS__LISTEN": "[::1]:0"}, "[::1]:0", None),
    ({"ANNOTATOR_METRICS__LISTEN": "0.0.0.0:9464"}, None, "metrics.listen: 0.0.0.0:9464 is reachable"),
    ({"ANNOTATOR_METRICS__LISTEN": "0.0.0.0:9464", "ANNOTATOR_METRICS__ALLOW_REMOTE": "true"}, "0.0.0.0:9464", None),
    ({"ANNOTATOR_METRICS__LISTEN": "9464"}, None, "metrics.listen: expected empty (off) or host:port"),
])
def test_metrics_listen_is_off_or_loopback_unless_allowed(env: dict[str, str], listen: str | None,
                                                          error: str | None) -> None:
    if error is not None:
        with pytest.raises(ConfigError, match=error.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            load_config(None, env=env)
    else:
        assert load_config(None, env=env).metrics.listen == listen


def test_the_token_is_kept_out_of_repr_to_dict_and_errors() -> None:
    cfg = load_config(None, env={"ANNOTATOR_SERVER__TOKEN": "s3cret-value"})
    assert cfg.server.token == "s3cret-value"
    assert "s3cret-value" not in repr(cfg) and cfg.to_dict()["server"]["token"] == "<set>"
    with pytest.raises(ConfigError) as err:
        load_config(None, env={}, overrides={"server.token": 987654})
    assert "987654" not in str(err.value) and str(err.value).startswith("server.token: expected a string")


def test_relative_paths_from_environment_and_command_line_are_the_working_directorys(
        tmp_path: Path, etc_and_work: tuple[Path, Path]) -> None:
    """A shell user's relative ANNOTATOR_STORE__ROOT means the working directory, and the config
    holds it absolute: a reader that joins relative paths to the file's folder (the sync agent)
    must not move it there."""
    etc, work = etc_and_work
    path = etc / "annotator.toml"
    path.write_text("[store]\nroot = 'data'\n[engine]\nbundle = 'bundle'\n", encoding="utf-8")
    cfg = load_config(path, env={"ANNOTATOR_STORE__ROOT": "env-store"}, overrides={"engine.bundle": "cli-bundle"})
    assert cfg.store.root == work / "env-store" and cfg.store.root.is_absolute()
    assert cfg.engine.bundle == work / "cli-bundle" and cfg.engine.bundle.is_absolute()
    cfg = load_config(path, env={})
    assert cfg.store.root == etc / "data" and cfg.engine.bundle == etc / "bundle"  # file values: its folder
    cfg = load_config(Path("../etc/annotator.toml"), env={})  # a relative --config: still the file's folder
    assert cfg.store.root.is_absolute() and cfg.store.root.resolve() == etc / "data"
    cfg = load_config(path, env={"ANNOTATOR_STORE__ROOT": str(tmp_path / "abs")})
    assert cfg.store.root == tmp_path / "abs"  # absolute: never rebased
    assert load_config(None, env={}).store.root == Path("annotator-data")  # the default: as declared
