"""The group consumer's client options: what the fetch loop's throughput depends on."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka import TopicPartition
from prometheus_client import CollectorRegistry

from ocrbooth.config import Settings
from ocrbooth.daemon import consumer as consumer_module
from ocrbooth.daemon.consumer import Consumer
from ocrbooth.daemon.dispatch import Dispatcher, Route
from ocrbooth.daemon.offsets import OffsetTracker
from ocrbooth.daemon.outage import Dependencies
from ocrbooth.daemon.publisher import Publisher
from ocrbooth.handlers.echo import EchoHandler
from ocrbooth.metrics import Metrics
from ocrbooth.schemas import DocumentRequest


class RecordingClient:
    """Stands in for AIOKafkaConsumer: keeps the keyword arguments it was built with."""

    built: list[dict[str, Any]] = []

    def __init__(self, **kwargs: Any) -> None:
        RecordingClient.built.append(kwargs)

    async def start(self) -> None:
        pass

    def subscribe(self, topics: list[str], listener: Any) -> None:
        pass


async def _started_client_options(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setattr(consumer_module, "AIOKafkaConsumer", RecordingClient)
    RecordingClient.built = []
    metrics = Metrics(CollectorRegistry())
    deps = Dependencies(metrics.dependency_up)
    publisher = Publisher(settings, metrics, storage=None)  # type: ignore[arg-type]
    dispatcher = Dispatcher(settings, metrics, publisher, deps.add("s3", None), asyncio.Event())
    routes = {settings.topics.ocr_requests: Route(EchoHandler(settings), DocumentRequest)}
    tracker: OffsetTracker[TopicPartition] = OffsetTracker()
    member = Consumer(settings, metrics, routes, None, dispatcher, deps, tracker, None, print)  # type: ignore[arg-type]
    await member.start()
    (options,) = RecordingClient.built
    return options


async def test_fetch_wait_is_short_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """The group consumer asks the broker to hold a fetch at most 100 ms (aiokafka's 500 ms default let a
    caught-up partition keep a backlogged one waiting that long), and the setting reaches the client."""
    assert (await _started_client_options(Settings(), monkeypatch))["fetch_max_wait_ms"] == 100
    settings = Settings.model_validate({"kafka": {"fetch_max_wait_ms": 20}})
    assert (await _started_client_options(settings, monkeypatch))["fetch_max_wait_ms"] == 20
