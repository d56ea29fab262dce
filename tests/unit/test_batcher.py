"""Micro-batching policy (pure) and the worker thread around a fake engine."""

from __future__ import annotations

import asyncio
import threading

import pytest
from PIL import Image

from ocrbooth.errors import FatalError
from ocrbooth.models.ocr.batcher import BatchLimits, BatchPlan, BatchStats, BatchWorker, PendingPage, Scheduler
from ocrbooth.models.ocr.engine import PageInput, PageOutput


def _page(page_id: int, *, cost: int = 10, group: int = 0, at: float = 0.0) -> PendingPage:
    return PendingPage(page_id, PageInput(Image.new("RGB", (4, 4))), cost, group, at)


def test_waits_until_full_or_the_oldest_page_waited_long_enough() -> None:
    """No batch before max_wait_ms unless full; after it, whatever is queued goes."""
    s = Scheduler(BatchLimits(max_batch_pages=4, max_batch_tokens=1000, max_wait_ms=50))
    s.add(_page(1, at=0.0))
    s.add(_page(2, at=0.01))
    assert s.schedule(0.049) is None
    assert s.next_deadline() == pytest.approx(0.05)
    plan = s.schedule(0.05)
    assert plan is not None
    assert [p.page_id for p in plan.pages] == [1, 2]
    assert plan.reason == "waited"
    assert s.waiting == []


def test_full_by_pages_starts_at_once_and_leaves_the_rest() -> None:
    """A batch starts as soon as max_batch_pages are queued; extra pages wait for the next one."""
    s = Scheduler(BatchLimits(max_batch_pages=3, max_batch_tokens=10_000, max_wait_ms=1000))
    for i in range(5):
        s.add(_page(i, at=i / 1000))
    plan = s.schedule(0.0)
    assert plan is not None
    assert plan.reason == "full"
    assert [p.page_id for p in plan.pages] == [0, 1, 2]
    assert [p.page_id for p in s.waiting] == [3, 4]


def test_token_budget_limits_the_batch_and_an_oversize_page_runs_alone() -> None:
    """max_batch_tokens caps a batch's image+output tokens; a page over the whole budget still runs, alone."""
    s = Scheduler(BatchLimits(max_batch_pages=10, max_batch_tokens=100, max_wait_ms=0))
    s.add(_page(1, cost=60, at=0))
    s.add(_page(2, cost=60, at=1))
    s.add(_page(3, cost=30, at=2))
    plan = s.schedule(10)
    assert plan is not None
    assert [p.page_id for p in plan.pages] == [1, 3]
    assert plan.cost == 90
    s2 = Scheduler(BatchLimits(max_batch_pages=10, max_batch_tokens=100, max_wait_ms=0))
    s2.add(_page(9, cost=500))
    plan2 = s2.schedule(0)
    assert plan2 is not None
    assert [p.page_id for p in plan2.pages] == [9]


def test_pages_of_the_oldest_pages_size_are_batched_first() -> None:
    """Equal image-token counts go together (no padding waste), ahead of older pages of other sizes."""
    s = Scheduler(BatchLimits(max_batch_pages=3, max_batch_tokens=10_000, max_wait_ms=0))
    s.add(_page(1, group=7, at=0))
    s.add(_page(2, group=8, at=1))
    s.add(_page(3, group=8, at=2))
    s.add(_page(4, group=7, at=3))
    s.add(_page(5, group=7, at=4))
    plan = s.schedule(100)
    assert plan is not None
    assert [p.page_id for p in plan.pages] == [1, 4, 5]


def test_update_from_output_pairs_pages_and_rejects_a_wrong_count() -> None:
    """Outputs map back to their pages in order; an engine returning the wrong number is an error."""
    plan = BatchPlan((_page(1), _page(2)), "full")
    outs = [PageOutput("a", "stop"), PageOutput("b", "stop")]
    assert Scheduler.update_from_output(plan, outs) == [(1, outs[0]), (2, outs[1])]
    with pytest.raises(RuntimeError, match="1 outputs for 2 pages"):
        Scheduler.update_from_output(plan, outs[:1])


class FakeEngine:
    """Echoes the image width as text; fails whole batches that contain a width-13 page."""

    name = "fake"
    model = None

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.lock = threading.Lock()
        self.fatal = False

    def load(self) -> None:
        pass

    def cost(self, page: PageInput) -> int:
        return 1

    def recognize(self, pages: list[PageInput], *, span_threshold: float) -> list[PageOutput]:
        with self.lock:
            self.batches.append(len(pages))
        if self.fatal:
            raise FatalError("device lost")
        if any(p.image.width == 13 for p in pages):
            raise RuntimeError("CUDA out of memory (simulated)")
        return [PageOutput(str(p.image.width), "stop", confidence=0.9, token_count=1) for p in pages]


async def test_pages_from_concurrent_documents_share_batches() -> None:
    """Pages submitted concurrently are recognised together, each getting its own output."""
    engine = FakeEngine()
    stats: list[BatchStats] = []
    worker = BatchWorker(
        engine, BatchLimits(max_batch_pages=8, max_wait_ms=20), span_threshold=0.5, on_batch=stats.append
    )
    worker.start()
    try:
        outs = await asyncio.gather(*(worker.submit(PageInput(Image.new("RGB", (20 + i, 4)))) for i in range(16)))
    finally:
        await asyncio.to_thread(worker.stop)
    assert [o.text for o in outs] == [str(20 + i) for i in range(16)]
    assert max(engine.batches) > 1
    assert sum(s.pages for s in stats) == 16


async def test_a_failing_page_is_isolated_by_splitting_the_batch() -> None:
    """A batch that raises is split in halves until the bad page fails alone; its batch-mates succeed."""
    engine = FakeEngine()
    worker = BatchWorker(engine, BatchLimits(max_batch_pages=8, max_wait_ms=50), span_threshold=0.5)
    worker.start()
    try:
        widths = [20, 21, 13, 22, 23, 24, 25, 26]
        outs = await asyncio.gather(*(worker.submit(PageInput(Image.new("RGB", (w, 4)))) for w in widths))
    finally:
        await asyncio.to_thread(worker.stop)
    bad = outs[2]
    assert bad.finish_reason == "error"
    assert bad.error_code == "out_of_memory"
    assert [o.text for i, o in enumerate(outs) if i != 2] == [str(w) for w in widths if w != 13]
    assert 1 in engine.batches


async def test_fatal_engine_error_fails_waiters_and_later_submissions() -> None:
    """A FatalError (device lost) reaches every waiting page and every later submit."""
    engine = FakeEngine()
    engine.fatal = True
    worker = BatchWorker(engine, BatchLimits(max_batch_pages=4, max_wait_ms=10), span_threshold=0.5)
    worker.start()
    try:
        results = await asyncio.gather(
            *(worker.submit(PageInput(Image.new("RGB", (5, 5)))) for _ in range(3)), return_exceptions=True
        )
        assert all(isinstance(r, FatalError) for r in results)
        with pytest.raises(FatalError):
            await worker.submit(PageInput(Image.new("RGB", (5, 5))))
    finally:
        await asyncio.to_thread(worker.stop)
