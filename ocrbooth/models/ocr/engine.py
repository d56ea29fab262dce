"""The OCR engine protocol: pages in, text with confidence out. The handler never knows which engine runs.

Each engine hands the handler a `PageWorker` (`engine.worker(...)`): `start()`, `stop()` and an awaitable
`submit(page)`. LightOnOCR's worker is its engine core (continuous batching on one thread per device);
Tesseract's runs pages on its own threads as they come. Engines never run on the event loop. A page that
fails gets an output with `error_code` set; it never fails another page.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from PIL.Image import Image

FinishReason = Literal["stop", "length", "repetition", "error"]
Rotation = Literal[0, 90, 180, 270]
"""Clockwise degrees a page image was turned to make it upright."""


@dataclass(frozen=True, slots=True)
class PageInput:
    """One rendered page to recognise."""

    image: Image
    """RGB image, already bounded to the render size."""
    languages: tuple[str, ...] = ()
    """ISO 639-2 codes (eng, fra, deu, spa, ita, nld, por, swe, dan); empty lets the engine decide (its
    configured default, or detection per page)."""
    max_new_tokens: int = 4096
    """Output budget for generative engines."""


@dataclass(frozen=True, slots=True)
class LowConfidenceSpan:
    """Characters [start, end) of the page text whose tokens fell below the span threshold."""

    start: int
    end: int
    confidence: float


@dataclass(slots=True)
class PageOutput:
    """What an engine made of one page."""

    text: str
    finish_reason: FinishReason
    confidence: float | None = None
    """Geometric mean of token (or word) probabilities, 0..1."""
    min_token_confidence: float | None = None
    low_confidence_spans: list[LowConfidenceSpan] = field(default_factory=list)
    token_count: int = 0
    languages: tuple[str, ...] = ()
    """Languages the engine detected and read the page with; empty when the page named them or the engine
    needs none."""
    rotation_deg: Rotation | None = None
    """Clockwise rotation applied before recognition (0, 90, 180, 270); None when the engine does not check."""
    error_code: str | None = None
    error_message: str | None = None


@dataclass(frozen=True, slots=True)
class StepStats:
    """Reported by a worker after each engine step (for metrics)."""

    pages: int
    """Pages the step worked on (LightOnOCR: pages decoding; Tesseract: 1)."""
    seconds: float
    """Wall time of the step."""
    splits: int = 0
    """Batches retried page by page after a failure in this step."""
    tokens: int = 0
    """Decode steps run (LightOnOCR)."""
    admitted: int = 0
    """Pages that entered the GPU in this step."""
    finished: int = 0
    step: int = 0


class PageWorker(Protocol):
    """What the OCR handler talks to: one per engine, started once, stopped in shutdown."""

    @property
    def engine(self) -> OcrEngine: ...

    def start(self) -> None:
        """Start the worker's threads."""

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish what was submitted, then end the threads."""

    async def submit(self, page: PageInput) -> PageOutput:
        """Recognise one page (raises FatalError when the engine is broken)."""


@runtime_checkable
class OcrEngine(Protocol):
    """One small protocol for `lightonocr`, `tesseract` and test engines."""

    name: str
    """Engine name reported in results."""
    model: str | None
    """Model id or version reported in results."""

    def load(self) -> None:
        """Load weights or check binaries; raise ConfigError/FatalError when unusable. Called once, off-loop."""

    def cost(self, page: PageInput) -> int:
        """What a page costs the engine (LightOnOCR: image tokens + max output), for logs and tests."""

    def recognize(self, pages: list[PageInput], *, span_threshold: float) -> list[PageOutput]:
        """Recognise pages synchronously; one output per input, same order (tests, benchmarks, CLI)."""

    def worker(self, *, span_threshold: float, on_step: Callable[[StepStats], None] | None = None) -> PageWorker:
        """The worker that serves this engine's pages to the handler."""
