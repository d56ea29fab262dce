"""The consumer loop: fetch, accept, hand each message to the dispatcher, commit. At-least-once by construction.

A fetched record is *accepted* when its handler has room: it is tracked until a commit covers it, so at most
`max_in_flight` records per handler can be redelivered after a crash. When a handler has no room (its budget
is spent, or it says it is busy) its partitions are paused and polling goes on, so the member stays in the
group. While S3 is unreachable every partition is paused. A message that was in flight when a daemon died is
handled alone next time, and one that keeps killing the daemon is dead-lettered (`daemon/crashloop.py`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from ocrbooth.config import Settings
from ocrbooth.daemon.crashloop import CrashGuard
from ocrbooth.daemon.decode import decode, message_context
from ocrbooth.daemon.dispatch import Dispatcher, Interrupted, Route
from ocrbooth.daemon.offsets import OffsetTracker
from ocrbooth.daemon.outage import Dependencies
from ocrbooth.daemon.publisher import Publisher
from ocrbooth.daemon.shutdown import wait_event
from ocrbooth.errors import FatalError, OcrboothError, PoisonError
from ocrbooth.handlers.base import AnyHandler
from ocrbooth.logs import log_context
from ocrbooth.messages import MessageContext, OutputEvent
from ocrbooth.metrics import Metrics, observe_many
from ocrbooth.retry import Backoff, backoff_s, retry
from ocrbooth.schemas import ErrorInfo

log = logging.getLogger(__name__)

Spawn = Callable[[Coroutine[Any, Any, None], str], asyncio.Task[None]]
Mode = Literal["normal", "isolated", "crash_loop"]

__all__ = ["Consumer", "Route", "decode"]


class Consumer:
    """Owns the group consumer, the offset tracker, the crash guard and the pause state."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        publisher: Publisher,
        routes: Mapping[str, Route],
        spawn: Spawn,
        dispatcher: Dispatcher,
        dependencies: Dependencies,
        guard: CrashGuard[TopicPartition] | None = None,
    ) -> None:
        self._s = settings
        self._metrics = metrics
        self._publisher = publisher
        self._routes = dict(routes)
        self._spawn = spawn
        self._dispatcher = dispatcher
        self._deps = dependencies
        self._consumer: AIOKafkaConsumer | None = None
        self.tracker: OffsetTracker[TopicPartition] = OffsetTracker()
        self.guard = guard
        self._handlers = {r.handler.name: r.handler for r in self._routes.values()}
        self._tracked_by: dict[str, int] = dict.fromkeys(self._handlers, 0)
        self._tasks: set[asyncio.Task[None]] = set()
        self._paused: set[TopicPartition] = set()
        self._loading: set[TopicPartition] = set()
        self._isolating: tuple[TopicPartition, Any] | None = None
        """A suspect record held until it can be handled alone (its partition is positioned just after it)."""
        self._full_since: float | None = None
        self._fetching = True
        self._commit_wanted = asyncio.Event()
        self._capacity_freed = asyncio.Event()
        self._commit_lock = asyncio.Lock()
        self.assigned_once = False
        self._metric_children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self.counts = {"succeeded": 0, "dead_lettered": 0, "failed_result": 0, "requeued": 0}

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        k = self._s.kafka
        self._consumer = AIOKafkaConsumer(
            **k.client_options(),
            group_id=self._s.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=k.session_timeout_ms,
            heartbeat_interval_ms=k.heartbeat_interval_ms,
            max_poll_interval_ms=k.max_poll_interval_ms,
            max_partition_fetch_bytes=max(self._s.max_input_message_bytes, 1024 * 1024),
            fetch_max_bytes=max(self._s.max_input_message_bytes * 2, 50 * 1024 * 1024),
            isolation_level="read_committed",
        )
        try:
            await self._consumer.start()
        except BaseException:
            consumer, self._consumer = self._consumer, None
            await consumer.stop()
            raise
        self._consumer.subscribe(list(self._routes), listener=_Listener(self))

    def stop_fetching(self) -> None:
        self._fetching = False
        self._capacity_freed.set()

    async def drain(self, timeout_s: float) -> int:
        """Wait for in-flight work; cancel what is left at the deadline. Returns how many were cancelled."""
        tasks = set(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
            return len(pending)
        return 0

    async def close(self) -> None:
        """Commit what is complete, hand the partitions over cleanly, then leave the group (aiokafka does not
        call revoke before stop)."""
        if self._consumer is None:
            return
        await self.commit()
        await self._release(self.tracker.partitions())
        consumer, self._consumer = self._consumer, None
        await consumer.stop()

    # ---- capacity and pausing --------------------------------------------------------------------

    def _room(self, handler: AnyHandler) -> int:
        return self._s.max_in_flight - self._tracked_by[handler.name]

    def _blocked(self, handler: AnyHandler) -> bool:
        """The handler takes no new message now: its budget is spent, or it says it is busy."""
        return self._tracked_by[handler.name] >= self._s.max_in_flight or handler.busy()

    def _apply_pauses(self, *, everything: bool = False) -> None:
        """Pause exactly the partitions that cannot take work now; aiokafka forgets pauses on rebalance,
        so this also runs after every assignment."""
        consumer = self._consumer
        if consumer is None:
            return
        assigned = consumer.assignment()
        full_for_long = (
            self._full_since is not None and time.monotonic() - self._full_since >= self._s.pause_after_ms / 1000
        )
        if everything or self._deps.any_down() or full_for_long:
            want = set(assigned)
        else:
            blocked = {name for name, h in self._handlers.items() if self._blocked(h)}
            if len(blocked) == len(self._handlers):
                blocked = set()  # all full: keep prefetching for a while (pause_after_ms) before pausing
            want = {tp for tp in assigned if self._routes[tp.topic].handler.name in blocked or tp in self._loading}
        want |= self._loading & assigned
        to_pause = want - self._paused
        to_resume = (self._paused - want) & assigned
        if to_pause:
            consumer.pause(*to_pause)
        if to_resume:
            consumer.resume(*to_resume)
        self._paused = want
        self._metrics.paused_partitions.set(len(want))

    async def _idle_poll(self) -> None:
        """Wait for capacity with every partition paused, polling so the member stays in the group."""
        consumer = self._consumer
        assert consumer is not None
        self._capacity_freed.clear()  # before the awaits: a commit that frees room meanwhile must wake the wait
        if self._paused:
            await consumer.getmany(timeout_ms=0)
        await wait_event(self._capacity_freed, self._s.poll_timeout_ms / 1000)

    # ---- the fetch loop --------------------------------------------------------------------------

    async def fetch_loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while self._fetching:
            if self._deps.any_down():
                # An outage: take nothing new; what is in flight waits for the dependency (dispatch.py).
                self._apply_pauses(everything=True)
                await self._idle_poll()
                continue
            if self._isolating is not None:
                await self._isolation_step()
                continue
            open_handlers = [h for h in self._handlers.values() if not self._blocked(h)]
            if not open_handlers:
                # Full. A short wait (room frees as commits land) keeps aiokafka prefetching; when it lasts past
                # pause_after_ms the partitions are paused and polling goes on, so the member stays in the
                # group however long the work takes (Karafka's long-running-jobs pattern).
                if self._full_since is None:
                    self._full_since = time.monotonic()
                self._capacity_freed.clear()
                self._apply_pauses()
                if self._paused:
                    await consumer.getmany(timeout_ms=0)
                await wait_event(self._capacity_freed, self._s.poll_timeout_ms / 1000)
                continue
            self._full_since = None
            self._apply_pauses()
            room = max(self._room(h) for h in open_handlers)
            try:
                batch = await consumer.getmany(timeout_ms=self._s.poll_timeout_ms, max_records=room)
            except KafkaError as exc:  # aiokafka reconnects by itself; poll again after a pause
                log.warning("fetch failed, retrying", extra={"error": repr(exc)})
                await asyncio.sleep(backoff_s(1, initial_ms=200, max_ms=1000) + 0.1)
                continue
            if not self._fetching:
                # Stopped while fetching: these records were never accepted, a later member reads them again.
                break
            for tp, records in batch.items():
                self._accept(consumer, tp, records)

    def _accept(self, consumer: AIOKafkaConsumer, tp: TopicPartition, records: list[Any]) -> None:
        route = self._routes[tp.topic]
        handler = route.handler
        owned = self.tracker.has(tp) and tp not in self._loading
        batch: list[tuple[Any, int]] | None = [] if handler.batch_mode else None
        accepted = 0
        guard = self.guard
        for i, record in enumerate(records):
            verdict = "ok" if guard is None else guard.verdict(tp, record.offset)
            if verdict == "suspect" and owned and self._isolating is None:
                # In flight when a daemon died: held here and handled alone once nothing else is in flight; the
                # partition goes on after it.
                self._isolating = (tp, record)
                if tp in consumer.assignment():
                    consumer.seek(tp, record.offset + 1)
                break
            if not owned or self._blocked(handler) or verdict == "suspect" or self._isolating is not None:
                # Not accepted: rewind so these records are fetched again once there is room (or once the
                # suspect being isolated is done).
                if tp in consumer.assignment():
                    consumer.seek(tp, record.offset)
                log.debug("rewound %s to %d (%d records not accepted)", tp, record.offset, len(records) - i)
                break
            epoch = self._start(tp, handler, record.offset)
            accepted += 1
            if verdict == "crash_loop":
                self._spawn_one(record, route, epoch, "crash_loop")
            elif batch is not None:
                batch.append((record, epoch))
            else:
                self._spawn_one(record, route, epoch, "normal")
        if accepted:
            self._metrics.consumed.labels(tp.topic).inc(accepted)
        if batch:
            first = batch[0][0].offset
            task = self._spawn(
                self._process_batch(batch, route), f"handle {tp.topic}/{tp.partition}/{first}+{len(batch)}"
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._metrics.in_flight.set(len(self._tasks))
        self._metrics.uncommitted.set(self.tracker.tracked)

    def _start(self, tp: TopicPartition, handler: AnyHandler, offset: int) -> int:
        epoch = self.tracker.start(tp, offset)
        self._tracked_by[handler.name] += 1
        return epoch

    def _spawn_one(self, record: Any, route: Route, epoch: int, mode: Mode) -> None:
        task = self._spawn(
            self._process(record, route, epoch, mode), f"handle {record.topic}/{record.partition}/{record.offset}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _isolation_step(self) -> None:
        """Handle the held suspect alone: wait (polling, all paused) until nothing else is in flight, run it, and
        wait for it too; then ordinary fetching resumes after it."""
        consumer = self._consumer
        assert consumer is not None
        assert self._isolating is not None
        tp, record = self._isolating
        if tp not in consumer.assignment() or not self.tracker.has(tp) or not self._fetching:
            self._isolating = None
            return
        self._apply_pauses(everything=True)
        if self._tasks:
            await self._idle_poll()
            return
        route = self._routes[tp.topic]
        deaths = self.guard.deaths(tp, record.offset) if self.guard is not None else 0
        log.warning(
            "handling a message alone: it was in flight when a daemon died",
            extra={"topic": tp.topic, "partition": tp.partition, "offset": record.offset, "deaths": deaths},
        )
        epoch = self._start(tp, route.handler, record.offset)
        self._metrics.consumed.labels(tp.topic).inc()
        self._spawn_one(record, route, epoch, "isolated")
        while self._tasks:
            await self._idle_poll()
        self._isolating = None

    # ---- one message -----------------------------------------------------------------------------

    def _topic_metrics(self, topic: str, outcome: str) -> tuple[Any, Any]:
        """Labelled children, looked up once: `.labels()` costs more than the increment itself."""
        key = (topic, outcome)
        found = self._metric_children.get(key)
        if found is None:
            found = (self._metrics.handled.labels(topic, outcome), self._metrics.handle_seconds.labels(topic))
            self._metric_children[key] = found
        return found

    async def _in_flight_recorded(self, tp: TopicPartition, offset: int) -> None:
        """Wait until the crash guard has recorded this partition's in-flight offsets (S3 outages waited out)."""
        guard = self.guard
        if guard is None or not guard.enabled:
            return
        await self._durably(lambda: guard.record(tp, offset), "record in-flight offsets")

    async def _durably(self, op: Callable[[], Coroutine[Any, Any, None]], what: str) -> None:
        """Run an S3 write of the daemon's own state until it succeeds; an outage pauses work meanwhile."""

        async def on_retry(exc: Exception, failures: int, delay: float) -> None:
            down = await self._dispatcher.s3.confirm(str(exc))
            log.warning("%s failed, retrying", what, extra={"error": str(exc), "attempt": failures, "s3_down": down})

        await retry(
            op,
            retry_on=OcrboothError,
            backoff=Backoff(self._s.retry.initial_backoff_ms, self._s.retry.max_backoff_ms),
            on_retry=on_retry,
            sleep=lambda delay: self._dispatcher.until_stopping(asyncio.sleep(delay)),
        )

    async def _process_batch(self, items: list[tuple[Any, int]], route: Route) -> None:
        """Batch mode, for handlers that do no I/O of their own (`Handler.batch_mode`): one task per fetched
        batch instead of one per message, and all outputs sent with one acknowledgement wait. Anything that
        fails takes the per-message path, with its retries, failure results and dead letters."""
        started = time.perf_counter()
        done: list[tuple[Any, int, str]] = []
        tp = TopicPartition(items[0][0].topic, items[0][0].partition)  # one task per fetched partition
        try:
            try:
                await self._in_flight_recorded(tp, items[-1][0].offset)
            except Interrupted:
                done.extend((record, epoch, "requeued") for record, epoch in items)
                return
            staged: list[tuple[Any, int, MessageContext, Sequence[OutputEvent]]] = []
            for record, epoch in items:
                ctx = message_context(record)
                try:
                    event = decode(record.value, route.model, max_bytes=self._s.max_input_message_bytes)
                    route.handler.validate(event)
                    outputs = await route.handler.handle(event, ctx)
                except FatalError:
                    raise
                except Exception:
                    with log_context(topic=ctx.topic, partition=ctx.partition, offset=ctx.offset):
                        done.append((record, epoch, await self._dispatch(record.value, route, ctx)))
                    continue
                staged.append((record, epoch, ctx, outputs))
            if staged:
                try:
                    await self._publisher.publish_batch([(outputs, ctx) for _, _, ctx, outputs in staged])
                    done.extend((record, epoch, "succeeded") for record, epoch, _, _ in staged)
                except PoisonError:
                    for record, epoch, ctx, _ in staged:
                        with log_context(topic=ctx.topic, partition=ctx.partition, offset=ctx.offset):
                            done.append((record, epoch, await self._dispatch(record.value, route, ctx)))
        finally:
            elapsed = time.perf_counter() - started
            wanted = False
            outcomes: Counter[str] = Counter()
            complete = self.tracker.complete
            for record, epoch, outcome in done:
                outcomes[outcome] += 1
                if outcome != "requeued":
                    wanted = complete(tp, record.offset, epoch) or wanted
            for outcome, n in outcomes.items():
                self.counts[outcome] += n
                handled, seconds = self._topic_metrics(tp.topic, outcome)
                handled.inc(n)
                observe_many(seconds, elapsed, n)
            if wanted:
                self._commit_wanted.set()
            self._capacity_freed.set()

    async def _dispatch(self, value: bytes | None, route: Route, ctx: MessageContext) -> str:
        """The dispatcher's outcome; a bug anywhere below still ends in a dead letter, never in silence."""
        try:
            return await self._dispatcher.dispatch(value, route, ctx)
        except (FatalError, asyncio.CancelledError):
            raise
        except Exception as exc:
            log.exception("dispatching a message failed")
            error = ErrorInfo(
                code="internal_error", message=f"{type(exc).__name__}: {exc}"
            )  # the publisher cuts it to fit
            return await self._dispatcher.dead_letter(ctx, value, error)

    async def _process(self, record: Any, route: Route, epoch: int, mode: Mode) -> None:
        tp = TopicPartition(record.topic, record.partition)
        ctx = message_context(record)
        started = time.perf_counter()
        outcome = "requeued"
        try:
            with log_context(topic=ctx.topic, partition=ctx.partition, offset=ctx.offset):
                outcome = await self._process_one(tp, record, route, ctx, mode)
        finally:
            self.counts[outcome] += 1
            handled, seconds = self._topic_metrics(ctx.topic, outcome)
            handled.inc()
            seconds.observe(time.perf_counter() - started)
            if outcome != "requeued" and self.tracker.complete(tp, record.offset, epoch):
                self._commit_wanted.set()
            self._capacity_freed.set()

    async def _process_one(self, tp: TopicPartition, record: Any, route: Route, ctx: MessageContext, mode: Mode) -> str:
        guard = self.guard
        if mode == "crash_loop" and guard is not None:
            n = guard.deaths(tp, record.offset)
            self._metrics.crash_loops.labels(tp.topic).inc()
            error = ErrorInfo(
                code="crash_loop",
                message=f"the daemon died {n} times while handling this message; it is not handled again",
            )
            log.error("dead-lettering a message that keeps killing the daemon", extra={"deaths": n})
            return await self._dispatcher.dead_letter(ctx, record.value, error)
        try:
            await self._in_flight_recorded(tp, record.offset)
            if mode == "isolated" and guard is not None:
                await self._durably(lambda: guard.isolate(tp, record.offset), "record the isolated offset")
        except Interrupted:
            return "requeued"
        outcome = await self._dispatch(record.value, route, ctx)
        if mode == "isolated" and guard is not None:
            try:
                await self._durably(lambda: guard.isolate(tp, None), "clear the isolated offset")
            except Interrupted:
                pass  # a stale isolated offset only costs one more lone run of a message that is done
        return outcome

    # ---- commits ---------------------------------------------------------------------------------

    async def commit_loop(self) -> None:
        """Commit soon after completions (bounding redelivery), at least every commit_interval_ms."""
        while self._consumer is not None:
            if await wait_event(self._commit_wanted, self._s.commit_interval_ms / 1000):
                # Let completions that arrive together share one commit round trip.
                await asyncio.sleep(self._s.commit_coalesce_ms / 1000)
            self._commit_wanted.clear()
            await self.commit()
            self._update_lag()

    async def commit(self, only: Iterable[TopicPartition] | None = None) -> bool:
        """Commit every partition whose contiguous completed offset advanced. False on failure (kept for later)."""
        consumer = self._consumer
        if consumer is None:
            return False
        async with self._commit_lock:
            plan = self.tracker.commit_plan(only)
            if not plan:
                return True
            try:
                await consumer.commit(plan)
            except (CommitFailedError, IllegalStateError) as exc:
                # The group rebalanced under us; the new owner re-reads from the last commit.
                self._metrics.commit_failures.inc()
                log.warning("commit rejected after a rebalance", extra={"error": repr(exc)})
                return False
            except KafkaError as exc:
                self._metrics.commit_failures.inc()
                log.warning("commit failed, will retry", extra={"error": repr(exc)})
                return False
            before = {tp: self.tracker.tracked_in(tp) for tp in plan}
            freed = self.tracker.mark_committed(plan)
            for tp, n in before.items():
                self._tracked_by[self._routes[tp.topic].handler.name] -= n - self.tracker.tracked_in(tp)
            self._metrics.commits.inc()
            self._metrics.uncommitted.set(self.tracker.tracked)
            if freed:
                self._capacity_freed.set()
            return True

    def _update_lag(self) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        self._metrics.in_flight.set(len(self._tasks))
        for tp in self.tracker.partitions():
            # The fetch high watermark, not ListOffsets: some brokers (Tansu on S3) answer the latter wrongly.
            hw = consumer.highwater(tp)
            if hw is not None:
                self._metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(
                    max(0, hw - (self.tracker.committed(tp) or 0))
                )

    # ---- rebalances ------------------------------------------------------------------------------

    async def _release(self, partitions: Iterable[TopicPartition]) -> None:
        """Tell the crash guard these partitions are handed over cleanly (best effort: a failure only makes
        their in-flight messages suspects for the next owner)."""
        guard = self.guard
        if guard is None:
            return
        for tp in partitions:
            if tp in self._loading:
                guard.forget(tp)
                continue
            try:
                async with asyncio.timeout(5):
                    await guard.release(tp, self.tracker.committed(tp))
            except (OcrboothError, TimeoutError) as exc:
                guard.forget(tp)
                log.warning("could not record a clean hand-over", extra={"partition": str(tp), "error": str(exc)})

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.commit(only=revoked)
        await self._release(revoked)
        for tp in revoked:
            self._tracked_by[self._routes[tp.topic].handler.name] -= self.tracker.tracked_in(tp)
        self.tracker.revoke(revoked)
        self._paused -= revoked
        self._loading -= revoked
        if self._isolating is not None and self._isolating[0] in revoked:
            self._isolating = None
        for tp in revoked:
            try:
                self._metrics.consumer_lag.remove(tp.topic, str(tp.partition))
            except KeyError:
                pass
        self._metrics.uncommitted.set(self.tracker.tracked)
        self._capacity_freed.set()
        log.info("partitions revoked", extra={"partitions": sorted(f"{t.topic}/{t.partition}" for t in revoked)})

    async def on_assigned(self, assigned: set[TopicPartition]) -> None:
        consumer = self._consumer
        if consumer is None:  # closing: the group is being left, nothing to take on
            return
        new = [tp for tp in assigned if tp not in self.tracker.partitions()]
        self.tracker.assign(new)
        for tp in new:
            try:
                committed = await consumer.committed(tp)
            except KafkaError:
                committed = None
            if committed is not None:
                self.tracker.mark_committed({tp: committed})
        if self.guard is not None and self.guard.enabled:
            # Read what the previous owner left in flight before fetching; paused until then.
            for tp in new:
                self._loading.add(tp)
                self._spawn(self._load_guard(tp), f"crash guard {tp.topic}/{tp.partition}")
        self._paused = set()
        self._apply_pauses()
        self.assigned_once = True
        self._metrics.rebalances.inc()
        self._metrics.assigned_partitions.set(len(assigned))
        log.info("partitions assigned", extra={"partitions": sorted(f"{t.topic}/{t.partition}" for t in assigned)})

    async def _load_guard(self, tp: TopicPartition) -> None:
        guard = self.guard
        assert guard is not None
        try:
            await self._durably(lambda: guard.load(tp, self.tracker.committed(tp)), "read the crash-loop record")
        except Interrupted:
            return
        except Exception:  # a bug here must not leave the partition paused: go on without its history
            log.exception("reading the crash-loop record failed; the partition goes on without it")
            guard.forget(tp)
        finally:
            self._capacity_freed.set()
        if self.tracker.has(tp):
            self._loading.discard(tp)

    # ---- state for health and idle detection -----------------------------------------------------

    def caught_up(self) -> bool:
        """Nothing in flight, nothing uncommitted, and every assigned partition read to its high watermark."""
        consumer = self._consumer
        if consumer is None or not self.assigned_once or self._tasks or self.tracker.tracked or self._loading:
            return False
        for tp in consumer.assignment():
            hw = consumer.highwater(tp)
            if hw is None or hw > (self.tracker.committed(tp) or 0):
                return False
        return True


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: Consumer) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._owner.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._owner.on_assigned(set(assigned))
