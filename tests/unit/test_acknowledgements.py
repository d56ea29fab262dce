"""A message whose outputs are with the producer is finished by the broker's acknowledgement, not by its task:
the real Publisher and InFlight over a scripted producer (no broker)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError
from aiokafka.partitioner import DefaultPartitioner
from prometheus_client import CollectorRegistry

from ocrbooth.config import Settings
from ocrbooth.daemon.backpressure import Backpressure
from ocrbooth.daemon.commits import Committer
from ocrbooth.daemon.crashloop import CrashGuard
from ocrbooth.daemon.dispatch import Dispatcher, Route
from ocrbooth.daemon.inflight import InFlight
from ocrbooth.daemon.offsets import OffsetTracker
from ocrbooth.daemon.outage import Dependencies
from ocrbooth.daemon.produce_batches import ProduceBatches
from ocrbooth.daemon.publisher import Publisher
from ocrbooth.errors import FatalError
from ocrbooth.handlers.echo import EchoHandler
from ocrbooth.messages import MessageContext
from ocrbooth.metrics import Metrics
from ocrbooth.schemas import DocumentRequest
from tests.support.daemon import request_event
from tests.support.runtime import HeldStore, Record, ScriptedProducer


class Runtime:
    def __init__(
        self,
        guard_store: HeldStore | None = None,
        ahead: int = 4,
        partitions: int = 1,
        batch_records: int | None = None,
    ) -> None:
        self.settings = settings = Settings(
            retry={"max_attempts": 3, "initial_backoff_ms": 1, "max_backoff_ms": 2},  # type: ignore[arg-type]
        )
        self.metrics = metrics = Metrics(CollectorRegistry())
        self.producer = ScriptedProducer(partitions, batch_records)
        self.publisher = Publisher(settings, metrics, storage=None)  # type: ignore[arg-type]
        self.publisher._producer = self.producer  # type: ignore[assignment]
        self.publisher._batches = ProduceBatches(self.producer)
        deps = Dependencies(metrics.dependency_up)
        dispatcher = Dispatcher(settings, metrics, self.publisher, deps.add("s3", None), asyncio.Event())
        handler = EchoHandler(settings)
        self.topic = settings.topics.ocr_requests
        self.route = Route(handler, DocumentRequest)
        routes = {self.topic: self.route}
        self.tracker: OffsetTracker[TopicPartition] = OffsetTracker()
        budgets = Backpressure(settings, metrics, routes, deps)
        committer = Committer(settings, metrics, self.tracker, budgets)
        self.fatal: list[BaseException] = []
        self.guard: CrashGuard[TopicPartition] | None = None
        if guard_store is not None:
            self.guard = CrashGuard(
                guard_store, "g", 3, self.tracker.pending_offsets, lambda tp: (tp.topic, tp.partition), ahead=ahead
            )
        self.inflight = InFlight(
            settings, metrics, dispatcher, self.tracker, budgets, committer, _no_spawn, self.guard, self.fatal.append
        )
        self.tp = TopicPartition(self.topic, 0)
        self.tracker.assign([self.tp])

    def start(self, offset: int) -> None:
        record = Record(self.topic, 0, offset, b"k", request_event(offset), 0, [])
        self.inflight.start(self.tp, record, self.route, self.tracker.start(self.tp, offset))

    def start_many(self, offsets: list[int]) -> None:
        records = [Record(self.topic, 0, offset, b"k", request_event(offset), 0, []) for offset in offsets]
        self.inflight.start_many(self.tp, records, self.route, self.tracker.start_many(self.tp, offsets), set())

    def acked(self) -> float | None:
        return self.metrics.registry.get_sample_value(
            "ocrbooth_produced_messages_total", {"topic": self.settings.topics.ocr_results, "outcome": "acked"}
        )


def _no_spawn(coro: Any, name: str) -> asyncio.Task[None]:
    raise AssertionError("message tasks are not spawned through the daemon")


async def _until(predicate: Any) -> None:
    """Let the loop run until `predicate()` holds (at most about 5 s)."""
    for _ in range(5_000):
        if predicate():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition not reached")


async def test_a_message_finishes_when_the_broker_acknowledges_it() -> None:
    """The task ends once the result is with the producer; the message stays in flight, uncompleted, until the
    acknowledgement, which completes its offset and counts it."""
    rt = Runtime()
    for offset in range(3):
        rt.start(offset)
    await _until(lambda: len(rt.producer.sent) == 3)
    await asyncio.sleep(0.01)
    assert not rt.inflight.tasks  # no task waits for the broker
    assert len(rt.inflight) == 3
    assert rt.inflight.counts["succeeded"] == 0
    assert rt.tracker.commit_plan() == {}
    rt.producer.answer()
    await _until(lambda: rt.inflight.counts["succeeded"] == 3)
    assert len(rt.inflight) == 0
    assert rt.tracker.commit_plan() == {rt.tp: 3}
    assert rt.acked() == 3
    assert await rt.inflight.drain(1) == 0


async def test_drain_waits_for_acknowledgements() -> None:
    rt = Runtime()
    rt.start(0)
    await _until(lambda: rt.producer.sent)
    drain = asyncio.create_task(rt.inflight.drain(5))
    await asyncio.sleep(0.02)
    assert not drain.done()
    rt.producer.answer()
    assert await drain == 0
    assert rt.inflight.counts["succeeded"] == 1


async def test_a_failed_acknowledgement_is_sent_again() -> None:
    """Broker trouble at acknowledgement time: the output is sent again (by a task, with backoff) and the message
    succeeds once that send is acknowledged."""
    rt = Runtime()
    rt.start(0)
    await _until(lambda: rt.producer.sent)
    rt.producer.answer(KafkaConnectionError("broker went away"))
    await _until(lambda: len(rt.producer.sent) == 2)
    assert rt.inflight.counts["succeeded"] == 0
    rt.producer.answer()
    await _until(lambda: rt.inflight.counts["succeeded"] == 1)
    assert rt.tracker.commit_plan() == {rt.tp: 1}
    assert rt.producer.sent[0] == rt.producer.sent[1]


async def test_an_output_the_broker_refuses_fails_the_message() -> None:
    """A refusal no retry fixes (the record too large for the broker) fails the batch, the output is sent again
    on its own and refused again, which ends in the handler's failed result, and the offset moves on."""
    rt = Runtime()
    rt.start(0)
    await _until(lambda: rt.producer.sent)
    assert len(rt.producer.batches) == 1
    rt.producer.answer(MessageSizeTooLargeError())
    await _until(lambda: len(rt.producer.sent) == 2)  # the output again, on its own
    assert rt.producer.sent[1] == rt.producer.sent[0]
    assert rt.inflight.counts["failed_result"] == 0
    rt.producer.answer(MessageSizeTooLargeError())
    await _until(lambda: len(rt.producer.sent) == 3)  # the failed result
    rt.producer.answer()
    await _until(lambda: rt.inflight.counts["failed_result"] == 1)
    failed = rt.producer.sent[2][1]
    assert b'"status":"failed"' in failed
    assert b"output_rejected" in failed
    assert rt.tracker.commit_plan() == {rt.tp: 1}
    assert not rt.fatal


async def test_a_fetch_inside_the_recorded_window_is_handled_without_waiting_for_s3() -> None:
    """The crash guard is asked once per fetch: when its recorded window covers the fetch's last offset, every
    message is handled at once, even while S3 is slow to answer the background extension of the window."""
    store = HeldStore()
    rt = Runtime(store, ahead=4)
    assert rt.guard is not None
    await rt.guard.load(rt.tp, None, position=0)  # window [0, 4) recorded
    store.answering.clear()
    rt.start_many([0, 1, 2, 3])
    await _until(lambda: len(rt.producer.sent) == 4)
    rt.producer.answer()
    await _until(lambda: rt.inflight.counts["succeeded"] == 4)
    store.answering.set()
    await _until(lambda: store.puts == 2)  # the extension, started as the window filled up


async def test_messages_of_a_fetch_past_the_recorded_window_wait_for_its_write() -> None:
    """A fetch reaching past the recorded window: the offsets inside it are handled at once, the ones past it
    only once a write covering them has landed in S3."""
    store = HeldStore()
    rt = Runtime(store, ahead=4)
    assert rt.guard is not None
    await rt.guard.load(rt.tp, None, position=0)  # window [0, 4)
    store.answering.clear()
    rt.start_many([0, 1, 2, 3, 4, 5])
    await _until(lambda: len(rt.producer.sent) == 4)
    await asyncio.sleep(0.02)
    assert len(rt.producer.sent) == 4  # 4 and 5 wait for S3
    store.answering.set()
    await _until(lambda: len(rt.producer.sent) == 6)
    rt.producer.answer()
    await _until(lambda: rt.inflight.counts["succeeded"] == 6)
    assert rt.tracker.commit_plan() == {rt.tp: 6}


async def test_acknowledgements_that_arrive_together_are_finished_together() -> None:
    """One produce response answers many outputs at once: the acknowledged messages are finished in one pass
    (offsets completed, counted and observed once each, exactly as one by one), while the one whose output failed
    in the same response is sent again on its own and finished once that send is acknowledged (one record a
    batch here, so that one output's batch can fail while the others go through)."""
    rt = Runtime(batch_records=1)
    for offset in range(5):
        rt.start(offset)
    await _until(lambda: len(rt.producer.sent) == 5)
    answers, rt.producer.pending = rt.producer.pending, []
    for offset, future in enumerate(answers):
        if offset == 2:
            future.set_exception(KafkaConnectionError("broker went away"))
        else:
            future.set_result(None)
    await _until(lambda: rt.inflight.counts["succeeded"] == 4)
    assert rt.tracker.commit_plan() == {rt.tp: 2}  # 2 is not finished: nothing past it commits
    assert rt.acked() == 4
    await _until(lambda: len(rt.producer.sent) == 6)  # 2's output, sent again
    rt.producer.answer()
    await _until(lambda: rt.inflight.counts["succeeded"] == 5)
    assert rt.tracker.commit_plan() == {rt.tp: 5}
    assert rt.acked() == 5
    sample = rt.metrics.registry.get_sample_value
    topic, results = rt.topic, rt.settings.topics.ocr_results
    assert sample("ocrbooth_handled_messages_total", {"topic": topic, "outcome": "succeeded"}) == 5
    assert sample("ocrbooth_handle_duration_seconds_count", {"topic": topic}) == 5
    assert sample("ocrbooth_publish_duration_seconds_count", {"topic": results}) == 5
    assert sample("ocrbooth_produced_messages_total", {"topic": results, "outcome": "error"}) == 1
    assert len(rt.inflight) == 0
    assert await rt.inflight.drain(1) == 0


async def test_the_outputs_of_one_turn_share_one_batch_per_partition() -> None:
    """Messages started together hand their outputs to one batch per partition, each record in the partition
    the producer's own partitioner gives its key, in the order of the messages; one answer per batch finishes
    them all."""
    rt = Runtime(partitions=3)
    rt.start_many(list(range(30)))
    await _until(lambda: len(rt.producer.sent) == 30)
    results = rt.settings.topics.ocr_results
    assert sorted(p for _, p, _ in rt.producer.batches) == [0, 1, 2]
    assert all(topic == results for topic, _, _ in rt.producer.batches)
    assert sum(n for _, _, n in rt.producer.batches) == 30
    expected: dict[int, list[str]] = {0: [], 1: [], 2: []}
    for offset in range(30):
        expected[DefaultPartitioner()(f"doc-{offset}".encode(), [0, 1, 2], [0, 1, 2])].append(f"req-{offset}")
    start = 0
    for _, partition, n in rt.producer.batches:
        ids = [json.loads(value)["request_id"] for _, value in rt.producer.sent[start : start + n]]
        assert ids == expected[partition]
        start += n
    assert len(rt.producer.pending) == 3
    rt.producer.answer()
    await _until(lambda: rt.inflight.counts["succeeded"] == 30)
    assert rt.tracker.commit_plan() == {rt.tp: 30}
    assert rt.acked() == 30


async def test_a_refused_batch_fails_only_the_message_whose_output_the_broker_refuses() -> None:
    """A batch refused for good (too large for the broker) does not fail its messages: each sends its output
    again on its own, and only the one refused again gets a failed result; the others succeed and every offset
    moves on."""
    rt = Runtime()
    rt.start_many(list(range(5)))
    await _until(lambda: len(rt.producer.sent) == 5)
    assert len(rt.producer.batches) == 1
    rt.producer.answer(MessageSizeTooLargeError())
    await _until(lambda: len(rt.producer.sent) == 10)  # each output again, one send each
    assert sorted(rt.producer.sent[5:]) == sorted(rt.producer.sent[:5])
    answers, rt.producer.pending = rt.producer.pending, []
    for (_, value), future in zip(rt.producer.sent[5:], answers, strict=True):
        if json.loads(value)["request_id"] == "req-2":
            future.set_exception(MessageSizeTooLargeError())
        else:
            future.set_result(None)
    await _until(lambda: len(rt.producer.sent) == 11)  # req-2's failed result
    rt.producer.answer()
    await _until(lambda: rt.inflight.counts["succeeded"] == 4 and rt.inflight.counts["failed_result"] == 1)
    failed = json.loads(rt.producer.sent[10][1])
    assert (failed["request_id"], failed["status"], failed["error"]["code"]) == ("req-2", "failed", "output_rejected")
    assert rt.tracker.commit_plan() == {rt.tp: 5}
    assert not rt.fatal


async def test_a_full_batch_goes_out_and_the_next_record_opens_another_in_order() -> None:
    """A message's outputs keep their order within a partition, also across a full batch: the batches are
    submitted in the order they were opened."""
    rt = Runtime(batch_records=2)
    rt.start_many(list(range(5)))
    await _until(lambda: len(rt.producer.sent) == 5)
    assert [n for _, _, n in rt.producer.batches] == [2, 2, 1]
    assert [json.loads(value)["request_id"] for _, value in rt.producer.sent] == [f"req-{i}" for i in range(5)]
    rt.producer.answer()
    await _until(lambda: rt.inflight.counts["succeeded"] == 5)


async def test_stop_submits_the_pending_batches_before_closing_the_producer() -> None:
    """Outputs appended in the turn the publisher stops in are submitted by `stop()` before the producer closes;
    later appends find the publisher stopped."""
    rt = Runtime()
    ctx = MessageContext(rt.topic, 0, 0, b"k", None)
    request = DocumentRequest.model_validate_json(request_event(0))
    outputs = await EchoHandler(rt.settings).handle(request, ctx)
    acks = await rt.publisher.append([*outputs, *outputs], ctx)
    assert rt.producer.sent == []  # not submitted yet: the turn is not over
    stopping = asyncio.create_task(rt.publisher.stop())
    await _until(lambda: rt.producer.stopped)
    assert rt.producer.batches == [(rt.settings.topics.ocr_results, 0, 2)]
    rt.producer.answer()
    await stopping
    await rt.publisher.settle(acks)
    assert rt.acked() == 2
    with pytest.raises(FatalError):
        await rt.publisher.append(outputs, ctx)


async def test_a_batch_acknowledgement_finishes_its_messages_with_one_callback(monkeypatch: pytest.MonkeyPatch) -> None:
    """The messages waiting on one produce batch are finished by one callback on the batch's future, not one per
    message: answering a batch of 50 schedules a few loop callbacks, not 50."""
    rt = Runtime()
    rt.start_many(list(range(50)))
    await _until(lambda: len(rt.producer.sent) == 50)
    await asyncio.sleep(0.01)
    assert len(rt.producer.batches) == 1
    loop = asyncio.get_running_loop()
    scheduled: list[Any] = []
    call_soon = loop.call_soon

    def counting_call_soon(callback: Any, *args: Any, **kwargs: Any) -> Any:
        scheduled.append(callback)
        return call_soon(callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_soon", counting_call_soon)
    rt.producer.answer()
    await _until(lambda: rt.inflight.counts["succeeded"] == 50)
    monkeypatch.undo()
    assert len(scheduled) < 10, scheduled
    assert rt.tracker.commit_plan() == {rt.tp: 50}
    assert rt.acked() == 50
    assert len(rt.inflight) == 0


async def test_batches_answered_together_finish_their_messages_each_by_its_own_answer() -> None:
    """Two produce batches answered in the same turn, one refused by broker trouble: the other's messages succeed
    and are counted, the refused one's are sent again and succeed once that is acknowledged."""
    rt = Runtime(partitions=2)
    rt.start_many(list(range(20)))
    await _until(lambda: len(rt.producer.sent) == 20)
    await asyncio.sleep(0.01)
    assert len(rt.producer.batches) == 2
    (_, _, failing_n), (_, _, ok_n) = rt.producer.batches
    first, second = rt.producer.pending
    rt.producer.pending = []
    first.set_exception(KafkaConnectionError("broker went away"))
    second.set_result(None)
    await _until(lambda: rt.inflight.counts["succeeded"] == ok_n)
    await _until(lambda: len(rt.producer.sent) == 20 + failing_n)  # the refused batch's outputs, again
    assert rt.acked() == ok_n
    rt.producer.answer()
    await _until(lambda: rt.inflight.counts["succeeded"] == 20)
    assert rt.acked() == 20
    assert rt.tracker.commit_plan() == {rt.tp: 20}
    assert len(rt.inflight) == 0
