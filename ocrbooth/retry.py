"""Retries: capped exponential backoff with full jitter (AWS architecture blog's "full jitter").

The one mechanism every retrying caller uses: `retry()` for "try until it works" loops (publisher sends, the
consumer's own S3 writes), `Backoff` alone where the policy is more than that (the dispatcher, whose S3
outages spend no attempts and wait for recovery instead of sleeping; the outage probes).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def backoff_s(attempt: int, *, initial_ms: int, max_ms: int, rng: random.Random | None = None) -> float:
    """Delay before retry number `attempt` (1-based): uniform in [0, min(max, initial * 2**(attempt-1))]."""
    ceiling_ms = min(max_ms, initial_ms * 2 ** max(0, attempt - 1))
    return (rng or random).uniform(0, ceiling_ms) / 1000.0


class Backoff:
    """The delays after successive failures: the n-th is `backoff_s(n)`, at least `floor_s`."""

    def __init__(self, initial_ms: int, max_ms: int, *, floor_s: float = 0.0, rng: random.Random | None = None) -> None:
        self.initial_ms = initial_ms
        self.max_ms = max_ms
        self.floor_s = floor_s
        self.rng = rng
        self.failures = 0

    def next_s(self) -> float:
        """Count one more failure and return the delay before the next try."""
        self.failures += 1
        return max(self.floor_s, backoff_s(self.failures, initial_ms=self.initial_ms, max_ms=self.max_ms, rng=self.rng))


async def retry(
    op: Callable[[], Awaitable[T]],
    *,
    retry_on: type[Exception] | tuple[type[Exception], ...],
    backoff: Backoff,
    on_retry: Callable[[Exception, int, float], Awaitable[None]] | None = None,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
) -> T:
    """Await `op()` until it returns. A `retry_on` failure calls `on_retry(exc, failures, delay)`, then waits
    `delay` through `sleep`. Anything else `op` raises propagates, as does what `on_retry` or `sleep` raise:
    that is how a caller gives up or lets shutdown interrupt the wait."""
    while True:
        try:
            return await op()
        except retry_on as exc:
            delay = backoff.next_s()
            if on_retry is not None:
                await on_retry(exc, backoff.failures, delay)
            await sleep(delay)
