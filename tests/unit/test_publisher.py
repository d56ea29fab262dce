"""The publisher's append gate: one task waits inside the producer's send(), the others wait for it together."""

from __future__ import annotations

import asyncio

from ocrbooth.daemon.publisher import _AppendGate


async def test_one_task_waits_in_send_and_the_others_are_released_together() -> None:
    """While one task is inside a send that waits (a full batch), the others do not enter; when it leaves they
    are all released in the same loop iteration and enter one after the other."""
    gate = _AppendGate()
    drained = asyncio.Event()
    order: list[str] = []

    async def full_batch_sender() -> None:
        await gate.enter()
        order.append("holder in")
        await drained.wait()  # the batch drains
        gate.leave()

    async def sender(name: str) -> None:
        await gate.enter()
        order.append(name)
        gate.leave()

    holder = asyncio.ensure_future(full_batch_sender())
    await asyncio.sleep(0)
    others = [asyncio.ensure_future(sender(f"s{i}")) for i in range(50)]
    for _ in range(5):
        await asyncio.sleep(0)
    assert order == ["holder in"]
    drained.set()
    await asyncio.sleep(0)  # the holder leaves
    await asyncio.sleep(0)  # every waiter runs in this one iteration
    assert order == ["holder in"] + [f"s{i}" for i in range(50)]
    await asyncio.gather(holder, *others)


async def test_a_cancelled_waiter_does_not_block_the_others() -> None:
    """A task cancelled while it waits at the gate leaves without entering; the rest still get through."""
    gate = _AppendGate()
    await gate.enter()
    cancelled = asyncio.ensure_future(gate.enter())
    waiting = asyncio.ensure_future(gate.enter())
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.sleep(0)
    gate.leave()
    await asyncio.wait_for(waiting, 1)
    gate.leave()
    assert cancelled.cancelled()
