"""Messages in flight: one task per accepted message, whatever its handler.

A message's task records it with the crash guard (before any handling, so a message that kills the process
is known to the next owner), runs it through the dispatcher (decode, validate, slot, handle, publish), and
marks its offset complete so that the commit loop can commit past it. A message the guard has judged a
crash loop is dead-lettered without being handled; a suspect is handled alone (`mode="isolated"`, its offset
recorded as isolated first). See `daemon/crashloop.py`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, Literal

from aiokafka import TopicPartition

from ocrbooth.config import Settings
from ocrbooth.daemon.backpressure import Backpressure
from ocrbooth.daemon.commits import Committer
from ocrbooth.daemon.crashloop import CrashGuard, Released
from ocrbooth.daemon.decode import message_context
from ocrbooth.daemon.dispatch import Dispatcher, Interrupted, Pending, Route
from ocrbooth.daemon.offsets import OffsetTracker
from ocrbooth.errors import FatalError, OcrboothError
from ocrbooth.logs import bind_source
from ocrbooth.messages import MessageContext
from ocrbooth.metrics import Metrics
from ocrbooth.retry import Backoff, retry
from ocrbooth.schemas import ErrorInfo

log = logging.getLogger(__name__)

Spawn = Callable[[Coroutine[Any, Any, None], str], asyncio.Task[None]]
Mode = Literal["normal", "isolated", "crash_loop"]
_Acked = tuple[TopicPartition, int, int, float, Pending]
"""An acknowledged message waiting for `_finish_acked`: partition, offset, epoch, start time, its Pending."""


class InFlight:
    """The accepted messages not yet finished, and how many of each outcome there were.

    A message is in flight from `start` to its outcome: in its task, then (most messages) only as an
    acknowledgement callback once its outputs are with the producer, so that the broker's "yes" finishes it
    without resuming the task (`Dispatcher.run_until_sent`)."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        dispatcher: Dispatcher,
        tracker: OffsetTracker[TopicPartition],
        budgets: Backpressure,
        committer: Committer,
        spawn: Spawn,
        guard: CrashGuard[TopicPartition] | None,
        on_fatal: Callable[[BaseException], None],
    ) -> None:
        self._s = settings
        self._metrics = metrics
        self._dispatcher = dispatcher
        self._tracker = tracker
        self._budgets = budgets
        self._committer = committer
        self._spawn = spawn
        self._on_fatal = on_fatal
        self.guard = guard
        self.tasks: set[asyncio.Task[None]] = set()
        """The messages' own tasks (a strong reference each: the loop keeps only weak ones)."""
        self._awaiting_acks = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.counts = {"succeeded": 0, "dead_lettered": 0, "failed_result": 0, "requeued": 0}
        self._metric_children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._acked: list[_Acked] = []
        """Messages acknowledged since the last `_finish_acked`, which is scheduled when the first arrives."""
        self._by_batch: dict[asyncio.Future[Any], list[_Acked]] = {}
        """Messages waiting for one produce batch's answer (all their outputs in it), by the batch's future."""
        metrics.in_flight.set_function(self.__len__)

    def __len__(self) -> int:
        """Messages started and not finished."""
        return len(self.tasks) + self._awaiting_acks

    def start(self, tp: TopicPartition, record: Any, route: Route, epoch: int, mode: Mode = "normal") -> None:
        """Handle `record` of `tp` (already started in the offset tracker with `epoch`) in a task of its own.

        Not through the daemon's `spawn`: a message's task catches everything itself (a FatalError goes to
        `on_fatal`), so it needs neither spawn's done-callback nor a name, which cost a loop callback and a string
        per message."""
        self._track(asyncio.get_running_loop().create_task(self._run(tp, record, route, epoch, mode, False)))

    def start_many(
        self, tp: TopicPartition, records: list[Any], route: Route, epoch: int, crash_loops: set[int]
    ) -> None:
        """`start` for one fetch's accepted records of `tp` (ascending, already started in the offset tracker with
        `epoch`): those whose offsets are in `crash_loops` are dead-lettered, the others handled. The crash guard
        is asked once for the whole run: a recorded window that covers its last offset covers every one."""
        guard = self.guard
        covered = guard is None or guard.covers(tp, records[-1].offset)
        create_task = asyncio.get_running_loop().create_task
        run = self._run
        tasks = self.tasks
        for record in records:
            mode: Mode = "crash_loop" if crash_loops and record.offset in crash_loops else "normal"
            tasks.add(create_task(run(tp, record, route, epoch, mode, covered)))
        self._idle.clear()

    async def drain(self, timeout_s: float) -> int:
        """Wait for in-flight work; cancel the tasks left at the deadline. Returns how many messages were left."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
            return 0
        except TimeoutError:
            pass
        left = len(self)
        pending = set(self.tasks)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        return left

    async def durably(self, op: Callable[[], Coroutine[Any, Any, None]], what: str) -> None:
        """Run an S3 write of the daemon's own state until it succeeds; an outage pauses work meanwhile, and
        shutdown interrupts the wait (Interrupted)."""
        dispatcher = self._dispatcher

        async def on_retry(exc: Exception, failures: int, delay: float) -> None:
            down = await dispatcher.s3.confirm(str(exc))
            log.warning("%s failed, retrying", what, extra={"error": str(exc), "attempt": failures, "s3_down": down})

        await retry(
            op,
            retry_on=OcrboothError,
            backoff=Backoff(self._s.retry.initial_backoff_ms, self._s.retry.max_backoff_ms),
            on_retry=on_retry,
            sleep=lambda delay: dispatcher.until_stopping(asyncio.sleep(delay)),
        )

    # ---- one message -----------------------------------------------------------------------------

    def _topic_metrics(self, topic: str, outcome: str) -> tuple[Any, Any]:
        """Labelled children, looked up once (`_finish` reads the cache itself first): `.labels()` costs more than
        the increment itself."""
        found = self._metric_children[(topic, outcome)] = (
            self._metrics.handled.labels(topic, outcome),
            self._metrics.handle_seconds.labels(topic),
        )
        return found

    def _track(self, task: asyncio.Task[None]) -> None:
        self.tasks.add(task)
        self._idle.clear()

    def _untrack(self, task: asyncio.Task[None] | None) -> None:
        if task is not None:
            self.tasks.discard(task)
        if not self.tasks and not self._awaiting_acks:
            self._idle.set()

    async def _run(self, tp: TopicPartition, record: Any, route: Route, epoch: int, mode: Mode, covered: bool) -> None:
        """One message, to its outputs being with the producer (or to its outcome). `covered`: the crash guard's
        recorded window is known to cover its offset."""
        ctx = message_context(record)
        bind_source(ctx)  # this task's own log context: its topic, partition and offset
        started = time.perf_counter()
        outcome = "requeued"
        try:
            guard = self.guard
            if mode != "normal":
                outcome = await self._alone_or_refused(tp, record, route, ctx, mode)
            elif covered or guard is None or guard.covers(tp, record.offset) or await self._recorded(tp, record.offset):
                result = await self._dispatcher.run_until_sent(record.value, route, ctx)
                if isinstance(result, str):
                    outcome = result
                else:
                    # Only the acknowledgement is left: its callback finishes the message.
                    self._awaiting_acks += 1
                    entry = (tp, record.offset, epoch, started, result)
                    futures = result.acks.futures
                    if len(futures) == 1:
                        # The usual case: all its outputs in one produce batch. The batch's future calls back once
                        # for all the messages waiting on it (a callback per message costs each a loop handle).
                        future = futures[0]
                        waiting = self._by_batch.get(future)
                        if waiting is None:
                            self._by_batch[future] = [entry]
                            future.add_done_callback(self._batch_done)
                        else:
                            waiting.append(entry)
                    else:
                        result.acks.when_done(functools.partial(self._acknowledged, entry))
                    outcome = ""
        except FatalError as exc:
            self._on_fatal(exc)
        except Exception:  # the dispatcher answers for every message failure; this is a bug of the runtime's own
            log.exception("a message's task failed; the message is left for redelivery")
        finally:
            self._untrack(asyncio.current_task())
            if outcome:
                self._finish(tp, record.offset, epoch, ctx.topic, started, outcome)

    def _acknowledged(self, entry: _Acked, _: object) -> None:
        """The broker answered for every output of a message. Answers arrive together (one produce response
        answers a whole batch of outputs): the message is queued, and the queue is finished in one pass at the next
        turn of the event loop (`_finish_acked`), its bookkeeping shared."""
        acked = self._acked
        acked.append(entry)
        if len(acked) == 1:
            asyncio.get_running_loop().call_soon(self._finish_acked)

    def _batch_done(self, future: asyncio.Future[Any]) -> None:
        """A produce batch was answered: queue every message whose outputs were all in it, as `_acknowledged`
        does one message."""
        acked = self._acked
        if not acked:
            asyncio.get_running_loop().call_soon(self._finish_acked)
        acked.extend(self._by_batch.pop(future))

    def _finish_acked(self) -> None:
        """Finish the queued acknowledged messages: each one's publish and handle latency, offset completion and
        outcome, as `_finish` does one by one; counts, counters and wake-ups once per topic or pass. A message whose
        output failed at the broker is settled in a task of its own (`_settle`)."""
        batch, self._acked = self._acked, []
        self._awaiting_acks -= len(batch)
        now = time.perf_counter()
        oks = self._dispatcher.acknowledged([entry[4] for entry in batch], now)
        latencies_of: dict[str, list[float]] = {}  # per topic, the handle latencies of its succeeded messages
        # Offsets to complete, in runs of one partition and epoch.
        runs: list[tuple[TopicPartition, int, list[int]]] = []
        topic = ""
        latencies: list[float] = []
        run: list[int] = []
        run_tp: TopicPartition | None = None
        run_epoch = -1
        for entry, ok in zip(batch, oks, strict=True):
            tp, offset, epoch, started, _ = entry
            if not ok:
                self._track(asyncio.get_running_loop().create_task(self._settle(*entry)))
                continue
            if tp.topic != topic:
                topic = tp.topic
                latencies = latencies_of.setdefault(topic, [])
            latencies.append(now - started)
            if tp is not run_tp or epoch != run_epoch:  # one batch's messages are mostly of one partition
                run = []
                runs.append((tp, epoch, run))
                run_tp, run_epoch = tp, epoch
            run.append(offset)
        complete_many = self._tracker.complete_many
        advanced = False
        for tp, epoch, offsets in runs:
            if complete_many(tp, offsets, epoch):
                advanced = True
        for topic, latencies in latencies_of.items():
            self.counts["succeeded"] += len(latencies)
            handled, seconds = self._metric_children.get((topic, "succeeded")) or self._topic_metrics(
                topic, "succeeded"
            )
            handled.inc(len(latencies))
            seconds.observe_each(latencies)
        if advanced:
            self._committer.wanted.set()
        self._budgets.freed.set()
        self._untrack(None)

    async def _settle(self, tp: TopicPartition, offset: int, epoch: int, started: float, pending: Pending) -> None:
        """An output failed at the broker: the dispatcher retries it or fails the message."""
        outcome = "requeued"
        try:
            outcome = await self._dispatcher.settle(pending)
        except FatalError as exc:
            self._on_fatal(exc)
        except Exception:
            log.exception("settling a message's outputs failed; the message is left for redelivery")
        finally:
            self._untrack(asyncio.current_task())
            self._finish(tp, offset, epoch, pending.ctx.topic, started, outcome)

    def _finish(self, tp: TopicPartition, offset: int, epoch: int, topic: str, started: float, outcome: str) -> None:
        self.counts[outcome] += 1
        children = self._metric_children.get((topic, outcome))
        handled, seconds = children if children is not None else self._topic_metrics(topic, outcome)
        handled.inc()
        seconds.observe(time.perf_counter() - started)
        if outcome != "requeued" and self._tracker.complete(tp, offset, epoch):
            self._committer.wanted.set()
        self._budgets.freed.set()

    async def _recorded(self, tp: TopicPartition, offset: int) -> bool:
        """Wait until the crash guard's record covers `offset`; False when shutdown interrupted the wait or the
        partition was handed over meanwhile (the message is left to the next owner)."""
        guard = self.guard
        assert guard is not None
        try:
            await self.durably(lambda: guard.record(tp, offset), "record in-flight offsets")
        except (Interrupted, Released):
            return False
        return True

    async def _alone_or_refused(
        self, tp: TopicPartition, record: Any, route: Route, ctx: MessageContext, mode: Mode
    ) -> str:
        """A message the crash guard judged: dead-lettered without handling (a crash loop), or handled with
        its offset recorded as isolated first (a suspect, alone in flight)."""
        guard = self.guard
        assert guard is not None
        if mode == "crash_loop":
            n = guard.deaths(tp, record.offset)
            self._metrics.crash_loops.labels(tp.topic).inc()
            error = ErrorInfo(
                code="crash_loop",
                message=f"the daemon died {n} times while handling this message; it is not handled again",
            )
            log.error("dead-lettering a message that keeps killing the daemon", extra={"deaths": n})
            return await self._dispatcher.dead_letter(ctx, record.value, error)
        if not await self._recorded(tp, record.offset):
            return "requeued"
        try:
            await self.durably(lambda: guard.isolate(tp, record.offset), "record the isolated offset")
        except Interrupted:
            return "requeued"
        outcome = await self._dispatcher.dispatch(record.value, route, ctx)
        try:
            await self.durably(lambda: guard.isolate(tp, None), "clear the isolated offset")
        except Interrupted:
            pass  # a stale isolated offset only costs one more lone run of a message that is done
        return outcome
