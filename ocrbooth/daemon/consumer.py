"""The consumer loop: fetch, decode, hand to a handler, publish, commit. At-least-once by construction.

A fetched record is *accepted* when a slot is free: it is tracked until a commit covers it, so at most
`max_in_flight` records can be redelivered after a crash. When slots run out (globally, or for a handler
with its own limit) the partitions are paused and polling goes on, so the member stays in the group.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from pydantic import BaseModel, ValidationError

from ocrbooth.constants import SCHEMA_VERSION
from ocrbooth.daemon.config import Settings
from ocrbooth.daemon.metrics import Metrics, observe_many
from ocrbooth.daemon.offsets import OffsetTracker
from ocrbooth.daemon.publisher import Publisher
from ocrbooth.daemon.retry import backoff_s
from ocrbooth.daemon.shutdown import wait_event
from ocrbooth.errors import FatalError, PoisonError, RequeueError, RetryableError
from ocrbooth.handlers.base import Handler, MessageContext, OutputEvent
from ocrbooth.logs import bind, log_context
from ocrbooth.schemas import ErrorInfo

log = logging.getLogger(__name__)

Spawn = Callable[[Coroutine[Any, Any, None], str], asyncio.Task[None]]


def decode(value: bytes | None, model: type[BaseModel], *, max_bytes: int) -> BaseModel:
    """Bytes -> event model, or PoisonError with a specific code. Cheap: runs before any GPU work."""
    if value is None or not value:
        raise PoisonError("message has no value", code="empty_message")
    if len(value) > max_bytes:
        raise PoisonError(f"message is {len(value)} bytes, over the {max_bytes} byte limit", code="message_too_large")
    try:
        # Fast path: parse and validate in one pass. Only a failure pays for the precise diagnosis below.
        return model.model_validate_json(value)
    except ValidationError:
        pass
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PoisonError(f"value is not UTF-8: {exc}", code="invalid_utf8") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PoisonError(f"value is not JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise PoisonError(f"value is a JSON {type(data).__name__}, expected an object", code="schema_violation")
    version = data.get("schema_version", SCHEMA_VERSION)
    if isinstance(version, bool) or not isinstance(version, int):
        raise PoisonError(f"schema_version must be an integer, got {version!r}", code="schema_violation")
    if version != SCHEMA_VERSION:
        raise PoisonError(
            f"schema_version {version!r} is not supported (this daemon reads {SCHEMA_VERSION})",
            code="unsupported_schema_version",
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in exc.errors()[:10]
        )
        raise PoisonError(f"{model.__name__} is invalid: {problems}", code="schema_violation") from None


@dataclass(frozen=True, slots=True)
class Route:
    handler: Handler
    model: type[BaseModel]


class Consumer:
    """Owns the group consumer, the offset tracker and the pause state."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        publisher: Publisher,
        routes: Mapping[str, Route],
        spawn: Spawn,
        on_fatal: Callable[[BaseException], None],
    ) -> None:
        self._s = settings
        self._metrics = metrics
        self._publisher = publisher
        self._routes = dict(routes)
        self._spawn = spawn
        self._on_fatal = on_fatal
        self._consumer: AIOKafkaConsumer | None = None
        self.tracker: OffsetTracker[TopicPartition] = OffsetTracker()
        self._running: dict[str, int] = {r.handler.name: 0 for r in self._routes.values()}
        self._tasks: set[asyncio.Task[None]] = set()
        self._paused: set[TopicPartition] = set()
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
        await self._consumer.start()
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
        """Commit what is complete, then leave the group (aiokafka does not call revoke before stop)."""
        if self._consumer is None:
            return
        await self.commit()
        consumer, self._consumer = self._consumer, None
        await consumer.stop()

    # ---- capacity and pausing --------------------------------------------------------------------

    def _free_slots(self) -> int:
        return self._s.max_in_flight - self.tracker.tracked

    def _handler_full(self, handler: Handler) -> bool:
        return handler.busy() or (
            handler.max_concurrency is not None and self._running[handler.name] >= handler.max_concurrency
        )

    def _apply_pauses(self) -> None:
        """Pause exactly the partitions that cannot take work now; aiokafka forgets pauses on rebalance,
        so this also runs after every assignment."""
        consumer = self._consumer
        if consumer is None:
            return
        assigned = consumer.assignment()
        if self._full_since is not None and time.monotonic() - self._full_since >= self._s.pause_after_ms / 1000:
            want = set(assigned)
        else:
            want = {tp for tp in assigned if self._handler_full(self._routes[tp.topic].handler)}
        to_pause = want - self._paused
        to_resume = (self._paused - want) & assigned
        if to_pause:
            consumer.pause(*to_pause)
        if to_resume:
            consumer.resume(*to_resume)
        self._paused = want
        self._metrics.paused_partitions.set(len(want))

    # ---- the fetch loop --------------------------------------------------------------------------

    async def fetch_loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while self._fetching:
            free = self._free_slots()
            if free <= 0:
                # Full. A short wait (slots free as commits land) keeps aiokafka prefetching; when it lasts
                # past pause_after_ms the partitions are paused and polling goes on, so the member stays in
                # the group however long the work takes (Karafka's long-running-jobs pattern).
                if self._full_since is None:
                    self._full_since = time.monotonic()
                # Cleared before the await below: a commit that frees slots meanwhile must wake the wait.
                self._capacity_freed.clear()
                self._apply_pauses()
                if self._paused:
                    await consumer.getmany(timeout_ms=0)
                await wait_event(self._capacity_freed, self._s.poll_timeout_ms / 1000)
                continue
            self._full_since = None
            self._apply_pauses()
            batch = await consumer.getmany(timeout_ms=self._s.poll_timeout_ms, max_records=free)
            if not self._fetching:
                # Stopped while fetching: these records were never accepted, a later member reads them again.
                break
            for tp, records in batch.items():
                self._accept(consumer, tp, records)

    def _accept(self, consumer: AIOKafkaConsumer, tp: TopicPartition, records: list[Any]) -> None:
        route = self._routes[tp.topic]
        owned = self.tracker.has(tp)
        batch: list[tuple[Any, int]] | None = [] if route.handler.batch_mode else None
        accepted = 0
        for i, record in enumerate(records):
            if not owned or self._handler_full(route.handler) or self._free_slots() <= 0:
                # Not accepted: rewind so these records are fetched again once there is room.
                if tp in consumer.assignment():
                    consumer.seek(tp, record.offset)
                log.debug("rewound %s to %d (%d records not accepted)", tp, record.offset, len(records) - i)
                break
            epoch = self.tracker.start(tp, record.offset)
            accepted += 1
            self._running[route.handler.name] += 1
            if batch is not None:
                batch.append((record, epoch))
                continue
            task = self._spawn(self._process(record, route, epoch), f"handle {tp.topic}/{tp.partition}/{record.offset}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
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

    # ---- one message -----------------------------------------------------------------------------

    def _topic_metrics(self, topic: str, outcome: str) -> tuple[Any, Any]:
        """Labelled children, looked up once: `.labels()` costs more than the increment itself."""
        key = (topic, outcome)
        found = self._metric_children.get(key)
        if found is None:
            found = (self._metrics.handled.labels(topic, outcome), self._metrics.handle_seconds.labels(topic))
            self._metric_children[key] = found
        return found

    async def _process_batch(self, items: list[tuple[Any, int]], route: Route) -> None:
        """Batch mode, for handlers that do no I/O of their own (`Handler.batch_mode`): one task per fetched
        batch instead of one per message, and all outputs sent with one acknowledgement wait. Anything that
        fails takes the per-message path, with its retries, failure results and dead letters."""
        started = time.perf_counter()
        done: list[tuple[Any, int, str]] = []
        staged: list[tuple[Any, int, MessageContext, Sequence[OutputEvent]]] = []
        try:
            for record, epoch in items:
                ctx = _context(record)
                try:
                    event = decode(record.value, route.model, max_bytes=self._s.max_input_message_bytes)
                    outputs = await route.handler.handle(event, ctx)
                except FatalError:
                    raise
                except Exception:
                    with log_context(topic=ctx.topic, partition=ctx.partition, offset=ctx.offset):
                        done.append((record, epoch, await self._handle(record.value, route, ctx)))
                    continue
                staged.append((record, epoch, ctx, outputs))
            if staged:
                try:
                    await self._publisher.publish_batch([(outputs, ctx) for _, _, ctx, outputs in staged])
                    done.extend((record, epoch, "succeeded") for record, epoch, _, _ in staged)
                except PoisonError:
                    for record, epoch, ctx, _ in staged:
                        with log_context(topic=ctx.topic, partition=ctx.partition, offset=ctx.offset):
                            done.append((record, epoch, await self._handle(record.value, route, ctx)))
            elapsed = time.perf_counter() - started
            wanted = False
            outcomes: Counter[str] = Counter()
            tp = TopicPartition(items[0][0].topic, items[0][0].partition)  # one task per fetched partition
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
        finally:
            self._running[route.handler.name] -= len(items)
            self._capacity_freed.set()

    async def _process(self, record: Any, route: Route, epoch: int) -> None:
        tp = TopicPartition(record.topic, record.partition)
        ctx = _context(record)
        started = time.perf_counter()
        try:
            with log_context(topic=ctx.topic, partition=ctx.partition, offset=ctx.offset):
                outcome = await self._handle(record.value, route, ctx)
            self.counts[outcome] += 1
            handled, seconds = self._topic_metrics(ctx.topic, outcome)
            handled.inc()
            seconds.observe(time.perf_counter() - started)
            if outcome != "requeued" and self.tracker.complete(tp, record.offset, epoch):
                self._commit_wanted.set()
        finally:
            self._running[route.handler.name] -= 1
            self._capacity_freed.set()

    async def _handle(self, value: bytes | None, route: Route, ctx: MessageContext) -> str:
        """Run the handler with retries; return the outcome label. Raises only FatalError (or bugs)."""
        try:
            event = decode(value, route.model, max_bytes=self._s.max_input_message_bytes)
        except PoisonError as exc:
            log.warning("dead-lettering undecodable message", extra={"code": exc.code, "reason": exc.message})
            await self._publisher.dead_letter(ctx, value, ErrorInfo(code=exc.code, message=exc.message))
            return "dead_lettered"
        fields = event.__dict__  # not getattr: pydantic raises (expensively) for fields a model lacks
        bind(**{k: v for k in ("request_id", "document_id", "job_id") if isinstance(v := fields.get(k), str)})
        r = self._s.retry
        attempt = 0
        while True:
            attempt += 1
            try:
                outputs = await route.handler.handle(event, _with_attempt(ctx, attempt))
                await self._publisher.publish(outputs, ctx)
                return "succeeded"
            except FatalError:
                raise
            except RequeueError as exc:
                # Interrupted (shutdown): leave it uncommitted; the next owner of the partition resumes it.
                log.info("left uncommitted for redelivery", extra={"reason": str(exc)})
                return "requeued"
            except RetryableError as exc:
                if attempt >= r.max_attempts:
                    error = ErrorInfo(
                        code="retries_exhausted", message=f"gave up after {attempt} attempts: [{exc.code}] {exc}"
                    )
                    break
                self._metrics.handler_retries.labels(ctx.topic).inc()
                delay = backoff_s(attempt, initial_ms=r.initial_backoff_ms, max_ms=r.max_backoff_ms)
                log.info(
                    "retryable failure, backing off", extra={"attempt": attempt, "error": str(exc), "delay_s": delay}
                )
                await asyncio.sleep(delay)
            except PoisonError as exc:
                error = ErrorInfo(code=exc.code, message=exc.message)
                break
            except Exception as exc:  # a handler bug must not kill the loop: fail this message, keep going
                log.exception("handler raised")
                error = ErrorInfo(code="handler_error", message=f"{type(exc).__name__}: {exc}")
                break
        failure = route.handler.failure_outputs(event, ctx, error)
        if failure:
            try:
                await self._publisher.publish(failure, ctx)
                return "failed_result"
            except PoisonError as exc:
                error = ErrorInfo(code=exc.code, message=f"{error.message}; failure result rejected: {exc}")
        log.warning("dead-lettering failed message", extra={"code": error.code, "reason": error.message})
        await self._publisher.dead_letter(ctx, value, error)
        return "dead_lettered"

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
            freed = self.tracker.mark_committed(plan)
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

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.commit(only=revoked)
        self.tracker.revoke(revoked)
        self._paused -= revoked
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
        assert consumer is not None
        new = [tp for tp in assigned if tp not in self.tracker.partitions()]
        self.tracker.assign(new)
        for tp in new:
            try:
                committed = await consumer.committed(tp)
            except KafkaError:
                committed = None
            if committed is not None:
                self.tracker.mark_committed({tp: committed})
        self._paused = set()
        self._apply_pauses()
        self.assigned_once = True
        self._metrics.rebalances.inc()
        self._metrics.assigned_partitions.set(len(assigned))
        log.info("partitions assigned", extra={"partitions": sorted(f"{t.topic}/{t.partition}" for t in assigned)})

    # ---- state for health and idle detection -----------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def caught_up(self) -> bool:
        """Nothing in flight, nothing uncommitted, and every assigned partition read to its high watermark."""
        consumer = self._consumer
        if consumer is None or not self.assigned_once or self._tasks or self.tracker.tracked:
            return False
        for tp in consumer.assignment():
            hw = consumer.highwater(tp)
            if hw is None or hw > (self.tracker.committed(tp) or 0):
                return False
        return True


def _context(record: Any) -> MessageContext:
    return MessageContext(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=record.key,
        timestamp_ms=record.timestamp,
        headers=tuple((k, bytes(v)) for k, v in (record.headers or ())),
    )


def _with_attempt(ctx: MessageContext, attempt: int) -> MessageContext:
    if attempt == ctx.attempt:
        return ctx
    return MessageContext(ctx.topic, ctx.partition, ctx.offset, ctx.key, ctx.timestamp_ms, ctx.headers, attempt)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: Consumer) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._owner.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._owner.on_assigned(set(assigned))


class BroadcastConsumer:
    """Reads broadcast topics in full on every replica (no consumer group, from the beginning): commands
    such as cancel must reach whichever replica runs the job, and one sent before the job starts must be
    remembered. Nothing is committed; a restart reads the topic again, which handlers treat idempotently."""

    def __init__(self, settings: Settings, publisher: Publisher, routes: Mapping[str, Route]) -> None:
        self._s = settings
        self._publisher = publisher
        self._routes = dict(routes)
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            **self._s.kafka.client_options(), group_id=None, enable_auto_commit=False, auto_offset_reset="earliest"
        )
        await self._consumer.start()
        tps: list[TopicPartition] = []
        for topic in self._routes:
            partitions = self._consumer.partitions_for_topic(topic)
            deadline = time.monotonic() + 30
            while not partitions and time.monotonic() < deadline:
                await self._consumer.topics()
                partitions = self._consumer.partitions_for_topic(topic)
                if not partitions:
                    await asyncio.sleep(0.5)
            if not partitions:
                raise FatalError(f"broadcast topic {topic} does not exist")
            tps.extend(TopicPartition(topic, p) for p in sorted(partitions))
        self._consumer.assign(tps)
        for tp in tps:
            self._consumer.seek(tp, 0)

    async def loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while self._consumer is not None:
            batch = await consumer.getmany(timeout_ms=self._s.poll_timeout_ms * 5)
            for records in batch.values():
                for record in records:
                    await self._one(record)

    async def _one(self, record: Any) -> None:
        route = self._routes[record.topic]
        ctx = _context(record)
        with log_context(topic=ctx.topic, partition=ctx.partition, offset=ctx.offset):
            try:
                event = decode(record.value, route.model, max_bytes=self._s.max_input_message_bytes)
                await route.handler.on_broadcast(event, ctx)
            except PoisonError as exc:
                await self._publisher.dead_letter(ctx, record.value, ErrorInfo(code=exc.code, message=exc.message))
            except FatalError:
                raise
            except Exception as exc:  # one bad command must not stop the others
                log.exception("broadcast handler raised")
                await self._publisher.dead_letter(
                    ctx, record.value, ErrorInfo(code="handler_error", message=f"{type(exc).__name__}: {exc}")
                )

    async def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()
