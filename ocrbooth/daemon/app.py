"""The Daemon: startup() -> main_loop() -> shutdown(), the only place that creates asyncio tasks."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from aiokafka import TopicPartition
from prometheus_client import CollectorRegistry

from ocrbooth.config import Settings
from ocrbooth.daemon.broadcast import BroadcastConsumer
from ocrbooth.daemon.consumer import Consumer
from ocrbooth.daemon.crashloop import CrashGuard
from ocrbooth.daemon.dispatch import Dispatcher, Route
from ocrbooth.daemon.gctune import tune_gc
from ocrbooth.daemon.health import HealthServer
from ocrbooth.daemon.offsets import OffsetTracker
from ocrbooth.daemon.outage import Dependencies
from ocrbooth.daemon.publisher import Publisher
from ocrbooth.daemon.shutdown import Lifecycle, State, wait_event
from ocrbooth.errors import FatalError, OcrboothError
from ocrbooth.handlers import load_handlers
from ocrbooth.handlers.base import AnyHandler, HandlerRuntime
from ocrbooth.metrics import Metrics
from ocrbooth.storage import S3Storage

log = logging.getLogger(__name__)

# /healthz fails when the event loop has not ticked for this long (something blocks it).
_LOOP_STALL_S = 10.0
_TICK_S = 1.0
_LOOP_RESTART_S = 1.0  # pause before a loop that failed unexpectedly is started again


class Daemon:
    """One consumer-group member running the configured handlers."""

    def __init__(
        self,
        settings: Settings,
        *,
        handlers: Sequence[AnyHandler] | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = Metrics(registry)
        self.lifecycle = Lifecycle()
        self.handlers = list(handlers) if handlers is not None else load_handlers(settings.handlers, settings)
        self.storage = S3Storage(settings.s3)
        self.dependencies = Dependencies(self.metrics.dependency_up)
        self.s3 = self.dependencies.add("s3", self.storage.check)
        self.broker = self.dependencies.add("kafka", None)
        self.publisher = Publisher(settings, self.metrics, self.storage, self.broker)
        routes = {
            topic: Route(handler, model) for handler in self.handlers for topic, model in handler.input_topics().items()
        }
        self.stopping = asyncio.Event()
        self.dispatcher = Dispatcher(settings, self.metrics, self.publisher, self.s3, self.stopping)
        tracker: OffsetTracker[TopicPartition] = OffsetTracker()
        guard = None
        if settings.max_process_deaths > 0:
            guard = CrashGuard(
                self.storage,
                settings.group_id,
                settings.max_process_deaths,
                tracker.pending_offsets,
                lambda tp: (tp.topic, tp.partition),
                ahead=settings.max_in_flight,
            )
        self.consumer = Consumer(
            settings, self.metrics, routes, self.spawn, self.dispatcher, self.dependencies, tracker, guard, self.fatal
        )
        broadcast = {
            topic: Route(handler, model)
            for handler in self.handlers
            for topic, model in handler.broadcast_topics().items()
        }
        self.broadcast = BroadcastConsumer(settings, self.publisher, broadcast) if broadcast else None
        t = settings.topics
        outputs = {t.ocr_results, t.ocr_review, t.finetune_events, t.dlq}
        self.metrics.init_topics(routes, sorted(outputs))
        self.health = HealthServer(
            settings.metrics_host, settings.metrics_port, self.metrics.registry, self._live, self._ready
        )
        self.exit_code = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._loop_factories: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {}
        self._last_tick = time.monotonic()
        self._started_at = time.monotonic()
        self._shutdown_steps: list[tuple[str, Any]] = []

    # ---- tasks -----------------------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Create a task that is tracked here and whose failure is never silent."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def spawn_loop(self, factory: Callable[[], Coroutine[Any, Any, None]], name: str) -> None:
        """A loop that runs for the daemon's life; restarted (after a pause) if it fails unexpectedly."""
        self._loop_factories[name] = factory
        self._loops.append(self.spawn(factory(), name))

    def _task_done(self, task: asyncio.Task[None]) -> None:
        """Only a FatalError (GPU or driver broken) stops the daemon. Any other failure is logged; a loop that
        died is started again, a message's task has already answered for its message."""
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, FatalError):
            self.fatal(exc)
            return
        name = task.get_name()
        if task in self._loops:
            self._loops.remove(task)
            if self.lifecycle.state is not State.RUNNING:
                return
            log.error("%s ended unexpectedly; restarting it", name, exc_info=exc)
            self.metrics.loop_restarts.labels(name).inc()
            asyncio.get_running_loop().call_later(_LOOP_RESTART_S, self._restart_loop, name)
        elif exc is not None:
            log.error("task %s failed", name, exc_info=exc)

    def _restart_loop(self, name: str) -> None:
        if self.lifecycle.state is State.RUNNING and name in self._loop_factories:
            self._loops.append(self.spawn(self._loop_factories[name](), name))

    def fatal(self, exc: BaseException) -> None:
        """Something is broken beyond one message: drain and exit non-zero so the pod is restarted."""
        if self.exit_code == 0:
            log.error("fatal: %s", exc, exc_info=exc)
            self.exit_code = self.settings.fatal_exit_code
        self.lifecycle.request_stop(f"fatal error: {exc}")

    # ---- probes ----------------------------------------------------------------------------------

    def _live(self) -> tuple[bool, str]:
        stalled = time.monotonic() - self._last_tick
        if stalled > _LOOP_STALL_S:
            return False, f"event loop stalled for {stalled:.1f}s"
        if self.exit_code:
            return False, "fatal error"
        return True, f"ok ({self.lifecycle.state.value})"

    def _ready(self) -> tuple[bool, str]:
        if self.lifecycle.state is not State.RUNNING:
            return False, self.lifecycle.state.value
        if not self.consumer.assigned_once:
            return False, "waiting for a partition assignment"
        down = self.dependencies.down()
        if down:
            return False, "degraded: " + ", ".join(f"{d.name} unreachable ({d.last_error[:200]})" for d in down)
        not_ready = [h.name for h in self.handlers if not h.ready()]
        if not_ready:
            return False, "handlers not ready: " + ", ".join(not_ready)
        return True, "ready"

    async def _ticker(self) -> None:
        while True:
            self._last_tick = time.monotonic()
            self.metrics.ready.set(1 if self._ready()[0] else 0)
            await asyncio.sleep(_TICK_S)

    # ---- life ------------------------------------------------------------------------------------

    async def startup(self) -> None:
        """Start in dependency order; shutdown() undoes the steps that completed, in reverse."""
        log.info("starting ocrbooth", extra={"settings": self.settings.redacted()})
        self.lifecycle.state = State.STARTING
        await self.health.start()
        self._shutdown_steps.append(("health server", self.health.stop))
        self.spawn_loop(self._ticker, "ticker")
        for dep in self.dependencies.by_name.values():
            self.spawn_loop(dep.watch, f"{dep.name} watch")
        runtime = HandlerRuntime(self.settings, self.storage, self.metrics, self.publisher.publish)
        for handler in self.handlers:
            await handler.start(runtime)
            self._shutdown_steps.append((f"handler {handler.name}", handler.stop))
        await self.publisher.start()
        self._shutdown_steps.append(("publisher", self.publisher.stop))
        if self.broadcast is not None:
            await self.broadcast.start()
            self._shutdown_steps.append(("broadcast consumer", self.broadcast.close))
        await self.consumer.start()
        self._shutdown_steps.append(("consumer", self.consumer.close))
        tune_gc(gen0_threshold=self.settings.gc_gen0_threshold, freeze=self.settings.gc_freeze)
        self.lifecycle.state = State.RUNNING
        self.spawn_loop(self.consumer.fetch_loop, "fetch loop")
        self.spawn_loop(self.consumer.commit_loop, "commit loop")
        if self.broadcast is not None:
            self.spawn_loop(self.broadcast.loop, "broadcast loop")
        log.info(
            "ocrbooth running",
            extra={"handlers": [h.name for h in self.handlers], "group_id": self.settings.group_id},
        )

    async def main_loop(self, *, until_idle: bool = False, idle_grace_s: float = 2.0) -> None:
        """Run until a stop is requested (signal, fatal error) or, with until_idle, the inputs are drained."""
        if not until_idle:
            await self.lifecycle.stop_requested.wait()
            return
        idle_since: float | None = None
        while not self.lifecycle.stop_requested.is_set():
            if self.consumer.caught_up():
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since >= idle_grace_s:
                    self.lifecycle.request_stop("input topics drained")
                    break
            else:
                idle_since = None
            await wait_event(self.lifecycle.stop_requested, 0.2)

    async def shutdown(self) -> None:
        """Stop fetching, drain within drain_timeout_s, commit, then undo startup in reverse order."""
        self.lifecycle.state = State.DRAINING
        self.stopping.set()
        self.consumer.stop_fetching()
        for handler in self.handlers:
            try:
                await handler.drain()
            except Exception as exc:  # a handler that fails to wind down still gets the drain deadline
                log.warning("handler %s failed to start draining: %r", handler.name, exc)
        cancelled = await self.consumer.drain(self.settings.drain_timeout_s)
        if cancelled:
            log.warning("drain deadline passed; %d messages left uncommitted for redelivery", cancelled)
        for task in self._loops:
            if task is not None and not task.done():
                task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        for name, step in reversed(self._shutdown_steps):
            try:
                await step()
            except (OcrboothError, OSError, RuntimeError) as exc:
                log.warning("shutdown step %s failed: %r", name, exc)
            except Exception as exc:  # keep undoing the remaining steps whatever this one raised
                log.warning("shutdown step %s failed: %r", name, exc)
        self._shutdown_steps.clear()
        self.lifecycle.state = State.STOPPED
        c = self.consumer.counts
        log.info(
            "ocrbooth stopped",
            extra={
                "reason": self.lifecycle.reason,
                "succeeded": c["succeeded"],
                "failed_results": c["failed_result"],
                "dead_lettered": c["dead_lettered"],
                "cancelled_at_drain": cancelled,
                "uptime_s": round(time.monotonic() - self._started_at, 1),
                "exit_code": self.exit_code,
            },
        )

    async def run(self, *, until_idle: bool = False, install_signals: bool = True) -> int:
        """startup, main loop, shutdown; returns the process exit code."""
        if install_signals:
            self.lifecycle.install_signal_handlers()
        try:
            try:
                await self.startup()
            except Exception as exc:
                log.error("startup failed: %s", exc)
                self.exit_code = self.exit_code or 1
                self.lifecycle.request_stop(f"startup failed: {exc}")
            else:
                await self.main_loop(until_idle=until_idle)
            await self.shutdown()
        finally:
            if install_signals:
                self.lifecycle.remove_signal_handlers()
        return self.exit_code

    async def run_until_idle(self) -> int:
        """Burst mode (arq's burst=True): process what is there and exit."""
        return await self.run(until_idle=True, install_signals=False)
