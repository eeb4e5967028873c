"""The sync agent: one long-running process that runs its tasks in turn until asked to stop.

A task is anything with ``name`` and ``run_once() -> bool`` (True: it did some work, so it is
asked again at once; False: nothing to do now). The uploader is one; the review poller and the
model puller plug in the same way. ``RetryableError`` from a task is logged and the agent
carries on (the work stays in the database for the next pass); ``PermanentError`` ends the run
so that the command can say what to fix.

Shutdown: SIGTERM / SIGINT only set the stop ``Event``; tasks check it between objects, so the
object in flight is finished, then the agent closes what it opened.
"""
from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

from .errors import RetryableError

if TYPE_CHECKING:
    from .config import SyncConfig

log = logging.getLogger(__name__)


class Task(Protocol):
    """One kind of sync work. ``run_once`` does a bounded step and says whether there was work."""

    name: str

    def run_once(self) -> bool: ...


@dataclass
class Agent:
    """Runs ``tasks`` round-robin; sleeps ``poll_interval`` seconds when none had work."""

    tasks: Sequence[Task]
    poll_interval: float = 10.0
    stop: threading.Event = field(default_factory=threading.Event)
    closers: list[Callable[[], Any]] = field(default_factory=list)
    last_error: RetryableError | None = None

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT set the stop event (main thread only)."""
        def handle(signum: int, frame: Any) -> None:
            log.info("signal %s: finishing the current object, then stopping", signal.Signals(signum).name)
            self.stop.set()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)

    def run_pass(self) -> bool:
        """Each task once; True when any had work."""
        did = False
        self.last_error = None
        for task in self.tasks:
            if self.stop.is_set():
                break
            try:
                did = task.run_once() or did
            except RetryableError as exc:
                log.warning("%s: %s; the work waits for the next pass", task.name, exc)
                self.last_error = exc
        return did

    def run(self, once: bool = False) -> None:
        """Loop until stopped; with ``once``, until a pass finds no work (or a retryable failure)."""
        try:
            while not self.stop.is_set():
                if self.run_pass():
                    continue
                if once:
                    break
                self.stop.wait(self.poll_interval)
        finally:
            self.close()

    def close(self) -> None:
        for close in reversed(self.closers):
            close()
        self.closers.clear()


def build_agent(cfg: SyncConfig, extra_tasks: Sequence[Task] = ()) -> Agent:
    """The agent for a ``SyncConfig``: the uploader first, then ``extra_tasks``."""
    from service.store import Store

    from .backoff import RetryPolicy
    from .config import open_target
    from .uploader import Uploader, UploadSettings

    stop = threading.Event()
    store = Store(cfg.store_root)
    settings = UploadSettings(cfg.appliance_id, cfg.batch_size, cfg.max_side, cfg.jpeg_quality,
                              RetryPolicy(cfg.retry_base, cfg.retry_cap, cfg.retry_attempts))
    uploader = Uploader(store, open_target(cfg.target), settings, stop=stop)
    agent = Agent([uploader, *extra_tasks], cfg.poll_interval, stop)
    agent.closers += [store.close, uploader.close]
    return agent
