"""A ReloadModels naming a bundle, answered while ``serve`` follows the ``current`` link at
start-up (daemon-life audit).

``Daemon.follow_configured_bundle`` (called once the server listens) checked that ``current``
had moved since the daemon read it, then reloaded ``current``: a ReloadModels with an explicit
bundle path answered between the check and that reload (it said "reloaded") was undone at once,
the daemon serving what ``current`` names. The window is hit here deterministically: the
explicit reload is made from the warning that follow_configured_bundle logs right after its check.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from procs import two_bundles_adopted
from service.config import load_config


_models = two_bundles_adopted


def test_an_explicit_reload_during_the_follow_of_current_is_not_undone(tmp_path: Path) -> None:
    from service.daemon import Daemon

    slots = _models(tmp_path)
    config = load_config(None, env={}, overrides={
        "store.root": str(tmp_path / "store"), "store.min_free_mb": 0, "engine.threads": 1,
        "engine.bundle": str(slots.root / "current")})
    daemon = Daemon(config, workers=1)  # loads bundle-b through current
    explicit = str(slots.root / "bundles" / "bundle-b")
    later: list[threading.Thread] = []
    errors: list[BaseException] = []

    def explicit_reload() -> None:
        try:
            daemon.reload(explicit)  # what ReloadModels(bundle_path=...) calls
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    class Hook(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "while the daemon started" not in record.getMessage():
                return
            # the client's ReloadModels(bundle-b) comes now, between the check and the load
            if daemon._reload_lock.acquire(blocking=False):  # HEAD: nothing holds it; it is answered
                daemon._reload_lock.release()
                explicit_reload()
            else:  # the check holds it: the explicit reload waits for the follow, then comes after
                later.append(threading.Thread(target=explicit_reload))
                later[-1].start()

    hook = Hook()
    logger: Any = logging.getLogger("service.daemon")
    logger.addHandler(hook)
    try:
        slots.switch(slots.root / "bundles" / "bundle-a")  # moved while the daemon started
        daemon.follow_configured_bundle()
        for thread in later:
            thread.join(120)
        assert not errors, errors
        status = daemon.status()
        # HEAD: bundle-a from .../current, the explicit ReloadModels undone after it was answered
        assert (status.bundle_id, status.bundle_path) == ("bundle-b", explicit)
    finally:
        logger.removeHandler(hook)
        daemon.close()
