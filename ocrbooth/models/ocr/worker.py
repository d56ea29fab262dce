"""A page worker for engines whose pages share no GPU work (Tesseract): each page runs on one of a few
threads as soon as it is submitted; there is nothing to batch, so nothing waits for batch-mates."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ocrbooth.errors import FatalError
from ocrbooth.models.ocr.engine import OcrEngine, PageInput, PageOutput, StepStats

log = logging.getLogger(__name__)


class PoolWorker:
    """`threads` pages at a time through `engine.recognize([page])`; a failing page fails alone."""

    def __init__(
        self,
        engine: OcrEngine,
        *,
        span_threshold: float,
        threads: int,
        on_step: Callable[[StepStats], None] | None = None,
    ) -> None:
        self._engine = engine
        self._span_threshold = span_threshold
        self._threads = threads
        self._on_step = on_step
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._fatal: FatalError | None = None
        self.busy_seconds = 0.0

    @property
    def engine(self) -> OcrEngine:
        return self._engine

    def start(self) -> None:
        self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix=f"ocr-{self._engine.name}")

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish submitted pages, then end the threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    async def submit(self, page: PageInput) -> PageOutput:
        if self._fatal is not None:
            raise self._fatal
        if self._pool is None:
            raise FatalError(f"OCR worker {self._engine.name} is not started")
        return await asyncio.wrap_future(self._pool.submit(self._one, page))

    def _one(self, page: PageInput) -> PageOutput:
        started = time.perf_counter()
        try:
            [output] = self._engine.recognize([page], span_threshold=self._span_threshold)
        except FatalError as exc:
            self._fatal = exc
            raise
        except Exception as exc:  # an engine bug on one page fails that page only
            log.warning("page failed in %s: %r", self._engine.name, exc)
            output = PageOutput(
                text="", finish_reason="error", error_code="ocr_failed", error_message=f"{type(exc).__name__}: {exc}"
            )
        elapsed = time.perf_counter() - started
        with self._lock:
            self.busy_seconds += elapsed
        if self._on_step is not None:
            self._on_step(StepStats(pages=1, seconds=elapsed, admitted=1, finished=1))
        return output
