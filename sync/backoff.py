"""Retries with exponential backoff and full jitter.

``compute_backoff`` (from ``service.backoff``, importable from here too) is pure (the random
source is passed in), so its bounds are testable; ``retry_call`` repeats a call on
``RetryableError`` and sleeps on a stop ``Event``, so a shutdown request ends the wait at once
instead of after the backoff.
"""
from __future__ import annotations

import logging
import random
import threading
from dataclasses import dataclass, field
from typing import Callable, TypeVar

from service.backoff import compute_backoff

from .errors import RetryableError, Stopped

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class RetryPolicy:
    """How ``retry_call`` retries: ``attempts`` tries in all (None: until stopped), backoff in seconds."""

    base: float = 0.5
    cap: float = 60.0
    attempts: int | None = 8
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        if self.attempts is not None and self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts: expected >= 1 or None, got {self.attempts}")


def retry_call(fn: Callable[[], T], what: str, policy: RetryPolicy, stop: threading.Event,
               on_retry: Callable[[], None] | None = None) -> T:
    """``fn()``, repeated after ``RetryableError`` with backoff; the last error is re-raised.

    ``on_retry`` is called before each wait (e.g. a metrics counter).

    ``PermanentError`` and anything else propagate at once. Raises ``Stopped`` when ``stop`` is
    set while waiting.
    """
    attempt = 0
    while True:
        try:
            return fn()
        except RetryableError as exc:
            attempt += 1
            if policy.attempts is not None and attempt >= policy.attempts:
                log.warning("%s: giving up for now after %d attempts: %s", what, attempt, exc)
                raise
            delay = compute_backoff(attempt - 1, policy.base, policy.cap, policy.rng)
            log.warning("%s failed (attempt %d), retrying in %.2f s: %s", what, attempt, delay, exc)
            if on_retry is not None:
                on_retry()
            if stop.wait(delay):
                raise Stopped(f"{what}: stopped while waiting to retry") from exc
