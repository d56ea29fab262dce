"""The fetch loop's acceptance of one partition's records: room limits it, the rest is rewound, and where offsets
died with a daemon each record is judged (a suspect is held, a crash loop dead-lettered)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import TopicPartition
from prometheus_client import CollectorRegistry

from ocrbooth.config import Settings
from ocrbooth.daemon.consumer import Consumer
from ocrbooth.daemon.crashloop import CrashGuard
from ocrbooth.daemon.dispatch import Dispatcher, Route
from ocrbooth.daemon.offsets import OffsetTracker
from ocrbooth.daemon.outage import Dependencies
from ocrbooth.daemon.produce_batches import ProduceBatches
from ocrbooth.daemon.publisher import Publisher
from ocrbooth.handlers.echo import EchoHandler
from ocrbooth.metrics import Metrics
from ocrbooth.schemas import DocumentRequest
from tests.support.daemon import request_event
from tests.support.runtime import HeldStore, Record, ScriptedProducer


class FakeClient:
    """The group consumer as `_accept` uses it: the assignment and seeks."""

    def __init__(self, tp: TopicPartition) -> None:
        self.tp = tp
        self.seeks: list[tuple[TopicPartition, int]] = []

    def assignment(self) -> set[TopicPartition]:
        return {self.tp}

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))


class Member:
    """A Consumer over a scripted producer, a fake group consumer and an in-memory crash guard."""

    def __init__(self, max_in_flight: int = 3) -> None:
        settings = Settings(max_in_flight=max_in_flight)
        self.metrics = metrics = Metrics(CollectorRegistry())
        self.producer = ScriptedProducer()
        publisher = Publisher(settings, metrics, storage=None)  # type: ignore[arg-type]
        publisher._producer = self.producer  # type: ignore[assignment]
        publisher._batches = ProduceBatches(self.producer)
        deps = Dependencies(metrics.dependency_up)
        dispatcher = Dispatcher(settings, metrics, publisher, deps.add("s3", None), asyncio.Event())
        self.topic = settings.topics.ocr_requests
        self.tp = TopicPartition(self.topic, 0)
        routes = {self.topic: Route(EchoHandler(settings), DocumentRequest)}
        tracker: OffsetTracker[TopicPartition] = OffsetTracker()
        self.store = HeldStore()
        self.guard: CrashGuard[TopicPartition] = CrashGuard(
            self.store, "g", 2, tracker.pending_offsets, lambda tp: (tp.topic, tp.partition), ahead=100
        )
        self.fatal: list[BaseException] = []
        self.consumer = Consumer(
            settings, metrics, routes, _no_spawn, dispatcher, deps, tracker, self.guard, self.fatal.append
        )
        self.client = FakeClient(self.tp)
        tracker.assign([self.tp])

    def accept(self, offsets: range) -> None:
        records = [Record(self.topic, 0, o, b"k", request_event(o), 0, []) for o in offsets]
        self.consumer._accept(self.client, self.tp, records)  # type: ignore[arg-type]

    def consumed(self) -> float | None:
        return self.metrics.registry.get_sample_value("ocrbooth_consumed_messages_total", {"topic": self.topic})


def _no_spawn(coro: Any, name: str) -> asyncio.Task[None]:
    raise AssertionError("message tasks are not spawned through the daemon")


async def _settle(member: Member, outcomes: int) -> None:
    for _ in range(2_000):
        member.producer.answer()
        if sum(member.consumer.counts.values()) >= outcomes:
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"only {member.consumer.counts} of {outcomes} outcomes")


async def test_room_limits_what_is_accepted_and_the_rest_is_rewound() -> None:
    """Of five records with room for three, three are started (tracked, budgeted, counted as consumed) and the
    partition is rewound to the fourth."""
    m = Member(max_in_flight=3)
    await m.guard.load(m.tp, None, position=0)
    m.accept(range(5))
    assert m.client.seeks == [(m.tp, 3)]
    assert m.consumer.tracker.tracked == 3
    assert m.consumer.budgets.room(next(iter(m.consumer.budgets.handlers.values()))) == 0
    assert m.consumed() == 3
    await _settle(m, 3)
    assert m.consumer.counts["succeeded"] == 3
    assert m.consumer.tracker.commit_plan() == {m.tp: 3}


async def test_a_suspect_is_held_and_its_partition_goes_on_after_it() -> None:
    """Offsets that were in flight when a daemon died: the records before the first of them are accepted, that
    one is held for a lone run, the partition is positioned after it, and nothing more is accepted meanwhile."""
    m = Member(max_in_flight=10)
    m.consumer.tracker.mark_committed({m.tp: 2})
    await m.guard.load(m.tp, 2, position=2)
    m.guard._parts[m.tp].deaths = {2: 1, 3: 1}  # in flight when the previous owner died
    assert m.guard.verdict(m.tp, 2) == "suspect"
    m.accept(range(2, 6))
    held = m.consumer._held
    assert held is not None
    assert held[1].offset == 2
    assert m.client.seeks == [(m.tp, 3)]
    assert m.consumer.tracker.tracked == 0
    m.client.seeks.clear()
    m.accept(range(3, 6))  # while the suspect is held, nothing is accepted
    assert m.client.seeks == [(m.tp, 3)]
    assert m.consumer.tracker.tracked == 0


async def test_a_crash_loop_is_dead_lettered_and_its_neighbours_are_handled() -> None:
    """A record judged a crash loop is accepted and dead-lettered without being handled; the records around it,
    with no deaths, are handled as usual in the same pass."""
    m = Member(max_in_flight=10)
    await m.guard.load(m.tp, None, position=0)
    m.guard._parts[m.tp].deaths = {1: 2}  # offset 1 has killed max_process_deaths (2) daemons
    assert m.guard.has_deaths(m.tp)
    m.accept(range(3))
    assert m.client.seeks == []
    await _settle(m, 3)
    assert m.consumer.counts["succeeded"] == 2
    assert m.consumer.counts["dead_lettered"] == 1
    assert m.consumer.tracker.commit_plan() == {m.tp: 3}
    topics = [topic for topic, _ in m.producer.sent]
    assert topics.count(Settings().topics.dlq) == 1
