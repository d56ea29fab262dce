"""Micro-batching of pages across documents, split like vLLM's v1 scheduler:

- `Scheduler.schedule(now) -> BatchPlan | None`: pure policy, no torch, unit-tested without a GPU;
- `BatchWorker._execute(plan)`: the only code that calls the engine (so the only code touching the GPU),
  on one worker thread per device;
- `Scheduler.update_from_output(plan, outputs)`: hands each page its output.

A batch starts when it is full (`max_batch_pages` pages or `max_batch_tokens` of image + output tokens, so
the KV cache fits) or when its oldest page has waited `max_wait_ms`. Pages with the same image-token count
are batched together first, to avoid padding waste. A failing batch is split in halves and retried, so one
bad page never fails its batch-mates; a page that fails alone gets its own error.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Literal

from ocrbooth.errors import FatalError
from ocrbooth.models.ocr.engine import OcrEngine, PageInput, PageOutput

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BatchLimits:
    max_batch_pages: int = 32
    max_batch_tokens: int = 200_000
    max_wait_ms: float = 50.0


@dataclass(slots=True)
class PendingPage:
    page_id: int
    page: PageInput
    cost: int
    group: int
    """Pages with equal group (image-token count) batch together first."""
    enqueued_at: float


@dataclass(frozen=True, slots=True)
class BatchPlan:
    pages: tuple[PendingPage, ...]
    reason: Literal["full", "waited", "drain"]

    @property
    def cost(self) -> int:
        return sum(p.cost for p in self.pages)


@dataclass
class Scheduler:
    """Pure batching policy over a queue of pending pages."""

    limits: BatchLimits
    waiting: list[PendingPage] = field(default_factory=list)

    def add(self, page: PendingPage) -> None:
        self.waiting.append(page)

    def next_deadline(self) -> float | None:
        """When the oldest page will have waited max_wait_ms (monotonic seconds), or None when idle."""
        if not self.waiting:
            return None
        return min(p.enqueued_at for p in self.waiting) + self.limits.max_wait_ms / 1000

    def schedule(self, now: float, *, drain: bool = False) -> BatchPlan | None:
        """The next batch to run, or None to keep waiting."""
        if not self.waiting:
            return None
        oldest = min(self.waiting, key=lambda p: p.enqueued_at)
        # Same-size pages first (oldest first within each), then the rest by age.
        order = sorted(self.waiting, key=lambda p: (p.group != oldest.group, p.enqueued_at, p.page_id))
        chosen: list[PendingPage] = []
        budget = self.limits.max_batch_tokens
        full = False
        for page in order:
            if len(chosen) == self.limits.max_batch_pages:
                full = True
                break
            if chosen and page.cost > budget:
                full = True
                continue
            chosen.append(page)  # a single page over the budget still runs, alone
            budget -= page.cost
        full = full or len(chosen) == self.limits.max_batch_pages or budget <= 0
        waited = now - oldest.enqueued_at >= self.limits.max_wait_ms / 1000
        if not (full or waited or drain):
            return None
        ids = {p.page_id for p in chosen}
        self.waiting = [p for p in self.waiting if p.page_id not in ids]
        return BatchPlan(tuple(chosen), "full" if full else "waited" if waited else "drain")

    @staticmethod
    def update_from_output(plan: BatchPlan, outputs: list[PageOutput]) -> list[tuple[int, PageOutput]]:
        """Pair each planned page with its output; a short or long output list is an engine bug."""
        if len(outputs) != len(plan.pages):
            raise RuntimeError(f"engine returned {len(outputs)} outputs for {len(plan.pages)} pages")
        return [(p.page_id, out) for p, out in zip(plan.pages, outputs, strict=True)]


@dataclass(frozen=True, slots=True)
class BatchStats:
    """Reported after every executed batch (for metrics)."""

    pages: int
    tokens: int
    reason: str
    seconds: float
    splits: int


class BatchWorker:
    """One thread per device: plans batches, runs the engine, resolves waiters.

    `submit()` is a plain coroutine for the event loop; the thread never touches the loop except through
    `call_soon_threadsafe`, and the engine never runs on the loop.
    """

    def __init__(
        self,
        engine: OcrEngine,
        limits: BatchLimits,
        *,
        span_threshold: float,
        on_batch: Callable[[BatchStats], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self._scheduler = Scheduler(limits)
        self._span_threshold = span_threshold
        self._on_batch = on_batch
        self._clock = clock
        self._cond = threading.Condition()
        self._futures: dict[int, Future[PageOutput]] = {}
        self._ids = itertools.count()
        self._stopping = False
        self._fatal: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"ocr-{engine.name}", daemon=True)
        self.busy_seconds = 0.0

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish what is queued, then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout_s)

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._scheduler.waiting)

    async def submit(self, page: PageInput) -> PageOutput:
        """Queue one page and wait for its output."""
        future: Future[PageOutput] = Future()
        with self._cond:
            if self._fatal is not None:
                raise FatalError(f"OCR engine {self.engine.name} is broken: {self._fatal}")
            if self._stopping:
                raise FatalError("OCR worker is stopping")
            page_id = next(self._ids)
            self._futures[page_id] = future
            group = page.image.width * 100_000 + page.image.height  # equal sizes give equal image-token counts
            self._scheduler.add(PendingPage(page_id, page, self.engine.cost(page), group, self._clock()))
            self._cond.notify_all()
        return await asyncio.wrap_future(future)

    # ---- the worker thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    now = self._clock()
                    plan = self._scheduler.schedule(now, drain=self._stopping)
                    if plan is not None:
                        break
                    if self._stopping and not self._scheduler.waiting:
                        return
                    deadline = self._scheduler.next_deadline()
                    self._cond.wait(None if deadline is None else max(0.0, deadline - now))
            self._run_plan(plan)

    def _run_plan(self, plan: BatchPlan) -> None:
        started = self._clock()
        splits = [0]
        try:
            outputs = self._execute(list(plan.pages), splits)
        except FatalError as exc:
            with self._cond:
                self._fatal = exc
            for page in plan.pages:
                self._resolve(page.page_id, exc=exc)
            self._fail_all(exc)
            return
        elapsed = self._clock() - started
        self.busy_seconds += elapsed
        for page_id, output in Scheduler.update_from_output(plan, outputs):
            self._resolve(page_id, output=output)
        if self._on_batch is not None:
            self._on_batch(BatchStats(len(plan.pages), plan.cost, plan.reason, elapsed, splits[0]))

    def _execute(self, pages: list[PendingPage], splits: list[int]) -> list[PageOutput]:
        """Run the engine; on a whole-batch failure split in halves so one bad page fails alone."""
        try:
            return self.engine.recognize([p.page for p in pages], span_threshold=self._span_threshold)
        except FatalError:
            raise
        except Exception as exc:
            if len(pages) == 1:
                log.warning("page failed alone: %r", exc)
                return [
                    PageOutput(
                        text="",
                        finish_reason="error",
                        error_code=_error_code(exc),
                        error_message=f"{type(exc).__name__}: {exc}",
                    )
                ]
            splits[0] += 1
            log.warning("batch of %d failed (%r); splitting", len(pages), exc)
            _release_memory()
            half = len(pages) // 2
            return self._execute(pages[:half], splits) + self._execute(pages[half:], splits)

    def _resolve(self, page_id: int, *, output: PageOutput | None = None, exc: BaseException | None = None) -> None:
        with self._cond:
            future = self._futures.pop(page_id, None)
        if future is None or future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            assert output is not None
            future.set_result(output)

    def _fail_all(self, exc: BaseException) -> None:
        with self._cond:
            waiting, self._scheduler.waiting = self._scheduler.waiting, []
        for page in waiting:
            self._resolve(page.page_id, exc=exc)


def _error_code(exc: BaseException) -> str:
    return "out_of_memory" if "out of memory" in str(exc).lower() else "ocr_failed"


def _release_memory() -> None:
    """After an out-of-memory, give cached blocks back before retrying smaller batches."""
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
