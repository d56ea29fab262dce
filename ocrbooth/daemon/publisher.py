"""Publisher: encodes output events once, offloads oversize ones to S3, and waits for acks=all."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    TopicAuthorizationFailedError,
    UnsupportedVersionError,
)
from pydantic import BaseModel

from ocrbooth import constants
from ocrbooth.daemon.config import Settings
from ocrbooth.daemon.metrics import Metrics, observe_many
from ocrbooth.daemon.retry import backoff_s
from ocrbooth.daemon.storage import S3Storage
from ocrbooth.errors import FatalError, PoisonError
from ocrbooth.handlers.base import MessageContext, OutputEvent
from ocrbooth.schemas import DeadLetter, ErrorInfo, Header, Offloadable

log = logging.getLogger(__name__)

# Errors that no retry can fix: the record itself or our permissions are wrong.
_NOT_RETRIABLE = (MessageSizeTooLargeError, RecordListTooLargeError, InvalidTopicError, UnsupportedVersionError)
_HEADROOM_BYTES = 64 * 1024  # request framing and headers on top of the largest value we send


@dataclass(frozen=True, slots=True)
class _Record:
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]


class Publisher:
    """Owns the producer. `publish` returns only once the broker has acknowledged every record."""

    def __init__(self, settings: Settings, metrics: Metrics, storage: S3Storage) -> None:
        self._settings = settings
        self._metrics = metrics
        self._storage = storage
        self._producer: AIOKafkaProducer | None = None
        self._topic_children: dict[str, tuple[Any, Any, Any]] = {}
        self._header_cache: dict[type[BaseModel], tuple[tuple[str, bytes], tuple[str, bytes]]] = {}

    async def start(self) -> None:
        k = self._settings.kafka
        self._producer = AIOKafkaProducer(
            **k.client_options(),
            acks="all",
            enable_idempotence=k.enable_idempotence,
            linger_ms=k.linger_ms,
            max_batch_size=k.max_batch_bytes,
            compression_type=k.compression_type,
            max_request_size=max(self._settings.max_message_bytes, self._settings.dlq_max_value_bytes * 2)
            + _HEADROOM_BYTES,
        )
        await self._producer.start()

    async def stop(self) -> None:
        """Flush what is buffered, then close."""
        if self._producer is not None:
            producer, self._producer = self._producer, None
            try:
                await producer.flush()
            finally:
                await producer.stop()

    async def publish(self, events: Sequence[OutputEvent], ctx: MessageContext) -> None:
        """Encode, offload oversize values, send, and wait for every acknowledgement."""
        records = []
        offloaded_uri: str | None = None
        for index, event in enumerate(events):
            if offloaded_uri and getattr(event.value, "result_uri", "") is None:
                # A companion event (a ReviewFlag after its OcrResult) points at the same offloaded result.
                event = OutputEvent(
                    event.topic, event.key, event.value.model_copy(update={"result_uri": offloaded_uri})
                )
            record, uri = await self._encode(event, ctx, index)
            offloaded_uri = offloaded_uri or uri
            records.append(record)
        await self._send(records)

    async def publish_batch(self, batch: Sequence[tuple[Sequence[OutputEvent], MessageContext]]) -> None:
        """Outputs of many inputs, sent together and acknowledged with one wait (batch-mode handlers)."""
        records = []
        for events, ctx in batch:
            for index, event in enumerate(events):
                record, _ = await self._encode(event, ctx, index)
                records.append(record)
        if records:
            await self._send(records)

    async def dead_letter(self, ctx: MessageContext, value: bytes | None, error: ErrorInfo) -> None:
        """Publish a DeadLetter for an input message, keeping at most dlq_max_value_bytes of its value."""
        limit = self._settings.dlq_max_value_bytes
        kept = value[:limit] if value is not None else None
        letter = DeadLetter(
            source_topic=ctx.topic,
            partition=ctx.partition,
            offset=ctx.offset,
            key_base64=base64.b64encode(ctx.key).decode() if ctx.key is not None else None,
            value_base64=base64.b64encode(kept).decode() if kept is not None else None,
            value_truncated=value is not None and len(value) > limit,
            headers=[Header(key=k, value_base64=base64.b64encode(v).decode()) for k, v in ctx.headers],
            error=error,
            failed_at=datetime.now(UTC),
        )
        record = _Record(
            topic=self._settings.topics.dlq,
            key=ctx.key,
            value=letter.model_dump_json().encode(),
            headers=self._headers(letter, ctx),
        )
        await self._send([record])
        self._metrics.dead_letters.labels(ctx.topic, error.code).inc()

    def _headers(self, value: BaseModel, ctx: MessageContext) -> list[tuple[str, bytes]]:
        cls = type(value)
        fixed = self._header_cache.get(cls)
        if fixed is None:
            version = str(getattr(value, "schema_version", constants.SCHEMA_VERSION)).encode()
            fixed = (constants.HEADER_SCHEMA, cls.__name__.encode()), (constants.HEADER_SCHEMA_VERSION, version)
            self._header_cache[cls] = fixed
        return [*fixed, (constants.HEADER_SOURCE, ctx.source.encode())]

    async def _encode(self, event: OutputEvent, ctx: MessageContext, index: int) -> tuple[_Record, str | None]:
        """The record for `event`, and the URI of the S3 object when its value had to be offloaded."""
        value = event.value.model_dump_json().encode()
        if len(value) > self._settings.max_message_bytes:
            return await self._offload(event, ctx, index, value)
        key_bytes = event.key.encode() if event.key else None
        return _Record(event.topic, key_bytes, value, self._headers(event.value, ctx)), None

    async def _offload(
        self, event: OutputEvent, ctx: MessageContext, index: int, value: bytes
    ) -> tuple[_Record, str | None]:
        """Write an oversize output to S3 and return the slim record that points at it."""
        if not isinstance(event.value, Offloadable):
            raise PoisonError(
                f"{type(event.value).__name__} output is {len(value)} bytes, over max_message_bytes "
                f"{self._settings.max_message_bytes}, and cannot be offloaded",
                code="output_too_large",
            )
        # The key depends only on where the input came from, so a redelivered message overwrites
        # the same object instead of leaving orphans.
        digest = hashlib.sha256(f"{ctx.source}/{index}".encode()).hexdigest()[:24]
        safe_key = (event.key or "_").replace("/", "_")[:200]
        key = f"{constants.S3_PREFIX_OFFLOAD}{event.topic}/{safe_key}/{digest}.json"
        uri = await self._storage.put(key, value, content_type="application/json")
        slim = event.value.offloaded(uri)
        value = slim.model_dump_json().encode()
        self._metrics.offloaded.labels(event.topic).inc()
        if len(value) > self._settings.max_message_bytes:
            raise PoisonError(
                f"{type(slim).__name__} is still {len(value)} bytes after offloading", code="output_too_large"
            )
        return _Record(event.topic, event.key.encode() if event.key else None, value, self._headers(slim, ctx)), uri

    async def _send(self, records: Sequence[_Record]) -> None:
        """Send until acknowledged. Broker trouble is retried without limit: losing the broker is not the
        message's fault, and shutdown's drain deadline is what ends the wait."""
        producer = self._producer
        if producer is None:
            raise FatalError("publisher is not started")
        attempt = 0
        r = self._settings.retry
        while True:
            attempt += 1
            started = time.perf_counter()
            try:
                futures = [
                    await producer.send(rec.topic, value=rec.value, key=rec.key, headers=rec.headers) for rec in records
                ]
                await asyncio.gather(*futures)
            except _NOT_RETRIABLE as exc:
                for rec in records:
                    self._children(rec.topic)[1].inc()
                raise PoisonError(f"the broker refused the output: {exc!r}", code="output_rejected") from exc
            except TopicAuthorizationFailedError as exc:
                raise FatalError(f"not authorised to write: {exc!r}") from exc
            except KafkaError as exc:
                for rec in records:
                    self._children(rec.topic)[1].inc()
                delay = backoff_s(attempt, initial_ms=r.initial_backoff_ms, max_ms=r.max_backoff_ms)
                log.warning(
                    "publish failed, retrying", extra={"attempt": attempt, "error": repr(exc), "delay_s": delay}
                )
                await asyncio.sleep(delay)
                continue
            elapsed = time.perf_counter() - started
            per_topic = Counter(rec.topic for rec in records)
            for topic, n in per_topic.items():
                acked, _, seconds = self._children(topic)
                acked.inc(n)
                observe_many(seconds, elapsed, n)
            return

    def _children(self, topic: str) -> tuple[Any, Any, Any]:
        """(acked, error, publish latency) children for a topic, looked up once: `.labels()` costs more than
        the update itself, and this runs per output message."""
        found = self._topic_children.get(topic)
        if found is None:
            m = self._metrics
            produced = m.produced
            found = (produced.labels(topic, "acked"), produced.labels(topic, "error"), m.publish_seconds.labels(topic))
            self._topic_children[topic] = found
        return found
