"""Produce batches: the records appended during one turn of the event loop, one aiokafka batch per partition.

`producer.send()` costs ~15 µs a record (a metadata coroutine, serialize, partition, a TopicPartition, the
`add_message` coroutine and a future per record). Here a record costs a partition choice and an append to a
`BatchBuilder` (aiokafka's public batch API, `create_batch()`), and the records appended during one turn share
one submission (`send_batch()`) and one acknowledgement future per partition. A hand-written piece on purpose:
aiokafka has no way to append many records and get one future for them.

Partitions are what `send()` would pick: aiokafka's `DefaultPartitioner` (its formula, with a compiled murmur2
for keyed records) over the topic's partitions as `producer.partitions_for()` lists them (the same set
`send()` reads, in the same order). The list is cached per topic, compared with the metadata at every
submission, and dropped when a submission fails.

Batches are closed before submission (nothing else is appended to them, and they do not linger: the turn
was the linger), and submitted in the order they were opened, so records keep their order within a partition.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, Protocol

from aiokafka.errors import KafkaError, ProducerClosed
from aiokafka.partitioner import DefaultPartitioner
from murmurhash2 import murmurhash2

log = logging.getLogger(__name__)

MURMUR2_SEED = 0x9747B28C
"""Kafka's murmur2 seed (org.apache.kafka.common.utils.Utils.murmur2): with it, the `murmurhash2` package's compiled
MurmurHash2 equals `aiokafka.partitioner.murmur2` (a test compares them on every length and byte), 0.2 us a key
against ~3 for aiokafka's pure-Python loop."""


class BatchProducer(Protocol):
    """The part of `AIOKafkaProducer` used here."""

    def create_batch(self) -> Any: ...

    async def send_batch(self, batch: Any, topic: str, *, partition: int) -> asyncio.Future[Any]: ...

    async def partitions_for(self, topic: str) -> set[int]: ...


class _Batch:
    """An open batch: its builder, and the future its records' messages wait on."""

    __slots__ = ("builder", "future", "partition", "topic")

    def __init__(self, topic: str, partition: int, builder: Any, future: asyncio.Future[None]) -> None:
        self.topic = topic
        self.partition = partition
        self.builder = builder
        self.future = future


class ProduceBatches:
    """Coalesces appended records into one batch per (topic, partition) and submits them at the end of the turn.

    `add` is synchronous (no coroutine per record); `partitions` must have been awaited for the topic first
    (`cached` says whether it has). Each batch's future resolves (None) when the broker acknowledges it, or
    fails with the batch's error: the caller resends that message's records one by one, so one bad record
    never fails its batch-mates."""

    def __init__(self, producer: BatchProducer) -> None:
        self._producer = producer
        self._partitioner = DefaultPartitioner()
        self._partitions: dict[str, list[int]] = {}
        self._open: dict[tuple[str, int], _Batch] = {}
        self._full: deque[_Batch] = deque()  # closed for being full, submitted before the open ones
        self._submitter: asyncio.Task[None] | None = None
        self._stopped = False
        self._last_key: bytes | None = None
        self._last_choice: tuple[list[int], int] | None = None

    def cached(self, topic: str) -> list[int] | None:
        """The topic's partitions when known (then `add` may be called at once), else None."""
        return self._partitions.get(topic)

    async def partitions(self, topic: str) -> list[int]:
        """The topic's partitions, as `send()` lists them; from the producer's metadata (waits for it)."""
        found = list(await self._producer.partitions_for(topic))
        self._partitions[topic] = found
        return found

    def forget(self, topic: str) -> None:
        """Read the topic's partitions from the metadata again before its next record (after a failure)."""
        self._partitions.pop(topic, None)

    def add(
        self, topic: str, partitions: list[int], key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]
    ) -> asyncio.Future[None]:
        """Append one record to its partition's open batch; the future of that batch."""
        if self._stopped:
            raise ProducerClosed()
        partition = self.choose(partitions, key)
        tp = (topic, partition)
        batch = self._open.get(tp)
        if batch is None:
            batch = self._open[tp] = self._new(topic, partition)
        if batch.builder.append(key=key, value=value, timestamp=None, headers=headers) is None:
            # Full: it goes out as it is, and the record opens the next batch (a first record always fits).
            self._full.append(batch)
            batch = self._open[tp] = self._new(topic, partition)
            batch.builder.append(key=key, value=value, timestamp=None, headers=headers)
        return batch.future

    def choose(self, partitions: list[int], key: bytes | None) -> int:
        """The partition of a record: `send()`'s choice (murmur2 of the key over every partition). A keyless
        record may go to any partition: aiokafka picks one of the available ones at random, here one of all
        (a partition without a leader fails its batch, and the message is sent again with `send()`)."""
        partition: int
        if key is None:
            partition = self._partitioner(None, partitions, partitions)
            return partition
        last = self._last_choice
        if key == self._last_key and last is not None and last[0] is partitions:
            # A message's outputs usually share a key (an OcrResult, then its ReviewFlag).
            return last[1]
        # DefaultPartitioner's formula
        partition = partitions[(murmurhash2(key, MURMUR2_SEED) & 0x7FFFFFFF) % len(partitions)]
        self._last_key = key
        self._last_choice = (partitions, partition)
        return partition

    async def flush(self) -> None:
        """Return once every batch appended so far is submitted (not acknowledged: the futures say that)."""
        while self._submitter is not None:
            await asyncio.wait([self._submitter])

    async def stop(self) -> None:
        """Submit what is pending, then refuse further records."""
        await self.flush()
        self._stopped = True

    def _new(self, topic: str, partition: int) -> _Batch:
        if self._submitter is None:
            self._submitter = asyncio.get_running_loop().create_task(self._submit_all(), name="produce batches")
            self._submitter.add_done_callback(self._submitter_done)
        return _Batch(topic, partition, self._producer.create_batch(), asyncio.get_running_loop().create_future())

    async def _submit_all(self) -> None:
        """Runs after the tasks that were ready in the turn of the first append: submits every batch, in order,
        until none is left (records appended while a submission waits go in the next batches)."""
        full, open_ = self._full, self._open
        try:
            while full or open_:
                if not full:
                    full.extend(open_.values())
                    open_.clear()
                await self._submit(full.popleft())
        except BaseException as exc:
            # Cancelled (the loop is closing) or a bug: no message may wait forever on a batch never sent.
            self._fail_pending(KafkaError(f"batch submission ended: {exc!r}"))
            raise
        finally:
            self._submitter = None

    async def _submit(self, batch: _Batch) -> None:
        builder = batch.builder
        builder.close()
        topic = batch.topic
        try:
            current = list(await self._producer.partitions_for(topic))
            if current != self._partitions.get(topic, current):
                # Partitions were added: later records hash over the new list, as send() would.
                self._partitions[topic] = current
            sent = await self._producer.send_batch(builder, topic, partition=batch.partition)
        except asyncio.CancelledError:
            _fail(batch.future, KafkaError("cancelled before the batch was submitted"))
            raise
        except Exception as exc:  # any refusal fails this batch's messages, which resend their records one by one
            self.forget(topic)
            _fail(batch.future, exc)
            return
        placeholder = batch.future

        def settled(done: asyncio.Future[Any]) -> None:
            if placeholder.done():
                return
            if done.cancelled():
                _fail(placeholder, KafkaError("the batch's delivery was cancelled"))
                return
            exc = done.exception()
            if exc is None:
                placeholder.set_result(None)
            else:
                self.forget(topic)
                _fail(placeholder, exc)

        sent.add_done_callback(settled)

    def _fail_pending(self, exc: Exception) -> None:
        for batch in [*self._full, *self._open.values()]:
            _fail(batch.future, exc)
        self._full.clear()
        self._open.clear()

    def _submitter_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("submitting produce batches failed", exc_info=task.exception())


def _fail(future: asyncio.Future[None], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
        # Read by whoever waits on it; marked retrieved so a future nobody waits on (its message was requeued
        # at shutdown) does not log "exception was never retrieved".
        future.exception()
