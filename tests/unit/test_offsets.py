"""The offset tracker: only contiguous completions commit, stale completions are ignored, slots are bounded."""

from __future__ import annotations

import random

import pytest

from ocrbooth.daemon.offsets import OffsetTracker, PartitionOffsets

TP = ("ocr.requests", 0)
OTHER = ("ocr.requests", 1)


def _tracker(*partitions: tuple[str, int]) -> OffsetTracker[tuple[str, int]]:
    tracker: OffsetTracker[tuple[str, int]] = OffsetTracker()
    tracker.assign(partitions or (TP,))
    return tracker


def _commit(tracker: OffsetTracker[tuple[str, int]]) -> dict[tuple[str, int], int]:
    """What the consumer does: take the plan and, as if the broker accepted it, mark it committed."""
    plan = tracker.commit_plan()
    tracker.mark_committed(plan)
    return plan


def test_out_of_order_completion_commits_only_the_contiguous_prefix() -> None:
    """Completing 0, 2 and 3 before 1 commits position 1; completing 1 then jumps to 4."""
    tracker = _tracker()
    epochs = {offset: tracker.start(TP, offset) for offset in range(5)}
    for offset in (2, 3, 0):
        assert tracker.complete(TP, offset, epochs[offset])
    assert tracker.commit_plan() == {TP: 1}
    tracker.mark_committed({TP: 1})
    assert tracker.commit_plan() == {}
    assert tracker.complete(TP, 1, epochs[1])
    assert tracker.commit_plan() == {TP: 4}


def test_nothing_to_commit_until_the_first_offset_completes() -> None:
    """Later offsets finishing first give no commit position at all while the first one is pending."""
    tracker = _tracker()
    epochs = {offset: tracker.start(TP, offset) for offset in range(3)}
    tracker.complete(TP, 2, epochs[2])
    tracker.complete(TP, 1, epochs[1])
    assert tracker.commit_plan() == {}
    assert tracker.pending == 1


def test_gaps_in_offsets_commit_past_the_gap() -> None:
    """Offsets 0,1,5,6 (2-4 are transaction markers or compacted away) commit to 5, then to 7, never to 2."""
    tracker = _tracker()
    epochs = {offset: tracker.start(TP, offset) for offset in (0, 1, 5, 6)}
    tracker.complete(TP, 0, epochs[0])
    tracker.complete(TP, 1, epochs[1])
    assert tracker.commit_plan() == {TP: 5}
    tracker.complete(TP, 6, epochs[6])
    assert tracker.commit_plan() == {TP: 5}
    tracker.complete(TP, 5, epochs[5])
    assert tracker.commit_plan() == {TP: 7}


def test_tracked_counts_started_but_uncommitted_and_commit_frees_exactly_those_below() -> None:
    """`tracked` includes completed-but-uncommitted offsets; `mark_committed` frees only offsets below the position."""
    tracker = _tracker(TP, OTHER)
    epochs = {offset: tracker.start(TP, offset) for offset in range(10, 16)}
    other_epoch = tracker.start(OTHER, 0)
    assert tracker.tracked == 7
    assert tracker.pending == 7
    for offset in (10, 11, 12, 14):
        tracker.complete(TP, offset, epochs[offset])
    assert tracker.tracked == 7  # completion alone frees nothing: a crash now would redeliver them
    assert tracker.pending == 3
    assert tracker.commit_plan() == {TP: 13}
    assert tracker.mark_committed({TP: 13}) == 3
    assert tracker.tracked_in(TP) == 3
    assert tracker.tracked_in(OTHER) == 1
    assert tracker.tracked == 4
    assert tracker.committed(TP) == 13
    assert tracker.mark_committed({TP: 13}) == 0  # the same position again frees nothing
    tracker.complete(OTHER, 0, other_epoch)
    assert tracker.mark_committed(tracker.commit_plan()) == 1
    assert tracker.tracked_in(OTHER) == 0


def test_commit_plan_can_be_restricted_to_some_partitions() -> None:
    """`commit_plan(only=...)` (used on revoke) plans just those partitions and ignores unknown ones."""
    tracker = _tracker(TP, OTHER)
    for tp in (TP, OTHER):
        tracker.complete(tp, 0, tracker.start(tp, 0))
    assert tracker.commit_plan(only=[OTHER, ("unknown", 9)]) == {OTHER: 1}
    assert tracker.commit_plan() == {TP: 1, OTHER: 1}


def test_completion_after_revoke_is_ignored_without_raising() -> None:
    """A handler finishing after its partition was revoked gets False and changes nothing."""
    tracker = _tracker(TP, OTHER)
    epoch = tracker.start(TP, 0)
    tracker.start(TP, 1)
    assert tracker.revoke([TP]) == 2
    assert tracker.complete(TP, 0, epoch) is False
    assert tracker.partitions() == [OTHER]
    assert tracker.tracked == 0
    assert tracker.commit_plan() == {}
    assert tracker.revoke([TP]) == 0  # revoking twice is harmless


def test_reassigning_a_partition_gives_a_new_epoch_and_old_completions_stay_ignored() -> None:
    """Revoke then assign again: the old epoch's completions are rejected, the new epoch's accepted."""
    tracker = _tracker()
    old_epoch = tracker.start(TP, 0)
    tracker.revoke([TP])
    tracker.assign([TP])
    tracker.mark_committed({TP: 0})  # what the broker says on re-assignment
    new_epoch = tracker.start(TP, 0)
    assert new_epoch != old_epoch
    assert tracker.complete(TP, 0, old_epoch) is False
    assert tracker.commit_plan() == {}
    assert tracker.complete(TP, 0, new_epoch) is True
    assert tracker.commit_plan() == {TP: 1}


def test_assigning_an_already_assigned_partition_keeps_its_state() -> None:
    """An assignment that repeats a partition we hold does not reset its offsets or epoch."""
    tracker = _tracker()
    epoch = tracker.start(TP, 0)
    tracker.assign([TP])
    assert tracker.tracked == 1
    assert tracker.complete(TP, 0, epoch) is True


@pytest.mark.parametrize(("first", "second"), [(5, 5), (5, 3)])
def test_starting_an_offset_out_of_order_raises(first: int, second: int) -> None:
    """Offsets of one partition must start strictly ascending; a repeat or a step back is a bug."""
    tracker = _tracker()
    tracker.start(TP, first)
    with pytest.raises(ValueError, match="out of order"):
        tracker.start(TP, second)


def test_starting_below_the_committed_position_raises() -> None:
    """An offset below what the broker already has committed cannot be started."""
    tracker = _tracker()
    tracker.mark_committed({TP: 100})
    with pytest.raises(ValueError, match="below the committed position 100"):
        tracker.start(TP, 99)
    tracker.start(TP, 100)
    assert tracker.tracked == 1


def _model_position(started: list[int], done: set[int]) -> int:
    """Brute force: the first started offset not done, else one past the last started."""
    for offset in started:
        if offset not in done:
            return offset
    return started[-1] + 1


@pytest.mark.parametrize("seed", range(40))
def test_committed_position_is_always_the_smallest_incomplete_offset(seed: int) -> None:
    """Random gaps, interleavings and commit timings: the position matches a brute-force model, never moving back."""
    rng = random.Random(seed)
    part = PartitionOffsets(epoch=1)
    started: list[int] = []
    done: set[int] = set()
    pending: list[int] = []
    next_offset = rng.randrange(0, 50)
    committed = -1
    for _ in range(400):
        if not pending or (len(started) < 300 and rng.random() < 0.5):
            part.start(next_offset)
            started.append(next_offset)
            pending.append(next_offset)
            next_offset += 1 if rng.random() < 0.8 else rng.randrange(2, 6)  # gaps now and then
        else:
            offset = pending.pop(rng.randrange(len(pending)))
            part.complete(offset)
            done.add(offset)
        if rng.random() < 0.3:
            position = part.committable()
            expected = _model_position(started, done)
            # A commit is due when some tracked offset (at or above the last commit) is below the first incomplete one.
            if any(committed <= o < expected for o in started):
                assert position == expected
                assert position > committed
                part.mark_committed(position)
                committed = position
            else:
                assert position is None
            assert part.committed == (committed if committed >= 0 else None)
        assert part.tracked == sum(1 for o in started if o >= committed)
        assert part.pending == len(pending)
    for offset in pending:
        part.complete(offset)
        done.add(offset)
    assert part.committable() == started[-1] + 1


def test_completions_during_an_in_flight_commit_are_kept() -> None:
    """Offsets completed between taking a commit plan and the broker's acknowledgement are committed next time."""
    tracker = _tracker()
    epochs = {offset: tracker.start(TP, offset) for offset in range(6)}
    for offset in (0, 1):
        tracker.complete(TP, offset, epochs[offset])
    plan = tracker.commit_plan()
    assert plan == {TP: 2}
    for offset in (2, 3):  # handlers finish while the commit request is awaited
        tracker.complete(TP, offset, epochs[offset])
    assert tracker.mark_committed(plan) == 2
    assert tracker.commit_plan() == {TP: 4}


def test_compaction_keeps_completions_that_landed_during_the_commit() -> None:
    """When a commit frees more than 1024 slots and compacts the list, later completions already recorded survive."""
    tracker = _tracker()
    epochs = {offset: tracker.start(TP, offset) for offset in range(2000)}
    for offset in range(1100):
        tracker.complete(TP, offset, epochs[offset])
    plan = tracker.commit_plan()
    assert plan == {TP: 1100}
    for offset in range(1100, 1200):
        tracker.complete(TP, offset, epochs[offset])
    assert tracker.mark_committed(plan) == 1100
    assert len(tracker._parts[TP]._started) == 900  # white-box: the compaction branch ran
    assert tracker.commit_plan() == {TP: 1200}
    assert tracker.tracked == 900
    assert tracker.pending == 800
    tracker.mark_committed({TP: 1200})
    for offset in range(1200, 2000):
        tracker.complete(TP, offset, epochs[offset])
    assert tracker.commit_plan() == {TP: 2000}


def test_compaction_after_many_commits_keeps_results_right() -> None:
    """5000 offsets through a sliding window, completed at random and during in-flight commits, stay exact."""
    rng = random.Random(1234)
    tracker = _tracker()
    window: list[int] = []
    epochs: dict[int, int] = {}
    committed = 0
    next_offset = 0
    shortest_list = None
    while next_offset < 5000 or window:
        while next_offset < 5000 and len(window) < 50:
            epochs[next_offset] = tracker.start(TP, next_offset)
            window.append(next_offset)
            next_offset += 1
        position = min(window) if window else next_offset
        plan = tracker.commit_plan()  # the commit request goes out...
        assert plan == ({TP: position} if position > committed else {})
        for _ in range(rng.randint(1, 3)):  # ...handlers finish while it is in flight...
            if window:
                offset = window.pop(rng.randrange(len(window)))
                assert tracker.complete(TP, offset, epochs.pop(offset))
        if plan:  # ...then the broker acknowledges it
            assert tracker.mark_committed(plan) == plan[TP] - committed
            committed = plan[TP]
        assert tracker.tracked == next_offset - committed
        assert tracker.pending == len(window)
        internal = len(tracker._parts[TP]._started)  # white-box: prove the compaction path actually ran
        shortest_list = internal if shortest_list is None else min(shortest_list, internal)
    assert tracker.commit_plan() == {TP: 5000}
    tracker.mark_committed({TP: 5000})
    assert tracker.committed(TP) == 5000
    assert tracker.tracked == 0
    assert shortest_list is not None
    assert shortest_list < 5000 - 1024
    tracker.complete(TP, 5000, tracker.start(TP, 5000))  # after compaction, new offsets still work
    assert tracker.commit_plan() == {TP: 5001}


def test_starting_a_fetch_at_once_tracks_exactly_what_starting_each_offset_does() -> None:
    """`start_many` (one fetch's records of a partition) leaves the same state as `start` per offset: the same
    epoch, tracked count, completions and commit positions."""
    one, many = _tracker(TP, OTHER), _tracker(TP, OTHER)
    offsets = [3, 4, 6, 7, 8]
    epochs = {one.start(TP, offset) for offset in offsets}
    epoch = many.start_many(TP, offsets)
    assert epochs == {epoch}
    assert many.tracked == one.tracked == 5
    for tracker in (one, many):
        for offset in (4, 3, 7):
            assert tracker.complete(TP, offset, epoch)
    assert many.commit_plan(only=[TP]) == one.commit_plan(only=[TP]) == {TP: 6}
    assert many.pending_offsets(TP) == one.pending_offsets(TP) == [6, 8]
    many.start_many(TP, [9, 10])
    assert many.tracked_in(TP) == 7


def test_starting_a_fetch_out_of_order_is_refused_whole() -> None:
    """Offsets at or below the last started one, below the committed position, or not ascending are refused
    before any is tracked."""
    tracker = _tracker()
    tracker.start_many(TP, [5, 6])
    for bad in ([6, 7], [4], [7, 9, 8], [7, 7]):
        with pytest.raises(ValueError, match=r"order|ascending"):
            tracker.start_many(TP, bad)
    assert tracker.tracked == 2
    fresh = _tracker()
    fresh.mark_committed({TP: 10})
    with pytest.raises(ValueError, match="below the committed position"):
        fresh.start_many(TP, [9, 10])
    assert fresh.tracked == 0


def test_completing_offsets_together_equals_completing_them_one_by_one() -> None:
    """`complete_many` (the offsets one acknowledgement finishes, in any order) leaves the same committable
    positions and pending offsets as `complete` per offset; a revoked assignment's offsets are refused."""
    rng = random.Random(7)
    one: OffsetTracker[str] = OffsetTracker()
    many: OffsetTracker[str] = OffsetTracker()
    for t in (one, many):
        t.assign(["p"])
    epoch = one.start_many("p", list(range(100)))
    assert many.start_many("p", list(range(100))) == epoch
    order = list(range(100))
    rng.shuffle(order)
    for i in range(0, 100, 7):
        group = order[i : i + 7]
        for offset in group:
            assert one.complete("p", offset, epoch)
        assert many.complete_many("p", group, epoch)
        assert one.commit_plan() == many.commit_plan()
        assert one.pending_offsets("p") == many.pending_offsets("p")
    assert many.commit_plan() == {"p": 100}
    assert not many.complete_many("p", [1], epoch + 1)
    assert not many.complete_many("q", [1], epoch)
