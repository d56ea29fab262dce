"""The embedded dev stack: S3, Kafka round trips, broker restarts, and isolation between stacks."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from botocore.exceptions import ClientError

from ocrbooth.dev.embedded import EmbeddedStack
from tests.support.kafka import committed_offsets, consume_all, high_watermarks, produce, wait_until
from tests.support.stack import TopicNames


def _items(n: int, tag: str = "") -> list[tuple[bytes, bytes]]:
    return [(f"key-{i}".encode(), f"value-{tag}{i}".encode()) for i in range(n)]


def test_s3_put_get(stack: EmbeddedStack, s3_prefix: str) -> None:
    """The stack's S3 endpoint stores and returns objects in the configured bucket."""
    s3 = stack.s3_client()
    try:
        key = f"{s3_prefix}hello.txt"
        s3.put_object(Bucket=stack.bucket, Key=key, Body=b"hello, seaweed")
        assert s3.get_object(Bucket=stack.bucket, Key=key)["Body"].read() == b"hello, seaweed"
        listed = s3.list_objects_v2(Bucket=stack.bucket, Prefix=s3_prefix)
        assert [o["Key"] for o in listed["Contents"]] == [key]
    finally:
        s3.close()


async def test_group_consume_and_commit(stack: EmbeddedStack, topics: TopicNames, group_id: str) -> None:
    """Produced records reach a group consumer in per-partition order and its commit is stored."""
    items = _items(20)
    ends = await produce(stack.bootstrap_servers, topics.ocr_requests, items)
    consumer = AIOKafkaConsumer(
        topics.ocr_requests,
        bootstrap_servers=stack.bootstrap_servers,
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    seen: list[ConsumerRecord] = []

    async def got_all() -> bool:
        for records in (await consumer.getmany(timeout_ms=200)).values():
            seen.extend(records)
        return len(seen) >= len(items)

    await consumer.start()
    try:
        await wait_until(got_all, timeout_s=30, message="group consumer did not get every record")
        await consumer.commit()
    finally:
        await consumer.stop()

    assert sorted((r.key or b"", r.value or b"") for r in seen) == sorted(items)
    for partition in {r.partition for r in seen}:
        offsets = [r.offset for r in seen if r.partition == partition]
        assert offsets == list(range(len(offsets)))
    committed = await committed_offsets(stack.bootstrap_servers, group_id, topics.ocr_requests)
    assert committed == {p: ends.get(p, 0) for p in range(4)}


async def test_broker_restart_keeps_records_and_offsets(
    stack: EmbeddedStack, topics: TopicNames, group_id: str
) -> None:
    """Stopping and starting the broker keeps topics, records and committed offsets (log in S3)."""
    bootstrap = stack.bootstrap_servers
    topic = topics.ocr_results
    ends = await produce(bootstrap, topic, _items(12, "before-"))
    commit = {TopicPartition(topic, p): end - 1 for p, end in ends.items()}
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group_id, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(list(commit))
        await consumer.commit(commit)
    finally:
        await consumer.stop()
    expected_commits = {p: ends[p] - 1 if p in ends else None for p in range(4)}
    assert await committed_offsets(bootstrap, group_id, topic) == expected_commits

    await asyncio.to_thread(stack.stop_broker)
    assert not stack.broker_running
    await asyncio.to_thread(stack.start_broker)

    assert stack.bootstrap_servers == bootstrap
    records = await consume_all(bootstrap, topic)
    assert sorted(r.value or b"" for r in records) == sorted(v for _, v in _items(12, "before-"))
    assert await high_watermarks(bootstrap, topic) == {p: ends.get(p, 0) for p in range(4)}
    assert await committed_offsets(bootstrap, group_id, topic) == expected_commits
    # The log continues where it stopped rather than starting again at 0.
    after = await produce(bootstrap, topic, [(b"k", b"after")], partition=0)
    assert after == {0: ends.get(0, 0) + 1}


@pytest.mark.parametrize("topic_partitions", [4])
async def test_high_watermarks_count_records(stack: EmbeddedStack, topics: TopicNames) -> None:
    """high_watermarks() equals the records produced per partition (ListOffsets is wrong on Tansu/s3)."""
    bootstrap = stack.bootstrap_servers
    ends = await produce(bootstrap, topics.ocr_review, _items(5), partition=0)
    ends |= await produce(bootstrap, topics.ocr_review, _items(15), partition=1)
    assert ends == {0: 5, 1: 15}
    assert await high_watermarks(bootstrap, topics.ocr_review) == {0: 5, 1: 15, 2: 0, 3: 0}
    assert len(await consume_all(bootstrap, topics.ocr_review)) == 20


async def test_two_stacks_do_not_collide(stack: EmbeddedStack, tmp_path: Path) -> None:
    """A second stack (memory storage) in the same process gets its own ports, buckets and broker."""
    other = EmbeddedStack(tmp_path / "other", storage="memory", topics={"solo": 1})
    await asyncio.to_thread(other.start)
    try:
        assert not set(other.ports.values()) & set(stack.ports.values())
        assert await produce(other.bootstrap_servers, "solo", [(b"k", b"only here")]) == {0: 1}
        [record] = await consume_all(other.bootstrap_servers, "solo", count=1)
        assert record.value == b"only here"

        other_s3, main_s3 = other.s3_client(), stack.s3_client()
        try:
            other_s3.put_object(Bucket=other.bucket, Key="isolation-check", Body=b"x")
            with pytest.raises(ClientError):
                main_s3.head_object(Bucket=stack.bucket, Key="isolation-check")
        finally:
            other_s3.close()
            main_s3.close()
    finally:
        await asyncio.to_thread(other.stop)
    assert not other.running
    other.stop()  # idempotent
    assert stack.running
