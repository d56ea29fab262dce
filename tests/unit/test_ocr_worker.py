"""The page worker for CPU engines (Tesseract): pages run as they come, a failing page fails alone."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest
from PIL import Image

from ocrbooth.errors import FatalError
from ocrbooth.models.ocr.engine import PageInput, PageOutput, PageWorker, StepStats
from ocrbooth.models.ocr.worker import PoolWorker


class FakeEngine:
    """Echoes the image width; raises on width 13; fatal when told; counts pages running at once."""

    name = "fake"
    model = None

    def __init__(self) -> None:
        self.fatal = False
        self.running = 0
        self.most = 0
        self.lock = threading.Lock()
        self.release = threading.Event()

    def load(self) -> None:
        pass

    def cost(self, page: PageInput) -> int:
        return 1

    def recognize(self, pages: list[PageInput], *, span_threshold: float) -> list[PageOutput]:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            self.release.wait(5)
            if self.fatal:
                raise FatalError("device lost")
            if pages[0].image.width == 13:
                raise RuntimeError("engine bug")
            return [PageOutput(str(p.image.width), "stop", confidence=0.9, token_count=1) for p in pages]
        finally:
            with self.lock:
                self.running -= 1

    def worker(self, *, span_threshold: float, on_step: Callable[[StepStats], None] | None = None) -> PageWorker:
        return PoolWorker(self, span_threshold=span_threshold, threads=3, on_step=on_step)


async def test_pages_run_in_parallel_and_a_failing_page_fails_alone() -> None:
    """Pages run up to `threads` at once as they are submitted; an engine exception fails only its page."""
    engine = FakeEngine()
    stats: list[StepStats] = []
    worker = engine.worker(span_threshold=0.5, on_step=stats.append)
    worker.start()
    try:
        widths = [20, 21, 13, 22, 23]
        pending = [asyncio.ensure_future(worker.submit(PageInput(Image.new("RGB", (w, 4))))) for w in widths]
        await asyncio.sleep(0)
        engine.release.set()
        outs = await asyncio.gather(*pending)
    finally:
        await asyncio.to_thread(worker.stop)
    assert [o.text for i, o in enumerate(outs) if i != 2] == ["20", "21", "22", "23"]
    assert outs[2].error_code == "ocr_failed"
    assert engine.most == 3
    assert len(stats) == 5


async def test_fatal_engine_error_reaches_the_page_and_later_submits() -> None:
    """A FatalError (device lost) fails its page and every later submit."""
    engine = FakeEngine()
    engine.fatal = True
    engine.release.set()
    worker = engine.worker(span_threshold=0.5)
    worker.start()
    try:
        with pytest.raises(FatalError):
            await worker.submit(PageInput(Image.new("RGB", (5, 5))))
        with pytest.raises(FatalError):
            await worker.submit(PageInput(Image.new("RGB", (5, 5))))
    finally:
        await asyncio.to_thread(worker.stop)
