"""Async Kafka helpers for tests: produce, read a topic back, offsets, and waiting with a deadline.

Written for the embedded Tansu broker: producers run without idempotence (InitProducerId is refused) and
end offsets come from the fetch response's high watermark, never from ListOffsets (wrong with Tansu's s3
storage engine).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar, overload

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

T = TypeVar("T")

Item = tuple[bytes | None, bytes | None]
Headers = Sequence[tuple[str, bytes]]


async def produce(
    bootstrap: str,
    topic: str,
    items: Iterable[Item],
    partition: int | None = None,
    *,
    headers: Headers | None = None,
) -> dict[int, int]:
    """Produce (key, value) pairs; return each partition's end offset (last produced offset + 1)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False, acks="all")
    await producer.start()
    ends: dict[int, int] = {}
    try:
        futures = [
            await producer.send(topic, value=value, key=key, partition=partition, headers=list(headers or ()))
            for key, value in items
        ]
        for meta in await asyncio.gather(*futures):
            ends[meta.partition] = max(ends.get(meta.partition, 0), meta.offset + 1)
    finally:
        await producer.stop()
    return ends


async def partitions_of(consumer: AIOKafkaConsumer, topic: str, timeout_s: float = 10.0) -> list[TopicPartition]:
    """The topic's partitions, waiting (with a deadline) for the topic to appear in metadata."""
    deadline = time.monotonic() + timeout_s
    while True:
        await consumer.topics()  # forces a fresh metadata fetch
        parts = consumer.partitions_for_topic(topic)
        if parts:
            return [TopicPartition(topic, p) for p in sorted(parts)]
        if time.monotonic() > deadline:
            raise AssertionError(f"topic {topic!r} has no partitions after {timeout_s}s")
        await asyncio.sleep(0.1)


def _describe(records: Sequence[ConsumerRecord]) -> str:
    shown = [f"p{r.partition}@{r.offset} key={r.key!r} value={(r.value or b'')[:80]!r}" for r in records[:20]]
    more = f"\n  ... and {len(records) - 20} more" if len(records) > 20 else ""
    return "\n  ".join(shown) + more if shown else "(nothing)"


async def consume_all(
    bootstrap: str,
    topic: str,
    *,
    count: int | None = None,
    until: Callable[[list[ConsumerRecord]], bool] | None = None,
    timeout_s: float = 15.0,
) -> list[ConsumerRecord]:
    """Read `topic` from offset 0 on every partition, without a consumer group.

    Stops once `count` records were seen, or `until(records)` is true, or (with neither given) once every
    partition is read up to its high watermark. On timeout raises an AssertionError listing what was seen.
    Records are in arrival order (ordered within each partition).
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    seen: list[ConsumerRecord] = []
    try:
        tps = await partitions_of(consumer, topic, timeout_s)
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, 0)  # not seek_to_beginning: ListOffsets is unreliable on Tansu/s3
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            batch = await consumer.getmany(timeout_ms=max(1, int(min(remaining, 0.2) * 1000)))
            for tp_records in batch.values():
                seen.extend(tp_records)
            if count is not None and len(seen) >= count:
                return seen
            if until is not None and until(seen):
                return seen
            if count is None and until is None and await _caught_up(consumer, tps):
                return seen
            if time.monotonic() > deadline:
                wanted = f"{count} records" if count is not None else "the condition" if until else "the end"
                raise AssertionError(
                    f"consume_all({topic!r}): waited {timeout_s}s for {wanted}, saw {len(seen)}:\n  " + _describe(seen)
                )
    finally:
        await consumer.stop()


async def _caught_up(consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> bool:
    for tp in tps:
        highwater = consumer.highwater(tp)
        if highwater is None or await consumer.position(tp) < highwater:
            return False
    return True


async def high_watermarks(bootstrap: str, topic: str, *, timeout_s: float = 10.0) -> dict[int, int]:
    """Each partition's high watermark (next offset to be written), from fetch responses."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        tps = await partitions_of(consumer, topic, timeout_s)
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, 0)
        deadline = time.monotonic() + timeout_s
        while True:
            await consumer.getmany(timeout_ms=100, max_records=1)
            marks = {tp.partition: consumer.highwater(tp) for tp in tps}
            if all(m is not None for m in marks.values()):
                return {p: int(m) for p, m in marks.items() if m is not None}
            if time.monotonic() > deadline:
                raise AssertionError(f"high_watermarks({topic!r}): no fetch response in {timeout_s}s: {marks}")
    finally:
        await consumer.stop()


async def committed_offsets(bootstrap: str, group_id: str, topic: str) -> dict[int, int | None]:
    """The group's committed offset for every partition of `topic` (None where nothing is committed)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
        partitions = sorted(p["partition"] for p in described[0]["partitions"])
        tps = [TopicPartition(topic, p) for p in partitions]
        offsets = await admin.list_consumer_group_offsets(group_id, partitions=tps)
    finally:
        await admin.close()
    result: dict[int, int | None] = {}
    for tp in tps:
        meta = offsets.get(tp)
        result[tp.partition] = meta.offset if meta is not None and meta.offset >= 0 else None
    return result


@overload
async def wait_until(
    predicate: Callable[[], Awaitable[T]], timeout_s: float, interval_s: float = ..., message: str = ...
) -> T: ...
@overload
async def wait_until(
    predicate: Callable[[], T], timeout_s: float, interval_s: float = ..., message: str = ...
) -> T: ...
async def wait_until(
    predicate: Callable[[], Any],
    timeout_s: float,
    interval_s: float = 0.1,
    message: str = "condition not met",
) -> Any:
    """Poll `predicate` (sync or async) until it returns something truthy; return that value.

    On timeout raises an AssertionError with `message` and the last value (or exception) seen.
    """
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        try:
            outcome = predicate()
            value = await outcome if inspect.isawaitable(outcome) else outcome
            last = value
            if value:
                return value
        except AssertionError as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} (after {timeout_s}s; last: {last!r})")
        await asyncio.sleep(interval_s)
