"""The group member's fetch loop: fetch, accept what the handlers have room for, start each accepted message.

A fetched record is *accepted* when its handler has room (`daemon/backpressure.py`): it is then tracked until
a commit covers it (`daemon/commits.py`) and handled in a task of its own (`daemon/inflight.py`). Records
that are not accepted are fetched again later (the partition is rewound to them). A record that was in
flight when a daemon died (a *suspect*, `daemon/crashloop.py`) is held here and handled alone once nothing
else is in flight. Rebalances are `daemon/rebalance.py`'s. At-least-once by construction: auto-commit is
off and only completed offsets are committed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from ocrbooth.config import Settings
from ocrbooth.daemon.backpressure import Backpressure
from ocrbooth.daemon.commits import Committer
from ocrbooth.daemon.crashloop import CrashGuard
from ocrbooth.daemon.dispatch import Dispatcher, Route
from ocrbooth.daemon.inflight import InFlight, Spawn
from ocrbooth.daemon.offsets import OffsetTracker
from ocrbooth.daemon.outage import Dependencies
from ocrbooth.daemon.rebalance import RebalanceListener
from ocrbooth.metrics import Metrics
from ocrbooth.retry import backoff_s

log = logging.getLogger(__name__)


class Consumer:
    """One member of the consumer group: owns the group consumer and the fetch loop, and wires the budgets,
    the in-flight tasks, the commits and the rebalance listener together."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        routes: Mapping[str, Route],
        spawn: Spawn,
        dispatcher: Dispatcher,
        dependencies: Dependencies,
        tracker: OffsetTracker[TopicPartition],
        guard: CrashGuard[TopicPartition] | None,
        on_fatal: Callable[[BaseException], None],
    ) -> None:
        """`on_fatal`: called with a FatalError raised while handling a message (GPU or driver broken)."""
        self._s = settings
        self._metrics = metrics
        self._routes = dict(routes)
        self._deps = dependencies
        self._client: AIOKafkaConsumer | None = None
        self.tracker = tracker
        self.guard = guard
        self.budgets = Backpressure(settings, metrics, self._routes, dependencies)
        self.committer = Committer(settings, metrics, tracker, self.budgets)
        self.inflight = InFlight(
            settings, metrics, dispatcher, tracker, self.budgets, self.committer, spawn, guard, on_fatal
        )
        self.listener = RebalanceListener(
            metrics, tracker, self.budgets, self.committer, self.inflight, spawn, self._forget_held
        )
        self._held: tuple[TopicPartition, Any] | None = None
        """A suspect record held until it can be handled alone (its partition is positioned just after it)."""
        self._fetching = True
        metrics.uncommitted.set_function(lambda: tracker.tracked)

    @property
    def counts(self) -> dict[str, int]:
        """Messages handled so far, by outcome."""
        return self.inflight.counts

    @property
    def assigned_once(self) -> bool:
        return self.listener.assigned_once

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        k = self._s.kafka
        client = AIOKafkaConsumer(
            **k.client_options(),
            group_id=self._s.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=k.session_timeout_ms,
            heartbeat_interval_ms=k.heartbeat_interval_ms,
            max_poll_interval_ms=k.max_poll_interval_ms,
            fetch_max_wait_ms=k.fetch_max_wait_ms,
            max_partition_fetch_bytes=max(self._s.max_input_message_bytes, 1024 * 1024),
            fetch_max_bytes=max(self._s.max_input_message_bytes * 2, 50 * 1024 * 1024),
            isolation_level="read_committed",
        )
        try:
            await client.start()
        except BaseException:
            await client.stop()
            raise
        self._client = self.budgets.client = self.committer.client = self.listener.client = client
        client.subscribe(list(self._routes), listener=self.listener)

    def stop_fetching(self) -> None:
        self._fetching = False
        self.budgets.freed.set()

    async def drain(self, timeout_s: float) -> int:
        """Wait for in-flight work; cancel what is left at the deadline. Returns how many were cancelled."""
        return await self.inflight.drain(timeout_s)

    async def commit_loop(self) -> None:
        await self.committer.loop()

    async def close(self) -> None:
        """Commit what is complete, hand the partitions over cleanly, then leave the group (aiokafka does not
        call revoke before stop)."""
        client = self._client
        if client is None:
            return
        await self.committer.commit()
        await self.listener.release(self.tracker.partitions())
        self._client = self.budgets.client = self.committer.client = self.listener.client = None
        await client.stop()

    # ---- the fetch loop --------------------------------------------------------------------------

    async def fetch_loop(self) -> None:
        client = self._client
        assert client is not None
        budgets = self.budgets
        while self._fetching:
            if self._deps.any_down():
                # An outage: take nothing new; what is in flight waits for the dependency (dispatch.py).
                await budgets.idle_poll(everything=True)
                continue
            if self._held is not None:
                await self._handle_held()
                continue
            open_handlers = budgets.open_handlers()
            if not open_handlers:
                await budgets.wait_for_room()
                continue
            budgets.has_room()
            budgets.apply()
            room = max(budgets.room(h) for h in open_handlers)
            try:
                batch = await client.getmany(timeout_ms=self._s.poll_timeout_ms, max_records=room)
            except KafkaError as exc:  # aiokafka reconnects by itself; poll again after a pause
                log.warning("fetch failed, retrying", extra={"error": repr(exc)})
                await asyncio.sleep(backoff_s(1, initial_ms=200, max_ms=1000) + 0.1)
                continue
            if not self._fetching:
                # Stopped while fetching: these records were never accepted, a later member reads them again.
                break
            for tp, records in batch.items():
                self._accept(client, tp, records)

    def _accept(self, client: AIOKafkaConsumer, tp: TopicPartition, records: list[Any]) -> None:
        """Start what the handler has room for of one partition's fetched records, in one pass (offsets, crash
        guard, tasks, budget, metric); rewind to the first record not accepted."""
        route = self._routes[tp.topic]
        handler = route.handler
        budgets = self.budgets
        owned = self.tracker.has(tp) and tp not in budgets.loading
        # Nothing below runs a handler, so its room cannot grow or its busy() change during this pass. While a
        # suspect is held, nothing else is accepted.
        room = max(0, budgets.room(handler)) if owned and not handler.busy() else 0
        crash_loops: set[int] = set()
        if self.guard is not None and self.guard.has_deaths(tp):
            accepted = self._judge(client, tp, records, room, owned, crash_loops)
        else:
            # No offset of this partition died with a daemon: every verdict is "ok", and only room limits.
            if self._held is not None:
                room = 0
            accepted = records if room >= len(records) else records[:room]
            if len(accepted) < len(records):
                self._rewind(client, tp, records, len(accepted))
        if accepted:
            epoch = self.tracker.start_many(tp, [record.offset for record in accepted])
            self.inflight.start_many(tp, accepted, route, epoch, crash_loops)
            budgets.take(handler, len(accepted))
            self._metrics.consumed.labels(tp.topic).inc(len(accepted))

    def _judge(
        self,
        client: AIOKafkaConsumer,
        tp: TopicPartition,
        records: list[Any],
        room: int,
        owned: bool,
        crash_loops: set[int],
    ) -> list[Any]:
        """The records to accept of a partition where offsets died with a daemon, by each one's verdict: a
        suspect is held (or ends the run), a crash loop is accepted to be dead-lettered (its offset added to
        `crash_loops`)."""
        guard = self.guard
        assert guard is not None
        accepted: list[Any] = []
        for record in records:
            verdict = guard.verdict(tp, record.offset)
            if verdict == "suspect" and owned and self._held is None:
                # In flight when a daemon died: held here and handled alone once nothing else is in flight; the
                # partition goes on after it.
                self._held = (tp, record)
                if tp in client.assignment():
                    client.seek(tp, record.offset + 1)
                break
            if len(accepted) >= room or verdict == "suspect" or self._held is not None:
                self._rewind(client, tp, records, len(accepted))
                break
            if verdict == "crash_loop":
                crash_loops.add(record.offset)
            accepted.append(record)
        return accepted

    @staticmethod
    def _rewind(client: AIOKafkaConsumer, tp: TopicPartition, records: list[Any], accepted: int) -> None:
        """Records from `records[accepted]` on were not accepted: fetch them again once there is room (or once
        the suspect being isolated is done)."""
        offset = records[accepted].offset
        if tp in client.assignment():
            client.seek(tp, offset)
        log.debug("rewound %s to %d (%d records not accepted)", tp, offset, len(records) - accepted)

    async def _handle_held(self) -> None:
        """Handle the held suspect alone: wait (polling, all paused) until nothing else is in flight, run it, and
        wait for it too; then ordinary fetching resumes after it."""
        client = self._client
        assert client is not None
        assert self._held is not None
        tp, record = self._held
        if tp not in client.assignment() or not self.tracker.has(tp) or not self._fetching:
            self._held = None
            return
        if self.inflight:
            await self.budgets.idle_poll(everything=True)
            return
        route = self._routes[tp.topic]
        deaths = self.guard.deaths(tp, record.offset) if self.guard is not None else 0
        log.warning(
            "handling a message alone: it was in flight when a daemon died",
            extra={"topic": tp.topic, "partition": tp.partition, "offset": record.offset, "deaths": deaths},
        )
        epoch = self.tracker.start(tp, record.offset)
        self.budgets.take(route.handler)
        self._metrics.consumed.labels(tp.topic).inc()
        self.inflight.start(tp, record, route, epoch, "isolated")
        while self.inflight:
            await self.budgets.idle_poll(everything=True)
        self._held = None

    def _forget_held(self, revoked: set[TopicPartition]) -> None:
        if self._held is not None and self._held[0] in revoked:
            self._held = None

    # ---- state for health and idle detection -----------------------------------------------------

    def caught_up(self) -> bool:
        """Nothing in flight, nothing uncommitted, and every assigned partition read to its high watermark."""
        client = self._client
        if (
            client is None
            or not self.listener.assigned_once
            or self.inflight
            or self.tracker.tracked
            or self.budgets.loading
        ):
            return False
        for tp in client.assignment():
            hw = client.highwater(tp)
            if hw is None or hw > (self.tracker.committed(tp) or 0):
                return False
        return True
