"""The OCR engine protocol: pages in, text with confidence out. The handler never knows which engine runs.

Engines are synchronous and run in the daemon's per-device worker thread (never on the event loop).
`recognize` takes a batch the batcher planned and returns one output per input, in order; a page that
fails alone gets `error` set instead of raising, so its batch-mates are unaffected.
"""

from __future__ import annotations

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
        """Token budget of a page (image tokens + max output), for the batcher's max_batch_tokens."""

    def recognize(self, pages: list[PageInput], *, span_threshold: float) -> list[PageOutput]:
        """Recognise a batch; one output per input, same order. Raises only for whole-batch failures
        (out of memory, CUDA errors), which the batcher handles by splitting the batch."""
