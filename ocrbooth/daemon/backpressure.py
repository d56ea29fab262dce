"""Backpressure: how many messages each handler may still take, and which partitions are paused because of it.

Every handler has a budget of `max_in_flight` messages accepted and not yet covered by a commit (so at most
that many can be redelivered after a crash). A handler without room (budget spent, or its `busy()` says so)
gets its partitions paused while polling goes on, so the member stays in the group however long the work
takes (Karafka's long-running-jobs pattern). When every handler is full the partitions stay fetching for
`pause_after_ms` first: room frees as commits land, and a short wait keeps aiokafka prefetching. While a
dependency is down every partition is paused, and a partition whose crash-loop record is still being read
stays paused until it is. aiokafka forgets pauses on rebalance, so they are re-applied after every assignment.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping

from aiokafka import AIOKafkaConsumer, TopicPartition

from ocrbooth.config import Settings
from ocrbooth.daemon.dispatch import Route
from ocrbooth.daemon.outage import Dependencies
from ocrbooth.daemon.shutdown import wait_event
from ocrbooth.handlers.base import AnyHandler
from ocrbooth.metrics import Metrics


class Backpressure:
    """Per-handler budgets and the set of paused partitions of one group member."""

    def __init__(
        self, settings: Settings, metrics: Metrics, routes: Mapping[str, Route], dependencies: Dependencies
    ) -> None:
        self._s = settings
        self._metrics = metrics
        self._routes = routes
        self._deps = dependencies
        self.client: AIOKafkaConsumer | None = None
        """The group consumer, once started."""
        self.handlers = {r.handler.name: r.handler for r in routes.values()}
        self._taken: dict[str, int] = dict.fromkeys(self.handlers, 0)
        self.paused: set[TopicPartition] = set()
        self.loading: set[TopicPartition] = set()
        """Partitions whose crash-loop record is still being read: paused until it is."""
        self._full_since: float | None = None
        self.freed = asyncio.Event()
        """Set when room may have freed (a commit, a finished message, a rebalance, a record read)."""

    # ---- budgets ---------------------------------------------------------------------------------

    def take(self, handler: AnyHandler, n: int = 1) -> None:
        """`n` more messages of `handler` accepted."""
        self._taken[handler.name] += n

    def give_back(self, tp: TopicPartition, n: int) -> None:
        """`n` messages of `tp` no longer count (covered by a commit, or their partition revoked)."""
        if n:
            self._taken[self._routes[tp.topic].handler.name] -= n

    def room(self, handler: AnyHandler) -> int:
        return self._s.max_in_flight - self._taken[handler.name]

    def blocked(self, handler: AnyHandler) -> bool:
        """The handler takes no new message now: its budget is spent, or it says it is busy."""
        return self._taken[handler.name] >= self._s.max_in_flight or handler.busy()

    def open_handlers(self) -> list[AnyHandler]:
        return [h for h in self.handlers.values() if not self.blocked(h)]

    # ---- pausing ---------------------------------------------------------------------------------

    def apply(self, *, everything: bool = False) -> None:
        """Pause exactly the partitions that cannot take work now, resume the others."""
        client = self.client
        if client is None:
            return
        assigned = client.assignment()
        full_for_long = (
            self._full_since is not None and time.monotonic() - self._full_since >= self._s.pause_after_ms / 1000
        )
        if everything or self._deps.any_down() or full_for_long:
            want = set(assigned)
        else:
            blocked = {name for name, h in self.handlers.items() if self.blocked(h)}
            if len(blocked) == len(self.handlers):
                blocked = set()  # all full: keep prefetching for a while (pause_after_ms) before pausing
            want = {tp for tp in assigned if self._routes[tp.topic].handler.name in blocked}
        want |= self.loading & assigned
        to_pause = want - self.paused
        to_resume = (self.paused - want) & assigned
        if to_pause:
            client.pause(*to_pause)
        if to_resume:
            client.resume(*to_resume)
        self.paused = want
        self._metrics.paused_partitions.set(len(want))

    def has_room(self) -> None:
        """Some handler took a message: the wait for room (if any) is over."""
        self._full_since = None

    @property
    def waiting_for_room(self) -> bool:
        """Every handler is blocked and the fetch loop waits for room: a commit now is what frees it."""
        return self._full_since is not None

    async def wait_for_room(self) -> None:
        """Every handler is full: wait for room to free, pausing once that lasts past pause_after_ms."""
        if self._full_since is None:
            self._full_since = time.monotonic()
        await self.idle_poll()

    async def idle_poll(self, *, everything: bool = False) -> None:
        """Wait (at most a poll timeout) for room to free; with partitions paused, poll so that the member
        stays in the group."""
        client = self.client
        assert client is not None
        self.freed.clear()  # before the awaits: a commit that frees room meanwhile must wake the wait
        self.apply(everything=everything)
        if self.paused:
            await client.getmany(timeout_ms=0)
        await wait_event(self.freed, self._s.poll_timeout_ms / 1000)

    # ---- rebalances ------------------------------------------------------------------------------

    def assigned(self) -> None:
        """A new assignment: aiokafka has forgotten every pause."""
        self.paused = set()
        self.apply()

    def revoked(self, revoked: Iterable[TopicPartition]) -> None:
        gone = set(revoked)
        self.paused -= gone
        self.loading -= gone
        self.freed.set()
