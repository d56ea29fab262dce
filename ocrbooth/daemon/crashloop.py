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
from ocrbooth.errors import PoisonError

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


class Released(Exception):
    """The partition was handed over (or forgotten) while a message waited for its offset to be recorded."""


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
    """One write of the record at a time, in order."""
    next_write: asyncio.Future[None] | None = None
    """A window write that has not read `wanted` yet, so it will cover every offset noted until it does."""
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

    async def load(self, tp: TP, committed: int | None, *, position: int | None = None) -> None:
        """Take over a partition: count the previous owner's in-flight work as dead, then record a clean slate
        (so that a death of ours before the first write is not counted twice). With `position` (the first offset
        that will be fetched), that record already holds the first window, so the first fetch does not wait
        for S3."""
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
        if position is not None and self._ahead > 0:
            async with self._parts[tp].lock:
                await self._write(tp, start=position)
        elif ledger.window is not None or ledger.isolated is not None or ledger.deaths != deaths:
            await self._write(tp)

    def forget(self, tp: TP) -> None:
        self._parts.pop(tp, None)

    def has_deaths(self, tp: TP) -> bool:
        """Whether some offset of `tp` died with a daemon: only then can a verdict there be other than "ok"."""
        part = self._parts.get(tp)
        return part is not None and bool(part.deaths)

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

    def covers(self, tp: TP, offset: int) -> bool:
        """Note that `offset` of `tp` is about to be handled; True when the recorded window already covers it,
        so that nothing needs to be awaited (the usual case: a write covers the next `ahead` offsets too).
        False means `record()` must be awaited first."""
        if not self.enabled:
            return True
        part = self._parts.get(tp)
        if part is None:
            return True
        if offset > part.wanted:
            part.wanted = offset
        if offset >= part.recorded_to:
            return False
        self._extend_soon(tp, part, offset)
        return True

    async def record(self, tp: TP, offset: int) -> None:
        """Return once `offset` of `tp` is durably covered by the recorded window. Concurrent callers share one
        write: a write covers every offset noted before it started, so a caller joins the next write rather
        than queueing one of its own behind it."""
        if self.covers(tp, offset):
            return
        part = self._parts[tp]
        while offset >= part.recorded_to:
            await asyncio.shield(self._next_write(tp, part))
            current = self._parts.get(tp)
            if current is None:
                raise Released(f"{self._name(tp)} was handed over before offset {offset} was recorded")
            if current is not part:
                # Taken over again (a new assignment read the record anew): record the offset in the new state.
                part = current
                if self.covers(tp, offset):
                    return

    def _next_write(self, tp: TP, part: _PartitionState) -> asyncio.Future[None]:
        """The write that will cover every offset noted so far: the one waiting to start, or a new one."""
        future = part.next_write
        if future is None:
            future = part.next_write = asyncio.ensure_future(self._write_next(tp, part))
        return future

    async def _write_next(self, tp: TP, part: _PartitionState) -> None:
        async with part.lock:
            part.next_write = None  # offsets noted from here on need the write after this one
            if self._parts.get(tp) is part:
                await self._write(tp)

    def _extend_soon(self, tp: TP, part: _PartitionState, offset: int) -> None:
        if offset >= part.recorded_to - self._ahead // 2 and part.next_write is None and not part.lock.locked():
            # Half the window is used: extend it in the background, so that handling rarely waits for S3. Every
            # message of a fetch passes here; one write serves them all.
            future = self._next_write(tp, part)
            self._extending.add(future)
            future.add_done_callback(self._extended)

    def _extended(self, future: asyncio.Future[None]) -> None:
        self._extending.discard(future)
        if not future.cancelled() and (exc := future.exception()) is not None:
            # A foreground record() retries when the window really runs out.
            log.info("extending the in-flight window failed", extra={"error": str(exc)})

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

    async def _write(self, tp: TP, *, start: int | None = None) -> None:
        """Write the partition's record: the window from the oldest pending offset to `ahead` past the newest
        one wanted (or, with `start`, the `ahead` offsets from there), the isolated offset, the deaths."""
        part = self._parts[tp]
        window = None
        if start is not None:
            window = (start, start + self._ahead)
        elif part.wanted >= 0:
            pending = self._pending(tp)
            low = min(pending[0], part.wanted) if pending else part.wanted
            window = (low, part.wanted + 1 + self._ahead)
        ledger = Ledger(window=window, isolated=part.isolated, deaths=dict(part.deaths))
        await self._store.put(self._key(tp), ledger.encode(), content_type="application/json")
        if window is not None:
            part.recorded_to = max(part.recorded_to, window[1])
