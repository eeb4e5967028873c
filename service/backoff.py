"""Exponential backoff with full jitter, as a pure function of the attempt and the random source.

Used by the gRPC client (``service.client``) and the sync agent's retries (``sync.backoff``).
"""
from __future__ import annotations

import random


def compute_backoff(attempt: int, base: float = 0.1, cap: float = 5.0, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based): uniform in [0, min(cap, base * 2**attempt)].

    "Full jitter" (AWS architecture blog, 2015): spreads the retries of many appliances that
    lost the same server at the same moment. ``rng`` None uses the ``random`` module's source.
    """
    if attempt < 0 or base < 0 or cap < 0:
        raise ValueError(f"compute_backoff: expected attempt, base, cap >= 0, got {attempt}, {base}, {cap}")
    ceiling = min(cap, base * (2.0 ** min(attempt, 62)))
    return (rng or random).uniform(0.0, ceiling)
