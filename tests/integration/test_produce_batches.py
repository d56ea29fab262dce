"""The publisher's produce batches against a real broker (Tansu): records land in the partition `send()` would
pick, and the outputs of many messages published together arrive complete, in order within each partition."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict

import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry

from ocrbooth.daemon.publisher import Publisher
from ocrbooth.handlers.echo import EchoHandler
from ocrbooth.messages import MessageContext, OutputEvent
from ocrbooth.metrics import Metrics
from ocrbooth.schemas import DocumentRequest
from tests.support.daemon import request_event, settings_for
from tests.support.kafka import consume_all
from tests.support.stack import TopicNames


@pytest.mark.parametrize("topic_partitions", [7])
async def test_batched_records_land_in_the_partition_send_picks(
    monkeypatch: pytest.MonkeyPatch, bootstrap: str, topics: TopicNames, daemon_env: dict[str, str]
) -> None:
    """For 200 keys over 7 partitions, the partition of each record published through the batches equals the
    one aiokafka's `send()` chose for the same key on the same topic."""
    settings = settings_for(monkeypatch, daemon_env)
    handler = EchoHandler(settings)
    publisher = Publisher(settings, Metrics(CollectorRegistry()), storage=None)  # type: ignore[arg-type]
    await publisher.start()
    n = 200
    try:
        outputs: list[list[OutputEvent]] = []
        for i in range(n):
            ctx = MessageContext(topics.ocr_requests, 0, i, None, None)
            outputs.append(await handler.handle(DocumentRequest.model_validate_json(request_event(i)), ctx))
        await asyncio.gather(
            *(
                publisher.publish(events, MessageContext(topics.ocr_requests, 0, i, None, None))
                for i, events in enumerate(outputs)
            )
        )
    finally:
        await publisher.stop()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False, acks="all")
    await producer.start()
    try:
        chosen = {}
        for i in range(n):
            sent = await producer.send_and_wait(topics.ocr_results, value=b"{}", key=f"doc-{i}".encode())
            chosen[f"doc-{i}"] = sent.partition
    finally:
        await producer.stop()
    assert len(set(chosen.values())) == 7
    records = await consume_all(bootstrap, topics.ocr_results, count=2 * n, timeout_s=30)
    batched = {r.key.decode(): r.partition for r in records if r.value != b"{}"}
    assert batched == chosen


async def test_many_messages_published_together_arrive_complete_and_in_order(
    monkeypatch: pytest.MonkeyPatch, bootstrap: str, topics: TopicNames, daemon_env: dict[str, str]
) -> None:
    """500 messages of two outputs each (one key per message), published in one turn: every output arrives once,
    each message's two in order within their partition."""
    settings = settings_for(monkeypatch, daemon_env)
    handler = EchoHandler(settings)
    publisher = Publisher(settings, Metrics(CollectorRegistry()), storage=None)  # type: ignore[arg-type]
    await publisher.start()
    n = 500
    try:
        published = []
        for i in range(n):
            ctx = MessageContext(topics.ocr_requests, 0, i, None, None)
            (event,) = await handler.handle(DocumentRequest.model_validate_json(request_event(i)), ctx)
            second = OutputEvent(event.topic, event.key, event.value.model_copy(update={"engine": "second"}))
            published.append(publisher.publish([event, second], ctx))
        await asyncio.gather(*published)
    finally:
        await publisher.stop()
    records = await consume_all(bootstrap, topics.ocr_results, count=2 * n, timeout_s=30)
    by_key: dict[str, list[str]] = defaultdict(list)
    for record in records:
        by_key[record.key.decode()].append(json.loads(record.value)["engine"])
    assert len(records) == 2 * n
    assert set(by_key) == {f"doc-{i}" for i in range(n)}
    assert all(engines == ["echo", "second"] for engines in by_key.values()), by_key
