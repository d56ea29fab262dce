"""The per-message policy: decode → validate → wait for a handler slot → handle with retries → publish; on
failure a failed result, else a dead letter. Every path ends in an outcome label; only FatalError (GPU or
driver broken) and cancellation leave this module as exceptions.

Retries: a RetryableError spends one of `retry.max_attempts`, except during an outage of S3 (the failure's
code is `storage_unavailable` and a probe confirms S3 is unreachable): then the message waits for S3 to
answer again, up to `outage_budget_s` from its first outage failure, without spending attempts. Shutdown
interrupts every wait and leaves the message uncommitted for redelivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from pydantic import BaseModel

from ocrbooth.config import Settings
from ocrbooth.daemon.decode import decode
from ocrbooth.daemon.outage import Dependency
from ocrbooth.daemon.publisher import Acks, Publisher
from ocrbooth.errors import FatalError, PoisonError, RequeueError, RetryableError
from ocrbooth.handlers.base import AnyHandler
from ocrbooth.logs import bind_message_of
from ocrbooth.messages import MessageContext, OutputEvent, clip
from ocrbooth.metrics import Metrics
from ocrbooth.retry import Backoff
from ocrbooth.schemas import ErrorInfo

log = logging.getLogger(__name__)

# RetryableError codes that mean "S3 did not answer", as opposed to one request being slow.
OUTAGE_CODES = frozenset({"storage_unavailable"})
_MAX_ERROR_CHARS = 2_000
_ID_FIELDS = ("request_id", "document_id", "job_id")  # the ids of an event that its log lines carry


@dataclass(frozen=True, slots=True)
class Route:
    """Which handler reads a topic, and the model its values decode to."""

    handler: AnyHandler
    model: type[BaseModel]


class Pending(NamedTuple):
    """A message whose outputs are with the producer: only the broker's acknowledgement is left (a named
    tuple: one is made per message, and a frozen dataclass costs more to build)."""

    acks: Acks
    value: bytes | None
    handler: AnyHandler
    event: BaseModel
    ctx: MessageContext


class Interrupted(Exception):
    """Shutdown began while the message waited (for a slot or for S3): leave it for redelivery."""


class Dispatcher:
    """Runs one message through its handler and publishes whatever comes of it."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        publisher: Publisher,
        s3: Dependency,
        stopping: asyncio.Event,
    ) -> None:
        self._s = settings
        self._metrics = metrics
        self._publisher = publisher
        self.s3 = s3
        self._stopping = stopping
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._id_fields: dict[type[BaseModel], tuple[str, ...]] = {}
        """Per event model, which of _ID_FIELDS it has (looked up once, not per message)."""

    def slot(self, handler: AnyHandler) -> asyncio.Semaphore | None:
        if handler.max_concurrency is None:
            return None
        sem = self._slots.get(handler.name)
        if sem is None:
            sem = self._slots[handler.name] = asyncio.Semaphore(handler.max_concurrency)
        return sem

    async def dispatch(self, value: bytes | None, route: Route, ctx: MessageContext) -> str:
        """Handle one message to its end; return its outcome (succeeded, failed_result, dead_lettered, requeued).
        A bug anywhere below still ends in a dead letter, never in silence."""
        result = await self.run_until_sent(value, route, ctx)
        return result if isinstance(result, str) else await self.settle(result)

    async def run_until_sent(self, value: bytes | None, route: Route, ctx: MessageContext) -> str | Pending:
        """`dispatch` up to the handler's outputs being handed to the producer: the outcome, or a Pending whose
        acknowledgement is all that is left (`settle` finishes it, or `Publisher.acknowledged` from a callback:
        the runtime does not resume a task just to learn that the broker said yes).

        Decode, validate, take a slot, handle with retries, in one coroutine (each level of coroutines costs
        every message a call and a resumption). The message's ids join the log context of the calling task for
        the rest of it: the runtime gives every message a task of its own (`daemon/inflight.py`)."""
        try:
            try:
                event = decode(value, route.model, max_bytes=self._s.max_input_message_bytes)
            except PoisonError as exc:
                log.warning("dead-lettering undecodable message", extra={"code": exc.code, "reason": exc.message})
                await self._publisher.dead_letter(ctx, value, ErrorInfo(code=exc.code, message=exc.message))
                return "dead_lettered"
            id_fields = self._id_fields.get(route.model)
            if id_fields is None:
                id_fields = self._id_fields[route.model] = tuple(k for k in _ID_FIELDS if k in route.model.model_fields)
            if id_fields:
                ids: dict[str, str] = {}
                for key in id_fields:
                    # Only fields the model declares (pydantic raises, expensively, for the others); getattr rather
                    # than the instance's __dict__, so an event type with slots works too (bench/msgspec_wire.py).
                    field = getattr(event, key, None)
                    if isinstance(field, str):
                        ids[key] = field
                if ids:
                    bind_message_of(ctx, ids)
            handler = route.handler
            try:
                handler.validate(event)
            except PoisonError as exc:
                return await self._fail(value, handler, event, ctx, ErrorInfo(code=exc.code, message=exc.message))
            except Exception as exc:  # a bug in a check fails this message, not the daemon
                log.exception("handler validation raised")
                return await self._fail(value, handler, event, ctx, _handler_error(exc))
            try:
                if handler.max_concurrency is None:
                    # The first attempt here, without `_run`'s coroutine (almost every message succeeds at once);
                    # a failure continues in `_run` as that attempt's.
                    result: Acks | ErrorInfo
                    try:
                        result = await self._publisher.append(await handler.handle(event, ctx), ctx)
                    except (FatalError, RequeueError):
                        raise
                    except Exception as exc:
                        result = await self._run(handler, event, ctx, first_failure=exc)
                else:
                    slot = self.slot(handler)
                    assert slot is not None
                    await self._acquire(slot)
                    try:
                        result = await self._run(handler, event, ctx)
                    finally:
                        slot.release()
            except (Interrupted, RequeueError) as exc:
                # Interrupted by shutdown: leave it uncommitted; the next owner of the partition handles it again.
                log.info("left uncommitted for redelivery", extra={"reason": str(exc)})
                return "requeued"
            if isinstance(result, Acks):
                return "succeeded" if result.settled else Pending(result, value, handler, event, ctx)
            return await self._fail(value, handler, event, ctx, result)
        except (FatalError, asyncio.CancelledError):
            raise
        except Exception as exc:
            return await self._internal_error(ctx, value, exc)

    def acknowledged(self, batch: Sequence[Pending], now: float) -> list[bool]:
        """For Pendings acknowledged together (by `now`, a perf_counter reading): per Pending, True (counted) when
        every output went through, else False (`settle` it)."""
        return self._publisher.acknowledged([pending.acks for pending in batch], now)

    async def settle(self, pending: Pending) -> str:
        """Wait for a Pending's acknowledgement (the publisher retries broker trouble); its outcome. Outputs the
        broker refuses for good fail the message as a refusal at `append` would."""
        try:
            try:
                await self._publisher.settle(pending.acks)
            except PoisonError as exc:
                error = ErrorInfo(code=exc.code, message=_short(exc.message))
                return await self._fail(pending.value, pending.handler, pending.event, pending.ctx, error)
            return "succeeded"
        except (FatalError, asyncio.CancelledError):
            raise
        except Exception as exc:
            return await self._internal_error(pending.ctx, pending.value, exc)

    async def _internal_error(self, ctx: MessageContext, value: bytes | None, exc: Exception) -> str:
        log.exception("dispatching a message failed")
        error = ErrorInfo(code="internal_error", message=f"{type(exc).__name__}: {exc}")  # the publisher clips it
        return await self.dead_letter(ctx, value, error)

    async def _run(
        self, handler: AnyHandler, event: BaseModel, ctx: MessageContext, first_failure: Exception | None = None
    ) -> Acks | ErrorInfo:
        """Handle and hand the outputs to the producer, with retries; their acknowledgements, else why the message
        failed. The handler's slot is free again once the outputs are sent, before the broker acknowledges.
        `first_failure`: the first attempt was made by the caller and raised this."""
        r = self._s.retry
        backoff: Backoff | None = None  # made at the first failure: almost every message succeeds at once
        outage_started: float | None = None
        failed = first_failure
        while True:
            # An outage spends no attempts: it does not count a failure.
            attempt = 1 if backoff is None else backoff.failures + 1
            try:
                if failed is not None:
                    exc, failed = failed, None
                    raise exc
                outputs = await handler.handle(event, _with_attempt(ctx, attempt))
                return await self._publisher.append(outputs, ctx)
            except (FatalError, RequeueError):
                raise
            except RetryableError as exc:
                if exc.code in OUTAGE_CODES and await self.s3.confirm(str(exc)):
                    now = time.monotonic()
                    outage_started = outage_started or now
                    left = self._s.outage_budget_s - (now - outage_started)
                    if left > 0:
                        self._metrics.handler_retries.labels(ctx.topic).inc()
                        log.info("S3 is unreachable; waiting for it", extra={"error": str(exc), "budget_s": left})
                        await self.until_stopping(_wait_until(self.s3.recovered, left))
                        continue
                    return ErrorInfo(
                        code="retries_exhausted",
                        message=_short(
                            f"S3 stayed unreachable past the {self._s.outage_budget_s:g} s outage budget: {exc}"
                        ),
                    )
                if attempt >= r.max_attempts:
                    return ErrorInfo(
                        code="retries_exhausted",
                        message=_short(f"gave up after {attempt} attempts: [{exc.code}] {exc}"),
                    )
                self._metrics.handler_retries.labels(ctx.topic).inc()
                if backoff is None:
                    backoff = Backoff(r.initial_backoff_ms, r.max_backoff_ms)
                delay = backoff.next_s()
                log.info(
                    "retryable failure, backing off", extra={"attempt": attempt, "error": str(exc), "delay_s": delay}
                )
                await self.until_stopping(asyncio.sleep(delay))
            except PoisonError as exc:
                return ErrorInfo(code=exc.code, message=_short(exc.message))
            except Exception as exc:  # a handler bug must not kill the loop: fail this message, keep going
                log.exception("handler raised")
                return _handler_error(exc)

    async def _fail(
        self, value: bytes | None, handler: AnyHandler, event: BaseModel, ctx: MessageContext, error: ErrorInfo
    ) -> str:
        """Publish the handler's failed result, or dead-letter the message when there is none or it is refused."""
        try:
            failure: Sequence[OutputEvent] = handler.failure_outputs(event, ctx, error)
        except Exception:  # a broken failure builder still leaves a dead letter
            log.exception("failure_outputs raised")
            failure = ()
        if failure:
            try:
                await self._publisher.publish(failure, ctx)
                return "failed_result"
            except PoisonError as exc:
                error = ErrorInfo(code=error.code, message=_short(f"{error.message}; failure result rejected: {exc}"))
        log.warning("dead-lettering failed message", extra={"code": error.code, "reason": error.message})
        await self._publisher.dead_letter(ctx, value, error)
        return "dead_lettered"

    async def dead_letter(self, ctx: MessageContext, value: bytes | None, error: ErrorInfo) -> str:
        await self._publisher.dead_letter(ctx, value, error)
        return "dead_lettered"

    async def until_stopping(self, aw: Awaitable[object]) -> None:
        """Await `aw` unless shutdown begins first (then Interrupted)."""
        task = asyncio.ensure_future(aw)
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if task.cancelled() or not task.done():
            raise Interrupted("shutdown began")
        task.result()

    async def _acquire(self, slot: asyncio.Semaphore) -> None:
        """Take a handler slot, or raise Interrupted (holding nothing) when shutdown begins first."""
        try:
            await self.until_stopping(slot.acquire())
        except Interrupted:
            raise
        if self._stopping.is_set():
            slot.release()
            raise Interrupted("shutdown began")


async def _wait_until(event: asyncio.Event, timeout_s: float) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        pass


def _handler_error(exc: Exception) -> ErrorInfo:
    return ErrorInfo(code="handler_error", message=_short(f"{type(exc).__name__}: {exc}"))


def _short(text: str) -> str:
    return clip(text, _MAX_ERROR_CHARS)


def _with_attempt(ctx: MessageContext, attempt: int) -> MessageContext:
    if attempt == ctx.attempt:
        return ctx
    return MessageContext(ctx.topic, ctx.partition, ctx.offset, ctx.key, ctx.timestamp_ms, ctx.headers, attempt)
