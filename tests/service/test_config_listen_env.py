"""The daemon's configuration as an operator writes it on a real box: listen addresses that gRPC
would misread, and environment variables aimed at the sync agent's tables (which have none)."""
from __future__ import annotations

from pathlib import Path

import pytest

from service.config import load_config
from service.errors import ConfigError
from sync.config import load_sync_config
from sync.errors import SyncConfigError


@pytest.mark.parametrize("name, table, leaf", [
    ("ANNOTATOR_SYNC__BATCH_SIZE", "[sync]", "batch_size"),
    ("ANNOTATOR_SYNC__TARGET__BUCKET", "[sync.target]", "bucket"),
    ("ANNOTATOR_SYNC__REVIEW__LABELSTUDIO__URL", "[sync.review.labelstudio]", "url"),
])
def test_an_environment_variable_for_the_sync_tables_says_there_are_none(tmp_path: Path, name: str, table: str,
                                                                        leaf: str) -> None:
    # HEAD: "sync.batch_size: unknown key ...; did you mean 'engine.batch_size'?" (a daemon key),
    # or the list of every daemon key for the nested ones.
    config = tmp_path / "annotator.toml"
    config.write_text('[sync]\nbatch_size = 5\n')
    with pytest.raises(ConfigError) as info:
        load_config(config, env={name: "7"})
    message = str(info.value)
    assert message.startswith(f"{name}: the [sync] tables are read from the file only")
    assert f"set {leaf} in {table} of the config file" in message and "engine." not in message
    with pytest.raises(SyncConfigError, match=f"{name}: the \\[sync\\] tables are read from the file only"):
        load_sync_config(config, env={name: "7"})  # the agent says the same


@pytest.mark.parametrize("listen", ["::1:50051", "127.0.0.256:50051", "10.0.0:50051", "[::1:50051", "[1.2.3.4]:5"])
def test_a_listen_address_grpc_would_misread_is_refused_as_such(listen: str) -> None:
    # HEAD: "::1:5000" passed (gRPC bound [::0.1.80.0]:443 and failed "the port is in use");
    # "127.0.0.256" was called "reachable from other machines".
    for key in ("server.listen", "metrics.listen"):
        with pytest.raises(ConfigError, match=rf"^{key}: expected .*host:port.*IPv6 address in brackets"):
            load_config(None, env={}, overrides={key: listen})


@pytest.mark.parametrize("listen", ["[::1]:0", "localhost:50051", "127.0.0.1:1", "[::1]:50051"])
def test_good_listen_addresses_still_pass(listen: str) -> None:
    assert load_config(None, env={}, overrides={"server.listen": listen}).server.listen == listen
    assert load_config(None, env={}, overrides={"metrics.listen": listen}).metrics.listen == listen
