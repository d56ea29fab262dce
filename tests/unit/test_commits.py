"""The commit loop: completions wait `commit_coalesce_ms` to share a commit, except while the fetch loop waits for
the room that commit frees."""

from __future__ import annotations

import asyncio
import contextlib

from aiokafka import TopicPartition
from prometheus_client import CollectorRegistry

from ocrbooth.config import Settings
from ocrbooth.daemon.backpressure import Backpressure
from ocrbooth.daemon.commits import Committer
from ocrbooth.daemon.dispatch import Route
from ocrbooth.daemon.offsets import OffsetTracker
from ocrbooth.daemon.outage import Dependencies
from ocrbooth.handlers.echo import EchoHandler
from ocrbooth.metrics import Metrics
from ocrbooth.schemas import DocumentRequest


class CommitClient:
    """The group consumer as the commit loop uses it: commits are recorded, a watermark is known."""

    def __init__(self) -> None:
        self.commits: list[dict[TopicPartition, int]] = []
        self.committed = asyncio.Event()

    async def commit(self, plan: dict[TopicPartition, int]) -> None:
        self.commits.append(dict(plan))
        self.committed.set()

    def highwater(self, tp: TopicPartition) -> int:
        return 0


async def _first_commit_within(waiting_for_room: bool, seconds: float) -> bool:
    settings = Settings(max_in_flight=2, commit_coalesce_ms=1_000, commit_interval_ms=60_000)
    metrics = Metrics(CollectorRegistry())
    topic = settings.topics.ocr_requests
    tp = TopicPartition(topic, 0)
    routes = {topic: Route(EchoHandler(settings), DocumentRequest)}
    budgets = Backpressure(settings, metrics, routes, Dependencies(metrics.dependency_up))
    tracker: OffsetTracker[TopicPartition] = OffsetTracker()
    committer = Committer(settings, metrics, tracker, budgets)
    client = CommitClient()
    committer.client = client
    tracker.assign([tp])
    epoch = tracker.start_many(tp, [0, 1])
    budgets.take(routes[topic].handler, 2)
    if waiting_for_room:
        budgets._full_since = 0.0  # what wait_for_room() records while the fetch loop waits
    loop = asyncio.get_running_loop().create_task(committer.loop())
    try:
        tracker.complete(tp, 0, epoch)
        committer.wanted.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await client.committed.wait()
        return client.commits == [{tp: 1}]
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop


async def test_a_completion_waits_to_share_its_commit() -> None:
    """With room left, a completion's commit waits commit_coalesce_ms (1 s here) for others to join it."""
    assert not await _first_commit_within(waiting_for_room=False, seconds=0.3)


async def test_a_completion_is_committed_at_once_while_the_fetch_loop_waits_for_room() -> None:
    """With every budget spent, the commit that frees room goes out without the coalescing wait."""
    assert await _first_commit_within(waiting_for_room=True, seconds=0.3)
