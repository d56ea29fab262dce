"""The publisher's append gate (one task waits inside the producer's send(), the others wait for it together) and
its encoder."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from ocrbooth.daemon.publisher import _AppendGate, _encode
from ocrbooth.schemas import DeadLetter, DocumentRequest, ErrorInfo, OcrResult, PageResult


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


async def test_try_enter_takes_a_free_gate_at_once_and_refuses_a_held_one() -> None:
    """The fast path: a free gate is entered without awaiting; a held one is refused (the caller awaits `enter`),
    and is free again once left."""
    gate = _AppendGate()
    assert gate.try_enter()
    assert not gate.try_enter()
    waiting = asyncio.ensure_future(gate.enter())
    await asyncio.sleep(0)
    assert not waiting.done()
    gate.leave()
    await asyncio.wait_for(waiting, 1)
    assert not gate.try_enter()  # the waiter holds it now
    gate.leave()
    assert gate.try_enter()
    gate.leave()


def test_encoded_values_are_byte_for_byte_what_model_dump_json_gives() -> None:
    """The publisher's encoder (the serializer's bytes directly) writes exactly `model_dump_json()`'s JSON, for
    results, dead letters with dates and base64 fields, and non-ASCII text."""
    request = DocumentRequest.model_validate(
        {
            "request_id": "r-1",
            "document_id": "d-ü",
            "source": {"uri": "s3://b/k"},
            "metadata": {"tenant": "é", "n": "1"},
        }
    )
    models = [
        OcrResult(
            request_id="r-1",
            document_id="d-ü",
            status="succeeded",
            engine="echo",
            pages=[PageResult(page_number=1, width_px=3, height_px=4, text="ça\n€", finish_reason="stop")],
            confidence=0.5,
            metadata=request.metadata,
        ),
        OcrResult.failure(request, ErrorInfo(code="x", message="bad \u2028 news"), None),
        DeadLetter(
            source_topic="t",
            partition=0,
            offset=7,
            key_base64="a2V5",
            value_base64=None,
            error=ErrorInfo(code="c", message="m"),
            failed_at=datetime(2026, 12, 7, 10, 0, 0, 123456, tzinfo=UTC),
        ),
    ]
    for model in models:
        assert _encode(model) == model.model_dump_json().encode()
