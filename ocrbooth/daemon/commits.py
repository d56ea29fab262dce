"""Commits: each partition's highest contiguous completed offset (`daemon/offsets.py`) goes to the group.

Soon after completions (bounding redelivery; completions that arrive within `commit_coalesce_ms` share one
round trip), at once while the fetch loop waits for room (the budgets count messages until a commit covers
them, so the coalescing wait would idle the daemon), at least every `commit_interval_ms`, and for revoked
partitions and at close. A commit frees the handlers' budgets (`daemon/backpressure.py`). A commit the broker
rejects is kept for the next try: nothing is lost, at worst redelivered.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from ocrbooth.config import Settings
from ocrbooth.daemon.backpressure import Backpressure
from ocrbooth.daemon.offsets import OffsetTracker
from ocrbooth.daemon.shutdown import wait_event
from ocrbooth.metrics import Metrics

log = logging.getLogger(__name__)


class Committer:
    """Commits completed offsets and keeps the lag gauge."""

    def __init__(
        self, settings: Settings, metrics: Metrics, tracker: OffsetTracker[TopicPartition], budgets: Backpressure
    ) -> None:
        self._s = settings
        self._metrics = metrics
        self._tracker = tracker
        self._budgets = budgets
        self.client: AIOKafkaConsumer | None = None
        """The group consumer, once started; None again once closed (the loop ends)."""
        self.wanted = asyncio.Event()
        """Set when a completion advanced a partition's committable offset."""
        self._lock = asyncio.Lock()

    async def loop(self) -> None:
        """Commit soon after completions, at least every commit_interval_ms."""
        while self.client is not None:
            if await wait_event(self.wanted, self._s.commit_interval_ms / 1000):
                # Let completions that arrive together share one commit round trip, unless the fetch loop waits
                # for the room this commit frees (completions of this turn still share it: sleep(0) is one turn).
                coalesce_s = 0 if self._budgets.waiting_for_room else self._s.commit_coalesce_ms / 1000
                await asyncio.sleep(coalesce_s)
            self.wanted.clear()
            await self.commit()
            self._update_lag()

    async def commit(self, only: Iterable[TopicPartition] | None = None) -> bool:
        """Commit every partition whose contiguous completed offset advanced. False on failure (kept for later)."""
        client = self.client
        if client is None:
            return False
        tracker = self._tracker
        async with self._lock:
            plan = tracker.commit_plan(only)
            if not plan:
                return True
            try:
                await client.commit(plan)
            except (CommitFailedError, IllegalStateError) as exc:
                # The group rebalanced under us; the new owner re-reads from the last commit.
                self._metrics.commit_failures.inc()
                log.warning("commit rejected after a rebalance", extra={"error": repr(exc)})
                return False
            except KafkaError as exc:
                self._metrics.commit_failures.inc()
                log.warning("commit failed, will retry", extra={"error": repr(exc)})
                return False
            before = {tp: tracker.tracked_in(tp) for tp in plan}
            freed = tracker.mark_committed(plan)
            for tp, n in before.items():
                self._budgets.give_back(tp, n - tracker.tracked_in(tp))
            self._metrics.commits.inc()
            if freed:
                self._budgets.freed.set()
            return True

    def _update_lag(self) -> None:
        client = self.client
        if client is None:
            return
        for tp in self._tracker.partitions():
            # The fetch high watermark, not ListOffsets: some brokers (Tansu on S3) answer the latter wrongly.
            hw = client.highwater(tp)
            if hw is not None:
                self._metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(
                    max(0, hw - (self._tracker.committed(tp) or 0))
                )

    def forget(self, revoked: Iterable[TopicPartition]) -> None:
        """No lag series for partitions this member no longer owns."""
        for tp in revoked:
            try:
                self._metrics.consumer_lag.remove(tp.topic, str(tp.partition))
            except KeyError:
                pass
