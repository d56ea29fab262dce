"""The render pool with real worker processes: deadlines, memory caps, deaths and failed starts."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator

import pytest
import uvloop

from ocrbooth.errors import ConfigError, PoisonError, RetryableError
from ocrbooth.models.ocr import render_pool
from ocrbooth.models.ocr.render_pool import RenderPool
from tests.support.kafka import wait_until

CAP_BYTES = 1024**3  # a bare worker (no preload) starts at about 30 MB of address space
DEADLINE_S = 1.0
MARGIN_S = 5.0  # process start and teardown on a loaded 2-core CI machine


@pytest.fixture
async def pool() -> AsyncIterator[tuple[RenderPool, list[str]]]:
    """Two bare workers with a 1 s deadline; failures are recorded by reason."""
    failures: list[str] = []
    running = RenderPool("test", 2, task_timeout_s=DEADLINE_S, max_worker_bytes=CAP_BYTES, on_failure=failures.append)
    await running.start()
    try:
        yield running, failures
    finally:
        await running.close()


async def test_tasks_run_in_worker_processes(pool: tuple[RenderPool, list[str]]) -> None:
    """Tasks run in the pool's own processes, concurrently, and their results come back."""
    running, failures = pool
    pids = await asyncio.gather(*(running.run(os.getpid) for _ in range(6)))
    assert set(pids) <= set(running.pids)
    assert os.getpid() not in pids
    assert failures == []


async def test_a_task_past_the_deadline_fails_and_its_worker_is_replaced(pool: tuple[RenderPool, list[str]]) -> None:
    """A task over the deadline fails with render_timeout in about the deadline; its worker is killed and a
    fresh one takes its place."""
    running, failures = pool
    before = set(running.pids)
    started = time.monotonic()
    with pytest.raises(PoisonError) as caught:
        await running.run(time.sleep, 60)
    assert caught.value.code == "render_timeout"
    assert time.monotonic() - started < DEADLINE_S + MARGIN_S
    await wait_until(lambda: running.workers == 2 and set(running.pids) != before, 30, message="no replacement")
    assert len(set(running.pids) & before) == 1
    assert failures == ["timeout"]
    assert await running.run(int, "7") == 7


async def test_an_allocation_past_the_cap_fails_as_out_of_memory(pool: tuple[RenderPool, list[str]]) -> None:
    """Allocating more than the worker's address-space cap fails the task with render_out_of_memory (not a
    kill by the kernel), and the worker is retired for a fresh one."""
    running, failures = pool
    with pytest.raises(PoisonError) as caught:
        await running.run(bytearray, 2 * CAP_BYTES)
    assert caught.value.code == "render_out_of_memory"
    assert failures == ["out_of_memory"]
    assert len(await running.run(bytearray, 10_000_000)) == 10_000_000  # well under the cap still works
    await wait_until(lambda: running.workers == 2, 30, message="retired worker not replaced")


async def test_a_task_that_kills_its_worker_is_retried_once_then_fails(pool: tuple[RenderPool, list[str]]) -> None:
    """A worker that dies mid-task (here: abort) gets its task retried on a fresh worker; dying again fails the
    task with render_crashed, and the pool goes on serving."""
    running, failures = pool
    with pytest.raises(PoisonError) as caught:
        await running.run(os.abort)
    assert caught.value.code == "render_crashed"
    assert failures == ["crashed", "crashed"]
    assert await running.run(int, "3") == 3


async def test_a_worker_killed_while_idle_is_replaced(pool: tuple[RenderPool, list[str]]) -> None:
    """SIGKILL of an idle worker (what the OOM killer does) is noticed at once and the worker replaced; tasks
    keep running."""
    running, failures = pool
    victim = running.pids[0]
    os.kill(victim, signal.SIGKILL)
    await wait_until(lambda: victim not in running.pids and running.workers == 2, 30, message="not replaced")
    assert failures == ["crashed"]
    results = await asyncio.gather(*(running.run(os.getpid) for _ in range(10)))
    assert victim not in results


async def test_a_cap_below_the_baseline_is_a_startup_error() -> None:
    """Workers that cannot start under their memory cap stop startup with a ConfigError that says why."""
    pool = RenderPool("tiny", 1, task_timeout_s=1, max_worker_bytes=1024**2)
    with pytest.raises(ConfigError, match="memory cap"):
        await pool.start()


async def test_workers_that_keep_failing_to_start_make_the_pool_not_ready(
    pool: tuple[RenderPool, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """When replacements keep failing to start the pool reports not ready and tasks fail as retryable (the
    replica cannot render; the input is not at fault); when starts work again it recovers."""
    running, failures = pool
    monkeypatch.setattr(render_pool, "_MAX_BACKOFF_S", 0.2)
    running.max_worker_bytes = 1024**2  # every new worker now fails its start
    for pid in running.pids:
        os.kill(pid, signal.SIGKILL)
    await wait_until(lambda: not running.ready, 30, message="pool stayed ready")
    assert failures.count("start_failed") >= render_pool.MAX_START_FAILURES
    with pytest.raises(RetryableError, match="memory cap"):
        await running.run(os.getpid)
    running.max_worker_bytes = CAP_BYTES
    await wait_until(lambda: running.ready and running.workers == 2, 30, message="pool did not recover")
    assert await running.run(int, "1") == 1


def test_large_arguments_and_results_cross_on_uvloop() -> None:
    """On uvloop (the daemon's default loop) a socket the loop has watched stays non-blocking (libuv sets it so);
    multi-megabyte arguments and results must still cross whole, call after call."""
    size = 32 * 1024 * 1024

    async def scenario() -> None:
        running = RenderPool("uvloop", 1, task_timeout_s=60, max_worker_bytes=CAP_BYTES)
        await running.start()
        try:
            for _ in range(3):
                assert len(await running.run(bytes, size)) == size
                assert await running.run(len, b"x" * size) == size
        finally:
            await running.close()

    uvloop.run(scenario())
