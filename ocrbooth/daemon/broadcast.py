"""Broadcast topics: read in full by every replica, outside the consumer group."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from ocrbooth.config import Settings
from ocrbooth.daemon.decode import decode, message_context
from ocrbooth.daemon.dispatch import Route
from ocrbooth.daemon.publisher import Publisher
from ocrbooth.errors import FatalError, PoisonError
from ocrbooth.logs import log_context
from ocrbooth.schemas import ErrorInfo

log = logging.getLogger(__name__)


class BroadcastConsumer:
    """Reads broadcast topics in full on every replica (no consumer group, from the beginning): commands
    such as cancel must reach whichever replica runs the job, and one sent before the job starts must be
    remembered. Nothing is committed; a restart reads the topic again, which handlers treat idempotently."""

    def __init__(self, settings: Settings, publisher: Publisher, routes: Mapping[str, Route]) -> None:
        self._s = settings
        self._publisher = publisher
        self._routes = dict(routes)
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            **self._s.kafka.client_options(), group_id=None, enable_auto_commit=False, auto_offset_reset="earliest"
        )
        await self._consumer.start()
        tps: list[TopicPartition] = []
        for topic in self._routes:
            partitions = self._consumer.partitions_for_topic(topic)
            deadline = time.monotonic() + 30
            while not partitions and time.monotonic() < deadline:
                await self._consumer.topics()
                partitions = self._consumer.partitions_for_topic(topic)
                if not partitions:
                    await asyncio.sleep(0.5)
            if not partitions:
                raise FatalError(f"broadcast topic {topic} does not exist")
            tps.extend(TopicPartition(topic, p) for p in sorted(partitions))
        self._consumer.assign(tps)
        for tp in tps:
            self._consumer.seek(tp, 0)

    async def loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while self._consumer is not None:
            try:
                batch = await consumer.getmany(timeout_ms=self._s.poll_timeout_ms * 5)
            except KafkaError as exc:  # the broker is away: aiokafka reconnects; poll again shortly
                log.warning("broadcast fetch failed, retrying", extra={"error": repr(exc)})
                await asyncio.sleep(1.0)
                continue
            for records in batch.values():
                for record in records:
                    await self._one(record)

    async def _one(self, record: Any) -> None:
        route = self._routes[record.topic]
        ctx = message_context(record)
        with log_context(topic=ctx.topic, partition=ctx.partition, offset=ctx.offset):
            try:
                event = decode(record.value, route.model, max_bytes=self._s.max_input_message_bytes)
                await route.handler.on_broadcast(event, ctx)
            except PoisonError as exc:
                await self._publisher.dead_letter(ctx, record.value, ErrorInfo(code=exc.code, message=exc.message))
            except FatalError:
                raise
            except Exception as exc:  # one bad command must not stop the others
                log.exception("broadcast handler raised")
                await self._publisher.dead_letter(
                    ctx,
                    record.value,
                    ErrorInfo(
                        code="handler_error", message=f"{type(exc).__name__}: {exc}"
                    ),  # the publisher cuts it to fit
                )

    async def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()
