"""Per-partition offset bookkeeping for at-least-once delivery. Pure: no I/O, no asyncio.

Messages of one partition finish out of order; the committable position is the first offset still
pending (or one past the last started offset when none is). An offset occupies its slot from `start`
until a commit covers it, so the number of tracked offsets bounds what a crash can redeliver.
"""

from __future__ import annotations

import operator
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

TP = TypeVar("TP", bound=Hashable)


@dataclass
class PartitionOffsets:
    """Started-but-uncommitted offsets of one partition, ascending."""

    epoch: int
    committed: int | None = None
    """Last position confirmed by the broker (the next offset a restart would read)."""
    _started: list[int] = field(default_factory=list)
    _head: int = 0
    _done: set[int] = field(default_factory=set)
    _contig: int = 0
    """Index (into _started) of the first entry not yet done."""

    @property
    def tracked(self) -> int:
        return len(self._started) - self._head

    @property
    def pending(self) -> int:
        return self.tracked - len(self._done)

    def start(self, offset: int) -> None:
        self.start_many([offset])

    def start_many(self, offsets: list[int]) -> None:
        """`start` for ascending offsets (a fetch's records of this partition), checked once for the run."""
        if not offsets:
            return
        first = offsets[0]
        if self.tracked and first <= self._started[-1]:
            raise ValueError(f"offset {first} started out of order (last {self._started[-1]})")
        if self.committed is not None and first < self.committed:
            raise ValueError(f"offset {first} is below the committed position {self.committed}")
        if not all(map(operator.lt, offsets, offsets[1:])):
            raise ValueError(f"offsets {offsets[0]}..{offsets[-1]} are not ascending")
        self._started.extend(offsets)

    def pending_offsets(self) -> list[int]:
        """Offsets started and not yet completed, ascending."""
        done = self._done
        return [o for o in self._started[self._head :] if o not in done]

    def complete(self, offset: int) -> None:
        self._done.add(offset)
        self._advance()

    def complete_many(self, offsets: Iterable[int]) -> None:
        """`complete` for several offsets at once (those acknowledged together), the committable point moved once."""
        self._done.update(offsets)
        self._advance()

    def _advance(self) -> None:
        idx = max(self._contig, self._head)
        while idx < len(self._started) and self._started[idx] in self._done:
            idx += 1
        self._contig = idx

    def committable(self) -> int | None:
        """Position to commit, or None when nothing new is complete."""
        if self._contig <= self._head:
            return None
        position = self._started[self._contig] if self._contig < len(self._started) else self._started[-1] + 1
        if self.committed is not None and position <= self.committed:
            return None
        return position

    def mark_committed(self, position: int) -> int:
        """Forget offsets below `position`; return how many slots that frees."""
        if self.committed is not None and position <= self.committed:
            return 0
        self.committed = position
        freed = 0
        while self._head < len(self._started) and self._started[self._head] < position:
            self._done.discard(self._started[self._head])
            self._head += 1
            freed += 1
        if self._head > 1024 and self._head * 2 > len(self._started):
            del self._started[: self._head]
            self._contig -= self._head
            self._head = 0
        self._contig = max(self._contig, self._head)
        return freed


class OffsetTracker(Generic[TP]):
    """Offsets of every assigned partition. Completions from a previous assignment are ignored via epochs."""

    def __init__(self) -> None:
        self._parts: dict[TP, PartitionOffsets] = {}
        self._epoch = 0
        self._tracked = 0  # kept incrementally: the consumer asks for it for every record

    def assign(self, partitions: Iterable[TP]) -> None:
        for tp in partitions:
            if tp not in self._parts:
                self._epoch += 1
                self._parts[tp] = PartitionOffsets(epoch=self._epoch)

    def revoke(self, partitions: Iterable[TP]) -> int:
        """Drop partitions; return the slots freed."""
        freed = 0
        for tp in partitions:
            part = self._parts.pop(tp, None)
            if part is not None:
                freed += part.tracked
        self._tracked -= freed
        return freed

    def partitions(self) -> list[TP]:
        return list(self._parts)

    def start(self, tp: TP, offset: int) -> int:
        """Record that work on `offset` began; return the epoch token to pass to `complete`."""
        part = self._parts[tp]
        part.start(offset)
        self._tracked += 1
        return part.epoch

    def start_many(self, tp: TP, offsets: list[int]) -> int:
        """`start` for ascending offsets of one partition (one fetch's records) in one pass; the epoch token."""
        part = self._parts[tp]
        part.start_many(offsets)
        self._tracked += len(offsets)
        return part.epoch

    def complete(self, tp: TP, offset: int, epoch: int) -> bool:
        """Record a finished offset; False when it belongs to a revoked assignment."""
        part = self._parts.get(tp)
        if part is None or part.epoch != epoch:
            return False
        part.complete(offset)
        return True

    def complete_many(self, tp: TP, offsets: list[int], epoch: int) -> bool:
        """`complete` for several offsets of `tp` (in any order); False when they belong to a revoked assignment."""
        part = self._parts.get(tp)
        if part is None or part.epoch != epoch:
            return False
        part.complete_many(offsets)
        return True

    def commit_plan(self, only: Iterable[TP] | None = None) -> dict[TP, int]:
        """Positions that advanced past the last commit, per partition."""
        wanted = self._parts.keys() if only is None else [tp for tp in only if tp in self._parts]
        plan = {}
        for tp in wanted:
            position = self._parts[tp].committable()
            if position is not None:
                plan[tp] = position
        return plan

    def mark_committed(self, positions: dict[TP, int]) -> int:
        freed = 0
        for tp, position in positions.items():
            part = self._parts.get(tp)
            if part is not None:
                freed += part.mark_committed(position)
        self._tracked -= freed
        return freed

    @property
    def tracked(self) -> int:
        """Offsets started and not yet covered by a commit, across partitions."""
        return self._tracked

    def has(self, tp: TP) -> bool:
        return tp in self._parts

    @property
    def pending(self) -> int:
        """Offsets started and not yet completed."""
        return sum(p.pending for p in self._parts.values())

    def tracked_in(self, tp: TP) -> int:
        part = self._parts.get(tp)
        return 0 if part is None else part.tracked

    def pending_offsets(self, tp: TP) -> list[int]:
        """Offsets of `tp` started and not yet completed (what a crash now would interrupt)."""
        part = self._parts.get(tp)
        return [] if part is None else part.pending_offsets()

    def committed(self, tp: TP) -> int | None:
        part = self._parts.get(tp)
        return None if part is None else part.committed
