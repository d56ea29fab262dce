"""Publisher: encodes output events once, offloads oversize ones to S3, and waits for acks=all."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

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
from ocrbooth.config import Settings
from ocrbooth.daemon.outage import Dependency
from ocrbooth.daemon.produce_batches import ProduceBatches
from ocrbooth.errors import FatalError, PoisonError
from ocrbooth.messages import MessageContext, OutputEvent, clip
from ocrbooth.metrics import Metrics, observe_many
from ocrbooth.retry import Backoff, retry
from ocrbooth.schemas import DeadLetter, ErrorInfo, Header, Offloadable
from ocrbooth.storage import S3Storage

log = logging.getLogger(__name__)

# Errors that no retry can fix: the record itself or our permissions are wrong.
_NOT_RETRIABLE = (MessageSizeTooLargeError, RecordListTooLargeError, InvalidTopicError, UnsupportedVersionError)
# Broker trouble that waiting fixes (the ones above are turned into PoisonError before they get here).
_RETRIED = (KafkaError, TopicAuthorizationFailedError)
_HEADROOM_BYTES = 64 * 1024  # request framing and headers on top of the largest value we send
_MAX_ERROR_CHARS = 2_000  # an error message inside a dead letter or failed result
_MIN_LETTER_MESSAGE_CHARS = 200  # the last-resort dead letter's error message


class _Record(NamedTuple):
    """One encoded record (a named tuple: one is made per output, and a frozen dataclass costs more to build)."""

    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]


class Publisher:
    """Owns the producer. `publish` returns only once the broker has acknowledged every record."""

    def __init__(
        self, settings: Settings, metrics: Metrics, storage: S3Storage, broker: Dependency | None = None
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._storage = storage
        self._broker = broker
        self._producer: AIOKafkaProducer | None = None
        self._topic_children: dict[str, tuple[Any, Any, Any]] = {}
        self._header_cache: dict[type[BaseModel], tuple[tuple[str, bytes], tuple[str, bytes]]] = {}
        self._appending = _AppendGate()
        self._batches: ProduceBatches | None = None
        self._replacing = asyncio.Lock()

    async def start(self) -> None:
        self._producer = await self._started_producer()
        self._batches = ProduceBatches(self._producer)

    async def _started_producer(self) -> AIOKafkaProducer:
        k = self._settings.kafka
        producer = AIOKafkaProducer(
            **k.client_options(),
            acks="all",
            enable_idempotence=k.enable_idempotence,
            linger_ms=k.linger_ms,
            max_batch_size=k.max_batch_bytes,
            compression_type=k.compression_type,
            max_request_size=_max_request_bytes(self._settings),
        )
        try:
            await producer.start()
        except BaseException:
            # A broker unreachable at startup: close the half-started client instead of leaking its tasks.
            await producer.stop()
            raise
        return producer

    async def stop(self) -> None:
        """Flush what is buffered, then close."""
        if self._producer is not None:
            batches, self._batches = self._batches, None
            producer, self._producer = self._producer, None
            try:
                if batches is not None:
                    await batches.stop()
                await producer.flush()
            finally:
                await producer.stop()

    async def publish(self, events: Sequence[OutputEvent], ctx: MessageContext) -> None:
        """Encode, offload oversize values, send, and wait for every acknowledgement."""
        await self.settle(await self.append(events, ctx))

    async def append(self, events: Sequence[OutputEvent], ctx: MessageContext) -> Acks:
        """Encode, offload oversize values and hand the records to the producer; the acknowledgements they wait
        for (`settle` waits for them, or `Acks.when_done` calls back). Raises PoisonError for an output that can
        never be sent (too large, refused)."""
        records = []
        offloaded_uri: str | None = None
        for index, event in enumerate(events):
            if offloaded_uri and getattr(event.value, "result_uri", "") is None:
                # A companion event (a ReviewFlag after its OcrResult) points at the same offloaded result.
                event = OutputEvent(
                    event.topic, event.key, event.value.model_copy(update={"result_uri": offloaded_uri})
                )
            value = _encode(event.value)
            if len(value) > self._settings.max_message_bytes:
                record, uri = await self._offload(event, ctx, index, value)
                offloaded_uri = offloaded_uri or uri
            else:
                record = _Record(event.topic, self._key(event), value, self._headers(event.value, ctx))
            records.append(record)
        self._live_producer()  # FatalError when not started
        started = time.perf_counter()
        batches = self._batches
        assert batches is not None  # set with the producer
        try:
            # The records join this turn's produce batches; the futures of the batches holding them. (Here rather
            # than in a coroutine of its own: one level of coroutines less for every message.)
            futures: list[asyncio.Future[Any]] = []
            last = None
            for rec in records:
                topic = rec.topic
                partitions = batches.cached(topic)
                if partitions is None:
                    partitions = await batches.partitions(topic)
                future = batches.add(topic, partitions, rec.key, rec.value, rec.headers)
                if future is not last:
                    futures.append(future)
                    last = future
        except _RETRIED as exc:
            # No metadata for the topic (deleted, broker away): the retrying path, one record at a time.
            elapsed = await self._send_retrying(records, exc)
            self._record_acked(records, elapsed)
            return Acks(records, (), started)
        return Acks(records, futures, started)

    async def settle(self, acks: Acks) -> None:
        """Wait until the broker has acknowledged every record of `acks`. When a batch holding them failed, the
        records are sent again one by one: broker trouble is retried without limit, a refusal no retry can fix
        raises PoisonError."""
        if acks.settled:
            return
        futures = acks.futures
        await asyncio.wait(futures)
        failure = next((exc for exc in map(_failure, futures) if exc is not None), None)
        records = acks.records
        if failure is None:
            elapsed = time.perf_counter() - acks.started
        else:
            # A batch holding the records failed, perhaps for another message's record: send this message's
            # records again one by one, so that only a record the broker refuses for good fails its message.
            producer = self._live_producer()
            if isinstance(failure, _RETRIED) and not isinstance(failure, _NOT_RETRIABLE):
                elapsed = await self._send_retrying(records, failure)  # counts the failed try
            else:
                for rec in records:
                    self._children(rec.topic)[1].inc()
                elapsed = await self._send(producer, records)
        acks.settled = True
        self._record_acked(records, elapsed)

    def acknowledged(self, batch: Sequence[Acks], now: float) -> list[bool]:
        """For acknowledgements that arrived together (each `Acks.when_done` called back, by `now`, a perf_counter
        reading): per Acks, True (and its records counted as acknowledged) when every record went through; False
        when one failed, and `settle` must retry or refuse. Counted once per topic, observed once per record."""
        results: list[bool] = []
        latencies_of: dict[str, list[float]] = {}  # per topic, the publish latency of each acknowledged record
        topic = ""
        latencies: list[float] = []
        last: asyncio.Future[Any] | None = None  # the messages of one batch share its future: checked once
        for acks in batch:
            futures = acks.futures
            if len(futures) == 1 and futures[0] is last:
                ok = results[-1]
            else:
                ok = True
                for future in futures:
                    if future.cancelled() or future.exception() is not None:
                        ok = False
                        break
                last = futures[0] if len(futures) == 1 else None
            results.append(ok)
            if not ok:
                continue
            acks.settled = True
            elapsed = now - acks.started
            for rec in acks.records:
                if rec.topic != topic:
                    topic = rec.topic
                    latencies = latencies_of.setdefault(topic, [])
                latencies.append(elapsed)
        if latencies_of:
            if self._broker is not None and self._broker.down:
                self._broker.mark_up()
            for topic, latencies in latencies_of.items():
                children = self._children(topic)
                children[0].inc(len(latencies))
                children[2].observe_each(latencies)
        return results

    async def dead_letter(self, ctx: MessageContext, value: bytes | None, error: ErrorInfo) -> None:
        """Publish a DeadLetter for an input message. Never fails for the message's sake: the key, value,
        headers and error message are cut to fit (and the letter says so); if the broker still refuses it, a
        letter with only the source coordinates and the error goes instead."""
        s = self._settings
        key_limit, value_limit = s.dlq_max_key_bytes, s.dlq_max_value_bytes
        kept_value = value[:value_limit] if value is not None else None
        kept_key = ctx.key[:key_limit] if ctx.key is not None else None
        headers: list[Header] = []
        header_bytes = 0
        headers_truncated = False
        for k, v in ctx.headers:
            size = len(k) + (len(v) if v is not None else 0)
            if header_bytes + size > value_limit:
                headers_truncated = True
                break
            header_bytes += size
            headers.append(Header(key=k, value_base64=None if v is None else base64.b64encode(v).decode()))
        letter = DeadLetter(
            source_topic=ctx.topic,
            partition=ctx.partition,
            offset=ctx.offset,
            key_base64=base64.b64encode(kept_key).decode() if kept_key is not None else None,
            key_truncated=ctx.key is not None and len(ctx.key) > key_limit,
            value_base64=base64.b64encode(kept_value).decode() if kept_value is not None else None,
            value_truncated=value is not None and len(value) > value_limit,
            headers=headers,
            headers_truncated=headers_truncated,
            error=_fit_error(error, _MAX_ERROR_CHARS),
            failed_at=datetime.now(UTC),
        )
        try:
            await self._send_acked([_Record(s.topics.dlq, kept_key, _encode(letter), self._headers(letter, ctx))])
        except PoisonError as exc:
            # The broker's own limits are below ours: keep only what identifies the message and why it failed.
            log.error("dead letter refused by the broker; sending a minimal one", extra={"error": str(exc)})
            minimal = letter.model_copy(
                update={
                    "key_base64": None,
                    "key_truncated": ctx.key is not None,
                    "value_base64": None,
                    "value_truncated": value is not None,
                    "headers": [],
                    "headers_truncated": bool(ctx.headers),
                    "error": _fit_error(error, _MIN_LETTER_MESSAGE_CHARS),
                }
            )
            try:
                await self._send_acked([_Record(s.topics.dlq, None, _encode(minimal), self._headers(minimal, ctx))])
            except PoisonError as again:
                # Nothing smaller exists: the DLQ topic itself is unusable (deleted, or a limit of a few hundred
                # bytes). Holding the partition would stop every later message too; log it loudly and count it.
                self._metrics.dead_letters_dropped.inc()
                log.critical(
                    "dead letter could not be published; the message is logged here instead",
                    extra={"source": ctx.source, "code": error.code, "reason": error.message, "error": str(again)},
                )
                return
        self._metrics.dead_letters.labels(ctx.topic, error.code).inc()

    def _headers(self, value: BaseModel, ctx: MessageContext) -> list[tuple[str, bytes]]:
        cls = type(value)
        fixed = self._header_cache.get(cls)
        if fixed is None:
            version = str(getattr(value, "schema_version", constants.SCHEMA_VERSION)).encode()
            fixed = (constants.HEADER_SCHEMA, cls.__name__.encode()), (constants.HEADER_SCHEMA_VERSION, version)
            self._header_cache[cls] = fixed
        return [*fixed, (constants.HEADER_SOURCE, ctx.source.encode())]

    def _key(self, event: OutputEvent) -> bytes | None:
        key = event.key.encode() if event.key else None
        if key is not None and len(key) > self._settings.max_key_bytes:
            raise PoisonError(
                f"output key is {len(key)} bytes, over max_key_bytes {self._settings.max_key_bytes}",
                code="output_too_large",
            )
        return key

    async def _offload(
        self, event: OutputEvent, ctx: MessageContext, index: int, value: bytes
    ) -> tuple[_Record, str | None]:
        """Write an oversize output to S3 and return the slim record that points at it."""
        record_key = self._key(event)  # refused before anything is written
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
        value = _encode(slim)
        self._metrics.offloaded.labels(event.topic).inc()
        if len(value) > self._settings.max_message_bytes:
            raise PoisonError(
                f"{type(slim).__name__} is still {len(value)} bytes after offloading", code="output_too_large"
            )
        return _Record(event.topic, record_key, value, self._headers(slim, ctx)), uri

    async def _send_acked(self, records: Sequence[_Record]) -> None:
        """`_send`, then count the records as acknowledged."""
        self._record_acked(records, await self._send(self._live_producer(), records))

    async def _send(self, producer: AIOKafkaProducer, records: Sequence[_Record]) -> float:
        """Send one record at a time (`producer.send()`) until acknowledged; the seconds it took. Broker trouble
        is retried without limit: losing the broker is not the message's fault, and shutdown's drain deadline
        is what ends the wait."""
        try:
            return await self._send_once(producer, records)
        except _RETRIED as exc:
            return await self._send_retrying(records, exc)

    def _live_producer(self) -> AIOKafkaProducer:
        producer = self._producer
        if producer is None:
            raise FatalError("publisher is not started")
        return producer

    def _record_acked(self, records: Sequence[_Record], elapsed: float) -> None:
        if self._broker is not None and self._broker.down:
            self._broker.mark_up()
        if len(records) == 1:
            acked, _, seconds = self._children(records[0].topic)
            acked.inc()
            seconds.observe(elapsed)
            return
        per_topic = Counter(rec.topic for rec in records)
        for topic, n in per_topic.items():
            acked, _, seconds = self._children(topic)
            acked.inc(n)
            observe_many(seconds, elapsed, n)

    def _rejected(self, records: Sequence[_Record], exc: Exception) -> PoisonError:
        for rec in records:
            self._children(rec.topic)[1].inc()
        return PoisonError(f"the broker refused the output: {exc!r}", code="output_rejected")

    async def _append(self, producer: AIOKafkaProducer, records: Sequence[_Record]) -> list[asyncio.Future[Any]]:
        """Append the records to the producer's batches; their acknowledgement futures."""
        gate = self._appending
        futures = []
        try:
            for rec in records:
                if not gate.try_enter():
                    await gate.enter()
                try:
                    futures.append(await producer.send(rec.topic, value=rec.value, key=rec.key, headers=rec.headers))
                finally:
                    gate.leave()
        except _NOT_RETRIABLE as exc:
            raise self._rejected(records, exc) from exc
        return futures

    async def _send_once(self, producer: AIOKafkaProducer, records: Sequence[_Record]) -> float:
        """Append the records to the producer's batches, then wait for their acknowledgements; the seconds it took."""
        started = time.perf_counter()
        futures = await self._append(producer, records)
        try:
            if len(futures) == 1:
                await futures[0]
            else:
                await asyncio.gather(*futures)
        except _NOT_RETRIABLE as exc:
            raise self._rejected(records, exc) from exc
        return time.perf_counter() - started

    async def _send_retrying(self, records: Sequence[_Record], first: Exception) -> float:
        """The first try failed: retry with backoff until the broker acknowledges (on a new producer if the
        current one's sender has died)."""
        r = self._settings.retry
        backoff = Backoff(r.initial_backoff_ms, max(r.max_backoff_ms, 1_000))

        async def attempt() -> float:
            return await self._send_once(await self._usable_producer(), records)

        async def on_retry(exc: Exception, failures: int, delay: float) -> None:
            # The broker is away or refuses us (ACLs being fixed): wait it out.
            for rec in records:
                self._children(rec.topic)[1].inc()
            if self._broker is not None and failures >= 2:
                self._broker.mark_down(repr(exc))
            log.warning("publish failed, retrying", extra={"attempt": failures, "error": repr(exc), "delay_s": delay})

        delay = backoff.next_s()
        await on_retry(first, backoff.failures, delay)
        await asyncio.sleep(delay)
        return await retry(attempt, retry_on=_RETRIED, backoff=backoff, on_retry=on_retry)

    async def _usable_producer(self) -> AIOKafkaProducer:
        """The producer, replaced first if its sender task has died. aiokafka's sender routine can end on an
        error it does not expect (uvloop's RuntimeError for a write to a connection the broker just reset);
        that producer then fails every later send with the error it stored ("Unexpected error during batch
        delivery") and never recovers, so waiting the outage out needs a new one, and new produce batches on
        it (the old ones' submissions fail, and their messages resend here). The old producer stays in place
        until the new one has started (a broker still away makes this attempt fail and be retried)."""
        producer = self._live_producer()
        if not _sender_died(producer):
            return producer
        async with self._replacing:  # many messages notice at once; one replaces it
            if self._live_producer() is producer:
                log.error("the kafka producer's sender has stopped; starting a new producer")
                new = await self._started_producer()
                self._producer, self._batches = new, ProduceBatches(new)
                try:
                    await asyncio.wait_for(producer.stop(), timeout=10)
                except Exception as exc:  # its connections may be gone with it; the new one is what matters
                    log.warning("stopping the dead kafka producer failed", extra={"error": repr(exc)})
        return self._live_producer()

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


class Acks:
    """The acknowledgements one `Publisher.append` waits for."""

    __slots__ = ("futures", "records", "settled", "started")

    def __init__(self, records: Sequence[_Record], futures: Sequence[asyncio.Future[Any]], started: float) -> None:
        self.records = records
        self.futures = futures
        self.started = started
        self.settled = not futures
        """True once counted as acknowledged (or refused); `settle` then returns at once."""

    def when_done(self, callback: Callable[[object], None]) -> None:
        """Call `callback` (from the event loop, with an argument to ignore) once every future is done, whether
        or not it succeeded. Only for unsettled Acks: settled ones have nothing to wait for."""
        futures = self.futures
        if len(futures) == 1:
            futures[0].add_done_callback(callback)
            return
        left = [len(futures)]

        def one_done(_: object) -> None:
            left[0] -= 1
            if not left[0]:
                callback(None)

        for future in futures:
            future.add_done_callback(one_done)


class _AppendGate:
    """Lets one task at a time wait inside `producer.send()`, and releases every waiter at once.

    aiokafka keeps one open batch per partition; when it is full, `send()` waits until the sender has taken
    it. With one task per message, a fetch whose answers all go to one partition fills that batch and leaves
    hundreds of tasks each in its own `asyncio.wait()` for the same drain, all retrying together (the runtime
    benchmark counted ~15,000 such waits per 20,000 messages). Behind an asyncio.Lock they would instead be
    woken one per loop iteration, and the producer, lingering meanwhile, sends hundreds of tiny requests
    (1,809 per 20,000 messages, against ~100). Here the task that found the batch full waits for the drain
    alone; the others wait for it to return and are then all released in the same iteration."""

    __slots__ = ("_busy", "_waiters")

    def __init__(self) -> None:
        self._busy = False
        self._waiters: list[asyncio.Future[None]] = []

    def try_enter(self) -> bool:
        """Enter at once when no task waits inside send() (the usual case: no coroutine, no await); False when
        one does, and `enter` must be awaited."""
        if self._busy:
            return False
        self._busy = True
        return True

    async def enter(self) -> None:
        """Wait while another task waits inside send(); then mark it as ours (only a send that waits is seen)."""
        while self._busy:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter
        self._busy = True

    def leave(self) -> None:
        self._busy = False
        if self._waiters:
            # All at once, and handed over: a later leave() does not walk them again (asyncio.Event would).
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)


def _sender_died(producer: AIOKafkaProducer) -> bool:
    """Whether aiokafka's sender task has ended (it runs for the producer's whole life). aiokafka offers no
    public health check, so this reads `producer._sender.sender_task`; if that attribute moves in a later
    aiokafka, the answer is False and the old behaviour (retry on the same producer) stays."""
    sender = getattr(producer, "_sender", None)
    task = getattr(sender, "sender_task", None)
    return isinstance(task, asyncio.Future) and task.done()


def _failure(future: asyncio.Future[Any]) -> BaseException | None:
    if future.cancelled():
        return asyncio.CancelledError()
    return future.exception()


def _encode(value: BaseModel) -> bytes:
    """The model's JSON as bytes: what `model_dump_json().encode()` gives, without the keyword handling of
    `model_dump_json` and the copy from str to bytes (this runs for every output)."""
    return value.__pydantic_serializer__.to_json(value)


def _fit_error(error: ErrorInfo, limit: int) -> ErrorInfo:
    return error if len(error.message) <= limit else ErrorInfo(code=error.code, message=clip(error.message, limit))


def _max_request_bytes(s: Settings) -> int:
    """The largest record we may send: an output (key + value) or a dead letter (its record key, and a value
    holding key, value and headers in base64 plus the error)."""
    output = s.max_key_bytes + s.max_message_bytes
    letter = s.dlq_max_key_bytes + (s.dlq_max_key_bytes + 2 * s.dlq_max_value_bytes) * 4 // 3 + 2 * _MAX_ERROR_CHARS
    return max(output, letter) + _HEADROOM_BYTES
