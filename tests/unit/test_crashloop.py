"""Crash-loop protection's bookkeeping: who died in flight, who is a suspect, who is dead-lettered."""

from __future__ import annotations

import asyncio

import pytest

from ocrbooth.daemon.crashloop import CrashGuard, Ledger, Released, deaths_after_restart
from ocrbooth.errors import PoisonError, RetryableError


class MemoryStore:
    """An in-memory object store with S3Storage's signatures (missing keys are source_not_found)."""

    bucket = "b"

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.puts = 0
        self.fail_next = 0

    def uri(self, key: str, bucket: str | None = None) -> str:
        return f"s3://{bucket or self.bucket}/{key}"

    async def put(self, key: str, data: bytes, *, content_type: str = "application/octet-stream") -> str:
        await asyncio.sleep(0)  # a real write yields to the loop while it waits for S3
        if self.fail_next:
            self.fail_next -= 1
            raise RetryableError("S3 down", code="storage_unavailable")
        self.puts += 1
        self.objects[key] = data
        return self.uri(key)

    async def get(self, uri: str, *, max_bytes: int | None = None) -> bytes:
        key = uri.split("/", 3)[3]
        if key not in self.objects:
            raise PoisonError(f"{uri} does not exist", code="source_not_found")
        return self.objects[key]


def test_in_flight_offsets_become_suspects_and_the_isolated_one_gains_a_death() -> None:
    """Offsets of the recorded window get one death; the isolated offset gains one more; committed ones drop."""
    ledger = Ledger(window=(3, 10), isolated=9, deaths={9: 1, 2: 2})
    assert deaths_after_restart(ledger, committed=6) == {6: 1, 7: 1, 8: 1, 9: 2}
    assert deaths_after_restart(ledger, committed=None) == {2: 2, 3: 1, 4: 1, 5: 1, 6: 1, 7: 1, 8: 1, 9: 2}
    assert deaths_after_restart(Ledger(window=(7, 8), deaths={7: 1}), committed=0) == {7: 1}


def test_ledger_round_trips_and_garbage_reads_as_empty() -> None:
    """A ledger survives encode/decode; an unreadable or absurd record counts as empty instead of failing."""
    ledger = Ledger(window=(1, 3), isolated=2, deaths={2: 2})
    assert Ledger.decode(ledger.encode()) == ledger
    assert Ledger.decode(b"not json") == Ledger()
    assert Ledger.decode(b'{"window": "x"}') == Ledger()
    assert Ledger.decode(b'{"window": [0, 1000000000]}') == Ledger()


def _guard(
    store: MemoryStore, pending: dict[str, list[int]], *, ahead: int = 2, max_deaths: int = 3
) -> CrashGuard[str]:
    return CrashGuard(store, "g", max_deaths, lambda tp: list(pending[tp]), lambda tp: ("topic", 0), ahead=ahead)


async def test_three_deaths_make_a_crash_loop_verdict() -> None:
    """A message alone in flight at each of max_deaths deaths is judged crash_loop; its neighbours are not."""
    store = MemoryStore()
    pending: dict[str, list[int]] = {"tp": []}
    g = _guard(store, pending)
    await g.load("tp", committed=10)
    assert g.verdict("tp", 12) == "ok"
    pending["tp"] = [10, 11, 12]
    await g.record("tp", 12)  # window [10, 15): ... and the daemon dies with 10, 11, 12 in flight
    g = _guard(store, pending)
    await g.load("tp", committed=10)
    assert [g.verdict("tp", o) for o in (10, 11, 12, 14, 15)] == ["suspect"] * 4 + ["ok"]
    # 10 and 11 pass alone and are committed; 12 kills the daemon twice while isolated.
    for expected in ("suspect", "crash_loop"):
        pending["tp"] = [12]
        await g.isolate("tp", 12)
        g = _guard(store, pending)
        await g.load("tp", committed=12)
        assert g.verdict("tp", 12) == expected
        assert g.verdict("tp", 20) == "ok"
    assert g.deaths("tp", 12) == 3


async def test_one_write_covers_the_next_offsets() -> None:
    """Recording an offset writes a window reaching `ahead` past it: the next offsets need no write, and once half
    the window is used it is extended in the background before anyone has to wait for it."""
    store = MemoryStore()
    pending: dict[str, list[int]] = {"tp": []}
    g = _guard(store, pending, ahead=6)
    await g.load("tp", committed=0)
    before = store.puts
    for offset in range(4):  # 0 writes the window [0, 7); 1..3 are covered without a write
        pending["tp"].append(offset)
        await g.record("tp", offset)
    assert store.puts - before == 1
    pending["tp"].append(4)
    await g.record("tp", 4)  # past half the window: an extension starts in the background
    await asyncio.sleep(0.01)
    assert store.puts - before == 2
    assert Ledger.decode(store.objects["state/crashloop/g/topic/0.json"]).window == (0, 11)
    await g.record("tp", 7)  # already covered by the extension: no wait, no write
    assert store.puts - before == 2


async def test_clean_release_counts_no_death() -> None:
    """A partition handed over cleanly (revoke, shutdown) leaves nothing suspect for the next owner."""
    store = MemoryStore()
    pending = {"tp": [4, 5]}
    g = _guard(store, pending)
    await g.load("tp", committed=4)
    await g.record("tp", 5)
    await g.release("tp", committed=6)
    fresh = _guard(store, {"tp": []})
    await fresh.load("tp", committed=6)
    assert [fresh.verdict("tp", o) for o in (4, 5, 6, 7)] == ["ok"] * 4


async def test_concurrent_records_share_writes() -> None:
    """Many messages starting together cost at most two writes, and each waits until its offset is covered."""
    store = MemoryStore()
    pending = {"tp": list(range(1, 51))}
    g = _guard(store, pending, ahead=0)
    await g.load("tp", committed=1)
    before = store.puts
    await asyncio.gather(*(g.record("tp", offset) for offset in range(1, 51)))
    assert 1 <= store.puts - before <= 2
    assert Ledger.decode(store.objects["state/crashloop/g/topic/0.json"]).window == (1, 51)


async def test_record_failure_reaches_the_caller() -> None:
    """A failed write raises in the caller that made it (it retries); the guard is usable afterwards."""
    store = MemoryStore()
    pending = {"tp": [1]}
    g = _guard(store, pending)
    await g.load("tp", committed=1)
    store.fail_next = 1
    with pytest.raises(RetryableError):
        await g.record("tp", 1)
    await g.record("tp", 1)
    assert Ledger.decode(store.objects["state/crashloop/g/topic/0.json"]).window == (1, 4)


async def test_disabled_guard_touches_nothing() -> None:
    """max_deaths 0 turns the guard off: no reads, no writes, every verdict ok."""
    store = MemoryStore()
    g = _guard(store, {"tp": [1]}, max_deaths=0)
    await g.load("tp", committed=0)
    await g.record("tp", 1)
    assert store.puts == 0
    assert g.verdict("tp", 1) == "ok"


async def test_taking_over_at_a_position_records_the_first_window() -> None:
    """With the position fetching starts from, load() already writes the first window: the first messages need
    no write of their own (a death among them still makes them suspects for the next owner)."""
    store = MemoryStore()
    pending: dict[str, list[int]] = {"tp": []}
    g = _guard(store, pending, ahead=6)
    await g.load("tp", committed=None, position=20)
    assert Ledger.decode(store.objects["state/crashloop/g/topic/0.json"]).window == (20, 26)
    before = store.puts
    assert all(g.covers("tp", offset) for offset in (20, 21, 22))
    assert store.puts == before
    pending["tp"] = [20, 21, 22]
    fresh = _guard(store, pending)
    await fresh.load("tp", committed=20)
    assert [fresh.verdict("tp", o) for o in (20, 22, 25, 26)] == ["suspect"] * 3 + ["ok"]


async def test_a_whole_fetch_past_half_the_window_starts_one_extension() -> None:
    """Every message of a fetch passes the half-window mark; one background write serves them all, and it
    covers the newest offset noted before it started."""
    store = MemoryStore()
    pending: dict[str, list[int]] = {"tp": []}
    g = _guard(store, pending, ahead=10)
    await g.load("tp", committed=0, position=0)
    before = store.puts
    for offset in range(10):  # the window is [0, 10): 5..9 are past its half, each one would start a write
        pending["tp"].append(offset)
        assert g.covers("tp", offset)
    await asyncio.sleep(0.01)
    assert store.puts - before == 1
    assert Ledger.decode(store.objects["state/crashloop/g/topic/0.json"]).window == (0, 20)


async def test_callers_past_the_window_join_the_write_that_has_not_started() -> None:
    """Messages beyond the window while a write is queued behind another wait for that write, not one each."""
    store = MemoryStore()
    pending: dict[str, list[int]] = {"tp": []}
    g = _guard(store, pending, ahead=4)
    await g.load("tp", committed=0, position=0)
    before = store.puts
    pending["tp"] = list(range(30))
    await asyncio.gather(*(g.record("tp", offset) for offset in range(30)))
    assert store.puts - before == 1
    assert Ledger.decode(store.objects["state/crashloop/g/topic/0.json"]).window == (0, 34)


async def test_a_partition_handed_over_during_the_wait_is_not_recorded() -> None:
    """A message whose partition is released while it waits for its record is refused (Released), so it is
    not handled by a member that no longer owns it."""
    store = MemoryStore()
    pending: dict[str, list[int]] = {"tp": [5]}
    g = _guard(store, pending, ahead=2)
    await g.load("tp", committed=5)
    waiting = asyncio.ensure_future(g.record("tp", 5))
    await asyncio.sleep(0)
    await g.release("tp", committed=5)
    with pytest.raises(Released):
        await waiting


async def test_a_partition_taken_over_again_during_the_wait_is_recorded_in_the_new_state() -> None:
    """A message waiting for its record while its partition's record is read anew (a new assignment of the same
    partition) is recorded in the new state and goes on, instead of being dropped."""
    store = MemoryStore()
    pending: dict[str, list[int]] = {"tp": [5]}
    g = _guard(store, pending, ahead=2)
    await g.load("tp", committed=5)
    waiting = asyncio.ensure_future(g.record("tp", 5))
    await asyncio.sleep(0)
    await g.load("tp", committed=5)
    await asyncio.wait_for(waiting, 1)
    assert g.covers("tp", 5)
    assert Ledger.decode(store.objects["state/crashloop/g/topic/0.json"]).window == (5, 8)


async def test_only_a_partition_with_deaths_needs_verdicts() -> None:
    """`has_deaths` is False for a partition nothing died in (every verdict there is "ok", so the consumer skips
    asking per record) and for one it does not own; True once a previous owner's in-flight offsets are read."""
    store = MemoryStore()
    pending: dict[str, list[int]] = {"tp": []}
    g = _guard(store, pending)
    assert not g.has_deaths("tp")
    await g.load("tp", committed=0)
    assert not g.has_deaths("tp")
    pending["tp"] = [0, 1]
    await g.record("tp", 1)  # ... and the daemon dies with 0 and 1 in flight
    g = _guard(store, pending)
    await g.load("tp", committed=0)
    assert g.has_deaths("tp")
    assert g.verdict("tp", 0) == "suspect"
    g.forget("tp")
    assert not g.has_deaths("tp")
