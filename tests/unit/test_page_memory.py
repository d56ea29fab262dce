"""The page-memory budget: first come first served, never stuck, exhausted while spent."""

from __future__ import annotations

import asyncio

import pytest

from ocrbooth.models.ocr.page_memory import PageMemory


async def test_requests_wait_in_order_until_bytes_are_released() -> None:
    """A request that does not fit waits; later requests queue behind it even when they would fit."""
    budget = PageMemory(100)
    await budget.acquire(60)
    big = asyncio.ensure_future(budget.acquire(50))
    small = asyncio.ensure_future(budget.acquire(10))
    await asyncio.sleep(0)
    assert not big.done()
    assert not small.done()
    assert budget.exhausted
    budget.release(60)
    await asyncio.wait_for(asyncio.gather(big, small), 1)
    assert budget.used_bytes == 60
    assert not budget.exhausted


async def test_a_page_larger_than_the_budget_runs_alone() -> None:
    """A single page larger than the whole budget is granted when nothing else is held (no deadlock)."""
    budget = PageMemory(100)
    await asyncio.wait_for(budget.acquire(500), 1)
    assert budget.used_bytes == 500
    assert budget.exhausted
    budget.release(500)
    assert budget.used_bytes == 0
    assert not budget.exhausted


async def test_a_cancelled_waiter_lets_the_next_one_in() -> None:
    """Cancelling the request at the head of the queue grants the ones behind it that fit."""
    budget = PageMemory(100)
    await budget.acquire(90)
    head = asyncio.ensure_future(budget.acquire(50))
    behind = asyncio.ensure_future(budget.acquire(10))
    await asyncio.sleep(0)
    head.cancel()
    await asyncio.wait_for(behind, 1)
    assert budget.used_bytes == 100
    with pytest.raises(asyncio.CancelledError):
        await head


def test_capacity_must_be_positive() -> None:
    """A zero budget is refused."""
    with pytest.raises(ValueError, match="capacity"):
        PageMemory(0)
