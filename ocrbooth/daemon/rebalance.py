"""Partition assignment: what this member does when the group gives it partitions or takes them away.

aiokafka calls the listener inside a rebalance, between fetches. On revoke: commit what is complete, record a
clean hand-over in the crash-loop record, forget the partitions' offsets and budgets. On assignment: read the
committed positions, and (crash-loop protection on) read what the previous owner left in flight before
fetching and record the first window of offsets from the committed one, the partition staying paused until
then; then re-apply pauses, which aiokafka forgets.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from ocrbooth.daemon.backpressure import Backpressure
from ocrbooth.daemon.commits import Committer
from ocrbooth.daemon.crashloop import CrashGuard
from ocrbooth.daemon.dispatch import Interrupted
from ocrbooth.daemon.inflight import InFlight, Spawn
from ocrbooth.daemon.offsets import OffsetTracker
from ocrbooth.errors import OcrboothError
from ocrbooth.metrics import Metrics

log = logging.getLogger(__name__)


class RebalanceListener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Takes partitions on and hands them over for one group member."""

    def __init__(
        self,
        metrics: Metrics,
        tracker: OffsetTracker[TopicPartition],
        budgets: Backpressure,
        committer: Committer,
        inflight: InFlight,
        spawn: Spawn,
        on_revoked: Callable[[set[TopicPartition]], None],
    ) -> None:
        self._metrics = metrics
        self._tracker = tracker
        self._budgets = budgets
        self._committer = committer
        self._inflight = inflight
        self._spawn = spawn
        self._on_revoked = on_revoked
        self.client: AIOKafkaConsumer | None = None
        """The group consumer, once started; None again once closing."""
        self.assigned_once = False
        self._loads: dict[TopicPartition, object] = {}
        """The latest crash-loop record read started per partition."""

    @property
    def _guard(self) -> CrashGuard[TopicPartition] | None:
        return self._inflight.guard

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        revoked = set(revoked)
        await self._committer.commit(only=revoked)
        await self.release(revoked)
        for tp in revoked:
            self._budgets.give_back(tp, self._tracker.tracked_in(tp))
            self._loads.pop(tp, None)
        self._tracker.revoke(revoked)
        self._budgets.revoked(revoked)
        self._committer.forget(revoked)
        self._on_revoked(revoked)
        log.info("partitions revoked", extra={"partitions": sorted(f"{t.topic}/{t.partition}" for t in revoked)})

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        client = self.client
        if client is None:  # closing: the group is being left, nothing to take on
            return
        tracker = self._tracker
        new = [tp for tp in assigned if tp not in tracker.partitions()]
        tracker.assign(new)
        for tp in new:
            try:
                committed = await client.committed(tp)
            except KafkaError:
                committed = None
            if committed is not None:
                tracker.mark_committed({tp: committed})
        guard = self._guard
        if guard is not None and guard.enabled:
            # Read what the previous owner left in flight before fetching; paused until then.
            for tp in new:
                self._budgets.loading.add(tp)
                self._loads[tp] = load = object()
                self._spawn(self._load_guard(guard, tp, load), f"crash guard {tp.topic}/{tp.partition}")
        self._budgets.assigned()
        self.assigned_once = True
        self._metrics.rebalances.inc()
        self._metrics.assigned_partitions.set(len(assigned))
        log.info("partitions assigned", extra={"partitions": sorted(f"{t.topic}/{t.partition}" for t in assigned)})

    async def release(self, partitions: Iterable[TopicPartition]) -> None:
        """Tell the crash guard these partitions are handed over cleanly (best effort: a failure only makes
        their in-flight messages suspects for the next owner)."""
        guard = self._guard
        if guard is None:
            return
        for tp in partitions:
            if tp in self._budgets.loading:
                guard.forget(tp)
                continue
            try:
                async with asyncio.timeout(5):
                    await guard.release(tp, self._tracker.committed(tp))
            except (OcrboothError, TimeoutError) as exc:
                guard.forget(tp)
                log.warning("could not record a clean hand-over", extra={"partition": str(tp), "error": str(exc)})

    async def _load_guard(self, guard: CrashGuard[TopicPartition], tp: TopicPartition, load: object) -> None:
        # Fetching resumes at the committed offset: the first window is written from there while the partition
        # is paused for this read anyway. Without a commit the start is the reset policy's, not known here (asking
        # aiokafka with position() at this point made a member that took partitions over stall in the e2e tests).
        committed = self._tracker.committed(tp)
        try:
            await self._inflight.durably(
                lambda: guard.load(tp, committed, position=committed), "read the crash-loop record"
            )
        except Interrupted:
            return
        except Exception:  # a bug here must not leave the partition paused: go on without its history
            log.exception("reading the crash-loop record failed; the partition goes on without it")
            guard.forget(tp)
        finally:
            self._budgets.freed.set()
        # Only the latest assignment's read may resume the partition: a read left over from an assignment that
        # was revoked meanwhile must not resume it while the new one is still reading.
        if self._tracker.has(tp) and self._loads.get(tp) is load:
            del self._loads[tp]
            self._budgets.loading.discard(tp)
