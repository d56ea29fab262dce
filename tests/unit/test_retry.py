"""Backoff: full jitter under an exponentially growing ceiling, capped by max_ms."""

from __future__ import annotations

import random
import statistics

import pytest

from ocrbooth.retry import backoff_s

INITIAL_MS = 100
MAX_MS = 3_000
SAMPLES = 2_000


def _ceiling_s(attempt: int) -> float:
    ceiling_ms: int = min(MAX_MS, INITIAL_MS * 2 ** (attempt - 1))
    return ceiling_ms / 1000


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_backoff_stays_within_the_full_jitter_range(seed: int) -> None:
    """Every delay lies in [0, min(max, initial * 2**(n-1))] seconds, for attempts well past the cap."""
    rng = random.Random(seed)
    for attempt in range(1, 16):
        ceiling = _ceiling_s(attempt)
        delays = [backoff_s(attempt, initial_ms=INITIAL_MS, max_ms=MAX_MS, rng=rng) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in delays), (attempt, max(delays), ceiling)
        # Full jitter: the draws spread over most of the range rather than clustering at one end.
        assert max(delays) > 0.8 * ceiling
        assert min(delays) < 0.2 * ceiling


def test_backoff_grows_in_expectation_until_the_cap() -> None:
    """The mean delay roughly doubles each attempt (half the ceiling) until it levels off at half of max_ms."""
    rng = random.Random(42)
    means = {
        attempt: statistics.fmean(
            backoff_s(attempt, initial_ms=INITIAL_MS, max_ms=MAX_MS, rng=rng) for _ in range(SAMPLES)
        )
        for attempt in range(1, 10)
    }
    for attempt, mean in means.items():
        assert mean == pytest.approx(_ceiling_s(attempt) / 2, rel=0.1), attempt
    # Below the cap (100, 200, ..., 1600 ms ceilings) each attempt waits longer on average than the one before.
    for attempt in range(1, 5):
        assert means[attempt + 1] > means[attempt] * 1.5
    assert means[8] == pytest.approx(means[9], rel=0.1)  # both capped at 3 s


def test_same_seed_gives_the_same_delays() -> None:
    """With an explicit Random the delays are reproducible."""
    first = [backoff_s(n, initial_ms=200, max_ms=10_000, rng=random.Random(7)) for n in range(1, 8)]
    second = [backoff_s(n, initial_ms=200, max_ms=10_000, rng=random.Random(7)) for n in range(1, 8)]
    assert first == second


def test_huge_attempt_numbers_stay_capped() -> None:
    """An absurd attempt count neither overflows nor exceeds max_ms."""
    delay = backoff_s(10_000, initial_ms=200, max_ms=10_000, rng=random.Random(3))
    assert 0.0 <= delay <= 10.0
