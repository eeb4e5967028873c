"""A killed daemon's leases at restart (helper chaos soak): they were taken over only when they
expired, ``store.lease_seconds`` after the restart (60 s by default, the images waiting). The
daemon ``annotator serve`` starts holds ``serve.lock``, so it knows every other lease is a dead
daemon's: taken over at once, the claim still counted (``max_attempts`` catches a crash loop)."""
from __future__ import annotations

import time
from typing import Any, Callable

from service.daemon import Daemon
from service.store import Store


def _leased_by_a_dead_daemon(make_config: Callable[..., Any], small_jpeg: Callable[[int], bytes]) -> tuple[Any, str]:
    config = make_config(store__lease_seconds=3600.0)
    store = Store(config.store.root)
    image_id, _ = store.ingest(small_jpeg(5), "grpc:cam-1")
    assert [r.image_id for r in store.claim("deadhost:4242:0badc0de")] == [image_id]
    store.close()
    return config, image_id


def _state_after(daemon: Daemon, image_id: str, seconds: float) -> str:
    daemon.start()
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            row = daemon.store.get(image_id)
            if row.state != "received":
                return row.state
            time.sleep(0.1)
        return daemon.store.get(image_id).state
    finally:
        daemon.close()


def test_the_only_daemon_takes_over_a_killed_daemons_leases_at_start(make_config: Callable[..., Any],
                                                                     small_jpeg: Callable[[int], bytes]) -> None:
    config, image_id = _leased_by_a_dead_daemon(make_config, small_jpeg)
    # HEAD: still "received" for the lease's hour
    assert _state_after(Daemon(config, sole=True), image_id, 60) != "received"
    row = Store(config.store.root).get(image_id)
    assert row.attempts == 2 and row.record is not None  # the dead daemon's claim counted, then ours


def test_a_daemon_that_may_not_be_alone_waits_for_the_lease(make_config: Callable[..., Any],
                                                            small_jpeg: Callable[[int], bytes]) -> None:
    config, image_id = _leased_by_a_dead_daemon(make_config, small_jpeg)
    assert _state_after(Daemon(config), image_id, 2) == "received"  # another daemon may hold it: left
