"""Fakes of the runtime's outside world for unit tests: a scripted producer, a slow object store, records."""

from __future__ import annotations

import asyncio
from collections import namedtuple
from typing import Any

from ocrbooth.errors import PoisonError

Record = namedtuple("Record", "topic partition offset key value timestamp headers")


class ScriptedProducer:
    """`send` hands out futures the test resolves; `answers` (a list of exceptions or None) decides how the
    futures of later sends end when `answer()` is called."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.pending: list[asyncio.Future[Any]] = []

    async def send(self, topic: str, value: bytes, key: bytes | None = None, headers: Any = None) -> Any:
        self.sent.append((topic, value))
        future = asyncio.get_running_loop().create_future()
        self.pending.append(future)
        return future

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
