"""Backoff and retry: full jitter under an exponentially growing ceiling capped by max_ms, checked with stub
random sources so every expectation is exact."""

from __future__ import annotations

import random

import pytest

from ocrbooth.retry import Backoff, backoff_s, retry

INITIAL_MS = 100
MAX_MS = 3_000


class RecordingRng(random.Random):
    """Answers every uniform(a, b) with a + fraction * (b - a) and records (a, b)."""

    def __init__(self, fraction: float) -> None:
        super().__init__(0)
        self.fraction = fraction
        self.calls: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.calls.append((a, b))
        return a + self.fraction * (b - a)


def test_the_jitter_range_doubles_from_initial_until_max() -> None:
    """Attempt n draws uniformly from [0, min(max, initial * 2**(n-1))] ms: 100, 200, ... 1600, then 3000."""
    rng = RecordingRng(1.0)
    delays = [backoff_s(n, initial_ms=INITIAL_MS, max_ms=MAX_MS, rng=rng) for n in range(1, 9)]
    assert rng.calls == [(0, 100), (0, 200), (0, 400), (0, 800), (0, 1600), (0, 3000), (0, 3000), (0, 3000)]
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.6, 3.0, 3.0, 3.0]  # the draw is in ms, the delay in seconds


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.999])
def test_the_delay_is_the_draw_in_seconds(fraction: float) -> None:
    """Whatever the random source draws inside the range is the delay (full jitter: nothing added or floored)."""
    delay = backoff_s(3, initial_ms=INITIAL_MS, max_ms=MAX_MS, rng=RecordingRng(fraction))
    assert delay == pytest.approx(fraction * 0.4)


def test_attempt_zero_or_below_uses_the_initial_range_and_huge_attempts_stay_capped() -> None:
    """Attempt numbers below 1 draw from [0, initial]; an absurd attempt count neither overflows nor passes max."""
    rng = RecordingRng(1.0)
    assert backoff_s(0, initial_ms=200, max_ms=10_000, rng=rng) == 0.2
    assert backoff_s(-5, initial_ms=200, max_ms=10_000, rng=rng) == 0.2
    assert backoff_s(10_000, initial_ms=200, max_ms=10_000, rng=rng) == 10.0


def test_without_an_rng_the_module_random_draws() -> None:
    """With no rng given, the delay comes from the random module (seeded here, so the value is known)."""
    state = random.getstate()
    try:
        random.seed(7)
        assert backoff_s(3, initial_ms=INITIAL_MS, max_ms=MAX_MS) == random.Random(7).uniform(0, 400) / 1000
    finally:
        random.setstate(state)


def test_backoff_counts_failures_and_keeps_its_floor() -> None:
    """Each next_s() counts one failure and gives backoff_s of that count, never below floor_s."""
    backoff = Backoff(INITIAL_MS, MAX_MS, floor_s=0.15, rng=RecordingRng(1.0))
    assert backoff.failures == 0
    assert [backoff.next_s() for _ in range(3)] == [0.15, 0.2, 0.4]  # the first ceiling (0.1 s) is below the floor
    assert backoff.failures == 3
    assert Backoff(INITIAL_MS, MAX_MS, floor_s=0.15, rng=RecordingRng(0.0)).next_s() == 0.15


async def test_retry_retries_listed_failures_until_the_operation_returns() -> None:
    """Each listed failure calls on_retry(exc, failures, delay) then sleeps that delay; the result comes back."""
    failures = [ConnectionError("down"), TimeoutError("slow")]
    seen: list[tuple[str, int, float]] = []
    slept: list[float] = []

    async def op() -> str:
        if failures:
            raise failures.pop(0)
        return "done"

    async def on_retry(exc: Exception, count: int, delay: float) -> None:
        seen.append((str(exc), count, delay))

    async def sleep(delay: float) -> None:
        slept.append(delay)

    result = await retry(
        op,
        retry_on=(ConnectionError, TimeoutError),
        backoff=Backoff(INITIAL_MS, MAX_MS, rng=RecordingRng(1.0)),
        on_retry=on_retry,
        sleep=sleep,
    )
    assert result == "done"
    assert seen == [("down", 1, 0.1), ("slow", 2, 0.2)]
    assert slept == [0.1, 0.2]


async def test_retry_lets_other_failures_and_give_ups_through() -> None:
    """An exception not listed propagates at once; one raised by on_retry (a caller giving up) ends the retries."""
    slept: list[float] = []

    async def sleep(delay: float) -> None:
        slept.append(delay)

    async def bug() -> None:
        raise KeyError("not transient")

    with pytest.raises(KeyError):
        await retry(bug, retry_on=ConnectionError, backoff=Backoff(1, 2), sleep=sleep)
    assert slept == []

    async def down() -> None:
        raise ConnectionError("down")

    async def give_up(exc: Exception, count: int, delay: float) -> None:
        if count == 3:
            raise RuntimeError(f"gave up after {count}")

    with pytest.raises(RuntimeError, match="gave up after 3"):
        await retry(down, retry_on=ConnectionError, backoff=Backoff(1, 2), on_retry=give_up, sleep=sleep)
    assert len(slept) == 2
