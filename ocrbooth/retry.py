"""Exponential backoff with full jitter (AWS architecture blog's "full jitter"): pure functions."""

from __future__ import annotations

import random


def backoff_s(attempt: int, *, initial_ms: int, max_ms: int, rng: random.Random | None = None) -> float:
    """Delay before retry number `attempt` (1-based): uniform in [0, min(max, initial * 2**(attempt-1))]."""
    ceiling_ms = min(max_ms, initial_ms * 2 ** max(0, attempt - 1))
    return (rng or random).uniform(0, ceiling_ms) / 1000.0
