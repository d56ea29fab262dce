"""The LightOnOCR engine's scheduler and KV bookkeeping: pure policy, no torch, no device."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ocrbooth.models.ocr.lightonocr.kv_cache import TRASH_BLOCK, BlockAllocator, KVCacheSpec, kv_budget_bytes
from ocrbooth.models.ocr.lightonocr.scheduler import Finished, Request, Scheduler, SchedulerConfig, Status, StepResult


def scheduler(*, slots: int = 4, blocks: int = 101, prefill_tokens: int = 1000, in_flight: int = 1) -> Scheduler:
    config = SchedulerConfig(
        max_slots=slots,
        block_size=16,
        max_blocks_per_slot=64,
        max_prefill_tokens=prefill_tokens,
        max_prefills_in_flight=in_flight,
    )
    return Scheduler(config, BlockAllocator(blocks))


def add(s: Scheduler, request_id: int, prompt: int = 100, new: int = 60, *, ready: bool = True) -> Request:
    request = Request(request_id, prompt, new, ready=ready)
    assert s.add_request(request) is None
    return request


def prefilled(s: Scheduler, *ids: int) -> None:
    s.update_from_output(StepResult(prefilled=list(ids), prefill_batches_done=1))


def test_pages_enter_free_slots_at_any_step_and_finishing_frees_them_at_once() -> None:
    """A page joins as soon as a slot is free, while others decode; a finished page's slot and blocks go to
    the next page in the very next step."""
    s = scheduler(slots=2)
    for i in range(3):
        add(s, i)
    first = s.schedule()
    assert [(a.request_id, a.slot) for a in first.admitted] == [(0, 0), (1, 1)]
    assert all(len(a.blocks) == 10 for a in first.admitted)  # (100 + 60) / 16 positions per block
    prefilled(s, 0, 1)
    assert s.schedule().admitted == ()  # no slot free: page 2 waits
    free_before = s.allocator.free
    done = s.update_from_output(StepResult(finished=[Finished(1, "stop")]))
    assert [r.request_id for r in done] == [1]
    assert s.allocator.free == free_before + 10
    step = s.schedule()
    assert [(a.request_id, a.slot) for a in step.admitted] == [(2, 1)]  # slot 1 again, mid-decode of page 0
    assert step.decode
    assert s.requests[0].status is Status.DECODING


def test_kv_budget_admits_first_come_first_served() -> None:
    """Admission stops at the first page whose reserve does not fit the free blocks; smaller pages behind it
    wait, so a large page is never starved."""
    s = scheduler(slots=8, blocks=31)  # 30 usable blocks = 480 positions
    add(s, 0, prompt=200, new=100)  # 19 blocks
    add(s, 1, prompt=200, new=100)  # 19 more: does not fit
    add(s, 2, prompt=10, new=10)  # would fit, but waits behind page 1
    assert [a.request_id for a in s.schedule().admitted] == [0]
    prefilled(s, 0)
    assert s.schedule().admitted == ()
    s.update_from_output(StepResult(finished=[Finished(0, "length")]))
    assert [a.request_id for a in s.schedule().admitted] == [1, 2]


def test_prefill_budget_and_prefills_in_flight() -> None:
    """A step prefills at most max_prefill_tokens (a longer page still goes, alone), and no new prefill batch
    starts while one is in flight."""
    s = scheduler(slots=8, blocks=400, prefill_tokens=250)
    for i in range(4):
        add(s, i, prompt=100)
    assert [a.request_id for a in s.schedule().admitted] == [0, 1]
    assert s.schedule().admitted == ()  # the first batch has not finished its prefill
    prefilled(s, 0, 1)
    assert [a.request_id for a in s.schedule().admitted] == [2, 3]
    big = scheduler(prefill_tokens=50)
    add(big, 7, prompt=400)
    assert [a.request_id for a in big.schedule().admitted] == [7]


def test_only_ready_pages_are_admitted() -> None:
    """A page whose preprocessing has not finished is skipped; ready pages behind it go."""
    s = scheduler()
    add(s, 0, ready=False)
    add(s, 1)
    assert [a.request_id for a in s.schedule().admitted] == [1]
    s.mark_ready(0)
    prefilled(s, 1)
    assert [a.request_id for a in s.schedule().admitted] == [0]


def test_a_page_larger_than_any_slot_is_refused_and_abort_frees_everything() -> None:
    """A page over the pool or the block table is refused with a reason and never queued; aborting a page
    returns its slot and blocks."""
    s = scheduler(blocks=50)
    reason = s.add_request(Request(9, 700, 400))
    assert reason is not None
    assert "a slot holds at most" in reason
    assert 9 not in s.requests
    add(s, 1)
    s.schedule()
    free = s.allocator.free
    s.abort(1)
    assert s.allocator.free == free + 10
    assert not s.has_work()
    assert s.slots_in_use == 0


def test_block_allocator_never_hands_out_the_trash_block() -> None:
    """Block 0 is where idle slots write; it is never allocated, and an allocation is all or nothing."""
    allocator = BlockAllocator(5)
    got = allocator.allocate(4)
    assert got is not None
    assert TRASH_BLOCK not in got
    assert allocator.allocate(1) is None
    allocator.release(got[:2])
    assert allocator.allocate(3) is None
    assert allocator.free == 2


def test_kv_sizing_follows_memory() -> None:
    """The KV budget is the configured share of the card minus weights and activations, capped by what is
    free; bytes per token count K and V of every layer."""
    spec = KVCacheSpec(layers=28, kv_heads=8, head_dim=128, dtype_bytes=2, block_size=64)
    assert spec.bytes_per_token == 114_688
    assert spec.blocks_for(65) == 2
    gib = 1 << 30
    budget = kv_budget_bytes(
        total_bytes=140 * gib,
        free_bytes=137 * gib,
        used_bytes=3 * gib,
        activation_bytes=6 * gib,
        fraction=0.9,
        margin_bytes=1 * gib,
    )
    assert budget == int(140 * gib * 0.9) - 10 * gib
    shared = kv_budget_bytes(
        total_bytes=140 * gib,
        free_bytes=40 * gib,
        used_bytes=3 * gib,
        activation_bytes=6 * gib,
        fraction=0.9,
        margin_bytes=gib,
    )
    assert shared == 33 * gib


def test_scheduler_imports_without_torch() -> None:
    """The policy modules are pure: importing them does not import torch."""
    code = (
        "import sys; import ocrbooth.models.ocr.lightonocr.scheduler, ocrbooth.models.ocr.lightonocr.kv_cache; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("bad", [0, 3])
def test_block_allocator_needs_a_usable_block(bad: int) -> None:
    """An allocator needs the trash block plus at least one real block."""
    if bad < 2:
        with pytest.raises(ValueError, match="at least 2"):
            BlockAllocator(bad)
    else:
        assert BlockAllocator(bad).capacity == 2
