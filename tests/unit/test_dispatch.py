"""The per-message policy against a fake publisher: retries, outages, validation before slots, shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence

import pytest
from prometheus_client import CollectorRegistry

from ocrbooth.config import Settings
from ocrbooth.daemon.dispatch import Dispatcher, Route
from ocrbooth.daemon.outage import Dependencies
from ocrbooth.daemon.publisher import Acks
from ocrbooth.errors import FatalError, PoisonError, RetryableError
from ocrbooth.handlers.base import Handler
from ocrbooth.logs import bind_message, current_context
from ocrbooth.messages import MessageContext, OutputEvent
from ocrbooth.metrics import Metrics
from ocrbooth.schemas import DocumentRequest, ErrorInfo, OcrResult
from tests.support.daemon import request_event


class FakePublisher:
    """Records what would be published; `refuse` makes publish() reject outputs as the broker would."""

    def __init__(self) -> None:
        self.published: list[OutputEvent] = []
        self.letters: list[ErrorInfo] = []
        self.refuse = False

    async def publish(self, events: Sequence[OutputEvent], ctx: MessageContext) -> None:
        await self.append(events, ctx)

    async def append(self, events: Sequence[OutputEvent], ctx: MessageContext) -> Acks:
        if self.refuse:
            raise PoisonError("too large", code="output_too_large")
        self.published.extend(events)
        return Acks((), (), 0.0)  # acknowledged at once

    async def settle(self, acks: Acks) -> None:
        pass

    async def dead_letter(self, ctx: MessageContext, value: bytes | None, error: ErrorInfo) -> None:
        self.letters.append(error)


class ScriptedHandler(Handler[DocumentRequest]):
    """Raises the scripted errors in turn, then succeeds; `gate` holds handle() open until set."""

    name = "scripted"

    def __init__(
        self, settings: Settings, script: Sequence[Exception] = (), max_concurrency: int | None = None
    ) -> None:
        super().__init__(settings)
        self.script = list(script)
        self.calls = 0
        self.max_concurrency = max_concurrency
        self.gate: asyncio.Event | None = None
        self.on_failure: Callable[[], None] | None = None

    def input_topics(self) -> Mapping[str, type[DocumentRequest]]:
        return {"in": DocumentRequest}

    def validate(self, event: DocumentRequest) -> None:
        if event.metadata.get("bad"):
            raise PoisonError("refused by validation", code="invalid_options")

    async def handle(self, event: DocumentRequest, ctx: MessageContext) -> Sequence[OutputEvent]:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.script:
            if self.on_failure is not None:
                self.on_failure()
            raise self.script.pop(0)
        return [
            OutputEvent(
                "out",
                event.document_id,
                OcrResult(request_id=event.request_id, document_id=event.document_id, status="succeeded", engine="t"),
            )
        ]

    def failure_outputs(self, event: DocumentRequest, ctx: MessageContext, error: ErrorInfo) -> Sequence[OutputEvent]:
        return [OutputEvent("out", event.document_id, OcrResult.failure(event, error, "t"))]


CTX = MessageContext("in", 0, 1, b"k", None)


def _setup(
    script: Sequence[Exception] = (), *, s3_up: bool = True, budget_s: float = 600, max_concurrency: int | None = None
) -> tuple[Dispatcher, ScriptedHandler, FakePublisher, asyncio.Event, dict[str, bool]]:
    settings = Settings(
        retry={"max_attempts": 3, "initial_backoff_ms": 1, "max_backoff_ms": 2},  # type: ignore[arg-type]
        outage_budget_s=budget_s,
    )
    metrics = Metrics(CollectorRegistry())
    state = {"up": s3_up}

    async def probe() -> None:
        if not state["up"]:
            raise RetryableError("connection refused", code="storage_unavailable")

    deps = Dependencies(metrics.dependency_up)
    s3 = deps.add("s3", probe, initial_backoff_ms=1, max_backoff_ms=5)
    publisher = FakePublisher()
    stopping = asyncio.Event()
    dispatcher = Dispatcher(settings, metrics, publisher, s3, stopping)  # type: ignore[arg-type]
    return dispatcher, ScriptedHandler(settings, script, max_concurrency), publisher, stopping, state


def _storage_down() -> RetryableError:
    return RetryableError("S3 get failed: 503", code="storage_unavailable")


async def test_transient_failures_are_retried_then_exhausted() -> None:
    """A retryable failure with S3 answering spends attempts; max_attempts of them give retries_exhausted, and
    each retry in between is counted in ocrbooth_handler_retries_total."""
    dispatcher, handler, publisher, _, _ = _setup([_storage_down()] * 5)
    outcome = await dispatcher.dispatch(request_event(1), Route(handler, DocumentRequest), CTX)
    assert outcome == "failed_result"
    assert handler.calls == 3
    assert publisher.published[0].value.error.code == "retries_exhausted"  # type: ignore[attr-defined]
    registry = dispatcher._metrics.registry
    assert registry.get_sample_value("ocrbooth_handler_retries_total", {"topic": CTX.topic}) == 2


async def test_an_s3_outage_is_waited_out_without_spending_attempts() -> None:
    """Five failures each during an S3 outage (max_attempts is 3): the message waits each one out and succeeds
    once S3 answers; the dependency reads down meanwhile and up afterwards."""
    dispatcher, handler, publisher, _, state = _setup([_storage_down()] * 5)
    downs = 0

    def s3_goes_down() -> None:
        nonlocal downs
        downs += 1
        state["up"] = False

    async def s3_comes_back() -> None:
        while True:
            await asyncio.sleep(0.02)
            state["up"] = True

    handler.on_failure = s3_goes_down
    helpers = [asyncio.create_task(dispatcher.s3.watch()), asyncio.create_task(s3_comes_back())]
    outcome = await asyncio.wait_for(dispatcher.dispatch(request_event(1), Route(handler, DocumentRequest), CTX), 5)
    for task in helpers:
        task.cancel()
    assert outcome == "succeeded"
    assert downs == 5
    assert handler.calls == 6
    assert not dispatcher.s3.down
    assert publisher.published[0].value.status == "succeeded"  # type: ignore[attr-defined]


async def test_work_waits_while_s3_is_down() -> None:
    """During an outage the message does not retry: it waits until the probe sees S3 again."""
    dispatcher, handler, _, _, state = _setup([_storage_down()], s3_up=False)
    watch = asyncio.create_task(dispatcher.s3.watch())
    task = asyncio.create_task(dispatcher.dispatch(request_event(1), Route(handler, DocumentRequest), CTX))
    await asyncio.sleep(0.2)
    assert dispatcher.s3.down
    assert not task.done()
    assert handler.calls == 1
    state["up"] = True
    assert await asyncio.wait_for(task, 5) == "succeeded"
    watch.cancel()


async def test_an_outage_longer_than_the_budget_fails_the_message() -> None:
    """Past outage_budget_s the message fails with retries_exhausted naming the budget."""
    dispatcher, handler, publisher, _, _ = _setup([_storage_down()] * 1000, s3_up=False, budget_s=0.2)
    watch = asyncio.create_task(dispatcher.s3.watch())
    outcome = await asyncio.wait_for(dispatcher.dispatch(request_event(1), Route(handler, DocumentRequest), CTX), 5)
    watch.cancel()
    assert outcome == "failed_result"
    error = publisher.published[0].value.error  # type: ignore[attr-defined]
    assert error.code == "retries_exhausted"
    assert "outage budget" in error.message


async def test_invalid_requests_do_not_wait_for_a_busy_slot() -> None:
    """With the only handler slot taken, invalid and undecodable requests are answered at once."""
    dispatcher, handler, publisher, _, _ = _setup(max_concurrency=1)
    handler.gate = asyncio.Event()
    route = Route(handler, DocumentRequest)
    running = asyncio.create_task(dispatcher.dispatch(request_event(1), route, CTX))
    await asyncio.sleep(0.01)
    bad = request_event(2, bad="1")
    outcomes = await asyncio.wait_for(
        asyncio.gather(
            *(dispatcher.dispatch(bad, route, CTX) for _ in range(20)), dispatcher.dispatch(b"{", route, CTX)
        ),
        2,
    )
    assert outcomes == ["failed_result"] * 20 + ["dead_lettered"]
    assert [e.code for e in publisher.letters] == ["invalid_json"]
    assert not running.done()
    handler.gate.set()
    assert await running == "succeeded"


async def test_shutdown_interrupts_a_wait_for_a_slot_and_requeues() -> None:
    """A valid request waiting for a slot when shutdown begins is left uncommitted (requeued), at once."""
    dispatcher, handler, _, stopping, _ = _setup(max_concurrency=1)
    handler.gate = asyncio.Event()
    route = Route(handler, DocumentRequest)
    running = asyncio.create_task(dispatcher.dispatch(request_event(1), route, CTX))
    waiting = asyncio.create_task(dispatcher.dispatch(request_event(2), route, CTX))
    await asyncio.sleep(0.01)
    stopping.set()
    assert await asyncio.wait_for(waiting, 1) == "requeued"
    handler.gate.set()
    assert await running == "succeeded"
    assert handler.calls == 1


async def test_refused_failure_result_falls_back_to_a_dead_letter() -> None:
    """A poison failure whose failed result the broker refuses ends in a dead letter carrying both reasons."""
    dispatcher, handler, publisher, _, _ = _setup([PoisonError("bad page", code="corrupt_document")])
    publisher.refuse = True
    outcome = await dispatcher.dispatch(request_event(1), Route(handler, DocumentRequest), CTX)
    assert outcome == "dead_lettered"
    assert publisher.letters[0].code == "corrupt_document"
    assert "failure result rejected" in publisher.letters[0].message


async def test_handler_bugs_fail_the_message_and_fatal_errors_propagate() -> None:
    """An unexpected exception is the message's failure (handler_error); a FatalError leaves the dispatcher."""
    dispatcher, handler, publisher, _, _ = _setup([KeyError("oops")])
    assert await dispatcher.dispatch(request_event(1), Route(handler, DocumentRequest), CTX) == "failed_result"
    assert publisher.published[0].value.error.code == "handler_error"  # type: ignore[attr-defined]
    dispatcher, handler, _, _, _ = _setup([FatalError("GPU fell off the bus")])
    with pytest.raises(FatalError):
        await dispatcher.dispatch(request_event(1), Route(handler, DocumentRequest), CTX)


async def test_a_message_s_ids_join_its_log_context_once_decoded() -> None:
    """The handler (and every log line after decoding) sees the message's request and document ids in the log
    context, next to the coordinates the runtime bound."""
    dispatcher, handler, _, _, _ = _setup()
    seen: list[dict[str, object]] = []
    handle = handler.handle

    async def recording(event: DocumentRequest, ctx: MessageContext) -> Sequence[OutputEvent]:
        seen.append(current_context())
        return await handle(event, ctx)

    handler.handle = recording  # type: ignore[method-assign]

    async def one_message() -> str | object:
        bind_message(topic="in", partition=0, offset=1)
        return await dispatcher.run_until_sent(request_event(7), Route(handler, DocumentRequest), CTX)

    assert await asyncio.create_task(one_message()) == "succeeded"
    assert seen == [{"topic": "in", "partition": 0, "offset": 1, "request_id": "req-7", "document_id": "doc-7"}]
