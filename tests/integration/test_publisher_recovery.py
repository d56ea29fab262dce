"""The publisher replaces a producer whose aiokafka sender task has died. Seen under broker connection resets
(`tests/chaos/test_broker_faults.py`): uvloop's RuntimeError for a write to a closed transport ends aiokafka's
sender routine, and that producer then fails every later send with "Unexpected error during batch delivery"."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from ocrbooth.daemon.publisher import Publisher
from ocrbooth.handlers.echo import EchoHandler
from ocrbooth.messages import MessageContext
from ocrbooth.metrics import Metrics
from ocrbooth.schemas import DocumentRequest
from tests.support.daemon import request_event, settings_for
from tests.support.kafka import consume_all
from tests.support.stack import TopicNames


async def test_a_producer_whose_sender_died_is_replaced_and_the_output_delivered(
    monkeypatch: pytest.MonkeyPatch, bootstrap: str, topics: TopicNames, daemon_env: dict[str, str]
) -> None:
    """The producer's client fails its next request the way uvloop does on a reset connection: its sender dies,
    the publish fails, and the retry runs on a new producer, so the output is delivered once."""
    settings = settings_for(monkeypatch, daemon_env)
    publisher = Publisher(settings, Metrics(CollectorRegistry()), storage=None)  # type: ignore[arg-type]
    await publisher.start()
    try:
        ctx = MessageContext(topics.ocr_requests, 0, 0, None, None)
        events = await EchoHandler(settings).handle(DocumentRequest.model_validate_json(request_event(0)), ctx)
        dead = publisher._producer
        assert dead is not None
        failed = []

        async def reset_transport(*args: Any, **kwargs: Any) -> Any:
            failed.append(args)
            raise RuntimeError("unable to perform operation on <TCPTransport closed=True>; the handler is closed")

        monkeypatch.setattr(dead.client, "send", reset_transport)
        await asyncio.wait_for(publisher.publish(events, ctx), timeout=60)
        assert failed, "the broken client was never used; the test proved nothing"
        assert dead._sender.sender_task.done()
        assert publisher._producer is not dead
    finally:
        await publisher.stop()
    records = await consume_all(bootstrap, topics.ocr_results, count=1, timeout_s=30)
    assert [r.key for r in records] == [b"doc-0"]
