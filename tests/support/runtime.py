"""Fakes of the runtime's outside world for unit tests: a scripted producer, a slow object store, records."""

from __future__ import annotations

import asyncio
from collections import namedtuple
from typing import Any

from ocrbooth.errors import PoisonError

Record = namedtuple("Record", "topic partition offset key value timestamp headers")


class ScriptedBatch:
    """A produce batch as the publisher fills it (aiokafka's BatchBuilder's interface): its records in order;
    full after `capacity` records."""

    def __init__(self, capacity: int | None) -> None:
        self.records: list[tuple[bytes | None, bytes]] = []
        self.capacity = capacity
        self.closed = False

    def append(self, *, key: bytes | None, value: bytes, timestamp: Any, headers: Any) -> Any:
        if self.closed or (self.capacity is not None and len(self.records) >= self.capacity):
            self.closed = True
            return None
        self.records.append((key, value))
        return len(self.records)

    def close(self) -> None:
        self.closed = True


class ScriptedProducer:
    """`send` and `send_batch` hand out futures (one per record, one per batch) that the test resolves;
    `answer()` ends every pending one. `sent` lists every record sent, batched or not, in order; `batches` the
    (topic, partition, record count) of each batch. Topics have `partitions` partitions; a batch holds at most
    `batch_records` records (None: no limit)."""

    def __init__(self, partitions: int = 1, batch_records: int | None = None) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.pending: list[asyncio.Future[Any]] = []
        self.batches: list[tuple[str, int, int]] = []
        self.partitions = partitions
        self.batch_records = batch_records
        self.stopped = False

    async def send(self, topic: str, value: bytes, key: bytes | None = None, headers: Any = None) -> Any:
        self.sent.append((topic, value))
        future = asyncio.get_running_loop().create_future()
        self.pending.append(future)
        return future

    def create_batch(self) -> ScriptedBatch:
        return ScriptedBatch(self.batch_records)

    async def partitions_for(self, topic: str) -> set[int]:
        return set(range(self.partitions))

    async def send_batch(self, batch: ScriptedBatch, topic: str, *, partition: int) -> Any:
        assert batch.closed, "batches are closed before they are submitted"
        self.sent.extend((topic, value) for _, value in batch.records)
        self.batches.append((topic, partition, len(batch.records)))
        future = asyncio.get_running_loop().create_future()
        self.pending.append(future)
        return future

    async def flush(self) -> None:
        """aiokafka's flush waits for the broker; here the test answers."""

    async def stop(self) -> None:
        self.stopped = True

    def answer(self, error: BaseException | None = None) -> None:
        pending, self.pending = self.pending, []
        for future in pending:
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)


class HeldStore:
    """An object store whose writes wait until `answering` is set (S3 slow to answer); it has no objects."""

    bucket = "b"

    def __init__(self) -> None:
        self.answering = asyncio.Event()
        self.answering.set()
        self.puts = 0

    def uri(self, key: str, bucket: str | None = None) -> str:
        return f"s3://b/{key}"

    async def put(self, key: str, data: bytes, *, content_type: str = "") -> str:
        await self.answering.wait()
        self.puts += 1
        return self.uri(key)

    async def get(self, uri: str, *, max_bytes: int | None = None) -> bytes:
        raise PoisonError(f"{uri} does not exist", code="source_not_found")
