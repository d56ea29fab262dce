"""An OCR handler whose default engine is a scripted stand-in (Tesseract stays available by name): for tests
that exercise fetching, rendering and memory bounds without paying for recognition of every page."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from ocrbooth.handlers.ocr import OcrHandler, load_engines
from ocrbooth.models.ocr.engine import OcrEngine, PageInput, PageOutput, StepStats
from ocrbooth.models.ocr.worker import PoolWorker

DELAY_ENV = "OCRBOOTH_TEST_ENGINE_DELAY_MS"


class ScriptedEngine:
    """Answers every page with its pixel size, after a fixed delay per page (a slow engine, on demand)."""

    name = "scripted"
    model: str | None = "scripted-1"

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s

    def load(self) -> None:
        """Nothing to load."""

    def cost(self, page: PageInput) -> int:
        return 1

    def worker(self, *, span_threshold: float, on_step: Callable[[StepStats], None] | None = None) -> PoolWorker:
        """Pages run as they come, two at a time (like a small Tesseract pool)."""
        return PoolWorker(self, span_threshold=span_threshold, threads=2, on_step=on_step)

    def recognize(self, pages: list[PageInput], *, span_threshold: float) -> list[PageOutput]:
        time.sleep(self.delay_s * len(pages))
        return [
            PageOutput(text=f"{p.image.width}x{p.image.height}", finish_reason="stop", confidence=1.0, token_count=1)
            for p in pages
        ]


class ScriptedOcrHandler(OcrHandler):
    """OcrHandler serving `scripted` as its default engine, next to the configured ones."""

    def create_engines(self) -> tuple[str, dict[str, OcrEngine]]:
        _, engines = load_engines(self.cfg)
        delay_s = float(os.environ.get(DELAY_ENV, "0")) / 1000
        return "scripted", {**engines, "scripted": ScriptedEngine(delay_s)}
