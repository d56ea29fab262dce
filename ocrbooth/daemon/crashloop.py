"""Crash-loop protection: a message during whose handling the process died is not handled forever.

Before a message is handled, its offset is recorded (per partition, in S3: Kafka commit metadata would be the
natural place, but brokers such as Tansu drop it) as possibly in flight. One write covers a window: from the
first offset still pending up to `ahead` offsets past the newest one handled, so a partition costs one S3 write
per `ahead` messages rather than one per fetch (a boto3 write costs milliseconds of CPU), at the price of
counting offsets of that window that were never fetched as in flight too. A daemon that starts owning a partition reads
that record: offsets still in flight there died with the previous owner. Many messages are in flight at
once, so one death cannot say which of them was the killer: each of them becomes a *suspect* with one death,
and a suspect is handled alone (nothing else in flight in the process, its offset recorded as isolated).
A death while isolated is certainly that message's, and counts again. At `max_process_deaths` deaths the
message is dead-lettered as `crash_loop` without being handled again, and its partition moves on.

The record is `state/crashloop/{group}/{topic}/{partition}.json`:
``{"window": [from, to) | null, "isolated": offset | null, "deaths": {"offset": n}}``.
`Ledger` and `deaths_after_restart` are pure; `CrashGuard` does the S3 reads and writes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, Literal, Protocol, TypeVar

from ocrbooth.constants import S3_PREFIX_STATE
from ocrbooth.errors import OcrboothError, PoisonError

log = logging.getLogger(__name__)

TP = TypeVar("TP", bound=Hashable)
Verdict = Literal["ok", "suspect", "crash_loop"]


_MAX_WINDOW = 1_000_000  # a recorded window wider than this is not ours (hand-edited or corrupt): ignored


@dataclass
class Ledger:
    """One partition's record."""

    window: tuple[int, int] | None = None
    """Offsets [from, to) that may have been in flight."""
    isolated: int | None = None
    deaths: dict[int, int] = field(default_factory=dict)

    def encode(self) -> bytes:
        return json.dumps(
            {
                "window": list(self.window) if self.window else None,
                "isolated": self.isolated,
                "deaths": {str(k): v for k, v in self.deaths.items()},
            }
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> Ledger:
        """Parse a stored record; an unreadable one (written by hand, or by a future version) counts as empty."""
        try:
            raw = json.loads(data)
            window = raw.get("window")
            low, high = (int(window[0]), int(window[1])) if window else (0, 0)
            if not 0 <= high - low <= _MAX_WINDOW:
                raise ValueError(f"window {window!r} out of bounds")
            isolated = raw.get("isolated")
            deaths = {int(k): int(v) for k, v in (raw.get("deaths") or {}).items()}
            return cls((low, high) if window else None, None if isolated is None else int(isolated), deaths)
        except (ValueError, TypeError, AttributeError, RecursionError, IndexError) as exc:
            log.warning("unreadable crash-loop record ignored", extra={"error": repr(exc)})
            return cls()


def deaths_after_restart(ledger: Ledger, committed: int | None) -> dict[int, int]:
    """Deaths per offset once the previous owner's in-flight work is counted as having died with it.

    Offsets below the committed position are done and forgotten. An offset of the recorded window becomes a
    suspect (at least one death); the isolated offset, which was alone in flight, gains a full death."""

    def live(offset: int) -> bool:
        return committed is None or offset >= committed

    deaths = {o: n for o, n in ledger.deaths.items() if live(o)}
    if ledger.window is not None:
        low, high = ledger.window
        for offset in range(max(low, committed or 0), high):
            if offset != ledger.isolated:
                deaths[offset] = max(deaths.get(offset, 0), 1)
    if ledger.isolated is not None and live(ledger.isolated):
        deaths[ledger.isolated] = deaths.get(ledger.isolated, 0) + 1
    return deaths


class ObjectStore(Protocol):
    """What the guard needs of S3 (S3Storage fits)."""

    bucket: str

    def uri(self, key: str, bucket: str | None = None) -> str: ...
    async def put(self, key: str, data: bytes, *, content_type: str = ...) -> str: ...
    async def get(self, uri: str, *, max_bytes: int | None = None) -> bytes: ...


@dataclass
class _PartitionState:
    deaths: dict[int, int]
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    queued: asyncio.Future[None] | None = None
    isolated: int | None = None
    wanted: int = -1
    """The newest offset any caller is about to handle."""
    recorded_to: int = 0
    """The end of the window last written: offsets below it are covered."""


class CrashGuard(Generic[TP]):
    """Records what is in flight per partition and judges messages by their deaths.

    `pending(tp)` returns the offsets of `tp` started and not yet completed (the offset tracker's view)."""

    def __init__(
        self,
        store: ObjectStore,
        group_id: str,
        max_deaths: int,
        pending: Callable[[TP], list[int]],
        name: Callable[[TP], tuple[str, int]],
        ahead: int = 64,
    ) -> None:
        self._store = store
        self._group = group_id
        self.max_deaths = max_deaths
        self._pending = pending
        self._ahead = ahead
        self._extending: set[asyncio.Future[None]] = set()
        self._name = name
        self._parts: dict[TP, _PartitionState] = {}

    @property
    def enabled(self) -> bool:
        return self.max_deaths > 0

    def _key(self, tp: TP) -> str:
        topic, partition = self._name(tp)
        return f"{S3_PREFIX_STATE}crashloop/{self._group}/{topic}/{partition}.json"

    async def load(self, tp: TP, committed: int | None) -> None:
        """Take over a partition: count the previous owner's in-flight work as dead, then record a clean slate
        (so that a death of ours before the first write is not counted twice)."""
        if not self.enabled:
            return
        try:
            data = await self._store.get(self._store.uri(self._key(tp)))
        except PoisonError as exc:
            if exc.code != "source_not_found":
                raise
            ledger = Ledger()
        else:
            ledger = Ledger.decode(data)
        deaths = deaths_after_restart(ledger, committed)
        self._parts[tp] = _PartitionState(deaths=deaths)
        if deaths:
            topic, partition = self._name(tp)
            log.warning(
                "messages were in flight when a daemon died; each is handled alone next",
                extra={
                    "topic": topic,
                    "partition": partition,
                    "deaths": {str(k): v for k, v in sorted(deaths.items())},
                },
            )
        if ledger.window is not None or ledger.isolated is not None or ledger.deaths != deaths:
            await self._write(tp)

    def forget(self, tp: TP) -> None:
        self._parts.pop(tp, None)

    def verdict(self, tp: TP, offset: int) -> Verdict:
        part = self._parts.get(tp)
        if part is None or not part.deaths:
            return "ok"
        n = part.deaths.get(offset, 0)
        if n == 0:
            return "ok"
        return "crash_loop" if n >= self.max_deaths else "suspect"

    def deaths(self, tp: TP, offset: int) -> int:
        part = self._parts.get(tp)
        return 0 if part is None else part.deaths.get(offset, 0)

    async def record(self, tp: TP, offset: int) -> None:
        """Return once `offset` of `tp` is durably covered by the recorded window. Usually free: a write covers
        the next `ahead` offsets too. Concurrent callers share one write, which covers every offset asked for
        before it started."""
        if not self.enabled:
            return
        part = self._parts.get(tp)
        if part is None:
            return
        part.wanted = max(part.wanted, offset)
        while offset >= part.recorded_to:
            if part.queued is not None:
                await asyncio.shield(part.queued)
                continue
            queued = part.queued = asyncio.get_running_loop().create_future()
            try:
                async with part.lock:
                    part.queued = None
                    await self._write(tp)
            except BaseException as exc:
                if part.queued is queued:
                    part.queued = None
                queued.set_exception(exc)
                queued.exception()  # retrieved here, so an unawaited share does not log "never retrieved"
                raise
            queued.set_result(None)
        if offset >= part.recorded_to - self._ahead // 2 and part.queued is None and not part.lock.locked():
            # Half the window is used: extend it in the background, so that handling rarely waits for S3.
            self._extending.add(asyncio.ensure_future(self._extend(tp)))

    async def _extend(self, tp: TP) -> None:
        part = self._parts.get(tp)
        try:
            if part is not None and not part.lock.locked():
                async with part.lock:
                    await self._write(tp)
        except OcrboothError as exc:  # a foreground record() retries when the window really runs out
            log.info("extending the in-flight window failed", extra={"error": str(exc)})
        finally:
            self._extending = {f for f in self._extending if not f.done()}

    async def isolate(self, tp: TP, offset: int | None) -> None:
        """Record that `offset` is handled alone (None: isolation over)."""
        part = self._parts.get(tp)
        if part is None or not self.enabled:
            return
        part.isolated = offset
        async with part.lock:
            await self._write(tp)

    async def release(self, tp: TP, committed: int | None) -> None:
        """A clean hand-over (revoke, shutdown): nothing of ours died in flight."""
        part = self._parts.pop(tp, None)
        if part is None or not self.enabled:
            return
        deaths = {o: n for o, n in part.deaths.items() if committed is None or o >= committed}
        ledger = Ledger(window=None, isolated=None, deaths=deaths)
        async with part.lock:
            await self._store.put(self._key(tp), ledger.encode(), content_type="application/json")

    async def _write(self, tp: TP) -> None:
        part = self._parts[tp]
        pending = self._pending(tp)
        window = None
        if part.wanted >= 0:
            low = min(pending[0], part.wanted) if pending else part.wanted
            window = (low, part.wanted + 1 + self._ahead)
        ledger = Ledger(window=window, isolated=part.isolated, deaths=dict(part.deaths))
        await self._store.put(self._key(tp), ledger.encode(), content_type="application/json")
        if window is not None:
            part.recorded_to = max(part.recorded_to, window[1])
