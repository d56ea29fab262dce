"""Token ids to text with per-token character spans, and a finished page to its PageOutput. Runs on the
engine's output threads, never on the thread that feeds the GPU."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ocrbooth.models.ocr.confidence import summarize
from ocrbooth.models.ocr.engine import FinishReason, PageOutput


@dataclass(slots=True)
class PageGeneration:
    """What the decoder produced for one page, before it becomes a PageOutput."""

    token_ids: list[int]
    """Generated ids, a final stop token included."""
    token_probs: list[float]
    """Probability of each generated id (softmax over the vocabulary, float32)."""
    finish_reason: FinishReason
    text: str = ""
    """Detokenized text of the content tokens (special tokens skipped)."""
    char_spans: list[tuple[int, int]] | None = None
    """[start, end) of `text` for each content token."""
    error_code: str | None = None
    error_message: str | None = None

    @property
    def content_ids(self) -> list[int]:
        """Generated ids without the final stop token."""
        return self.token_ids[:-1] if self.finish_reason == "stop" else self.token_ids

    @property
    def content_probs(self) -> list[float]:
        return self.token_probs[:-1] if self.finish_reason == "stop" else self.token_probs


def failed(code: str, message: str) -> PageGeneration:
    return PageGeneration([], [], "error", error_code=code, error_message=message)


class Detokenizer:
    """Streaming detokenization with the tokenizer's own decoder, so text equals a plain decode."""

    def __init__(self, tokenizer: Any) -> None:
        self._backend = tokenizer.backend_tokenizer
        added = self._backend.get_added_tokens_decoder()
        self._special_ids = frozenset(int(i) for i, token in added.items() if token.special)

    def finish(self, gen: PageGeneration) -> PageGeneration:
        """Fill in text and character spans (in place) and return the page."""
        if gen.error_code is None:
            gen.text, gen.char_spans = self.detokenize(gen.content_ids)
        return gen

    def detokenize(self, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
        """Text of `ids` (special tokens skipped) and each token's [start, end) in it, by streaming decode:
        tokens that only complete a character together share that character's range."""
        from tokenizers.decoders import DecodeStream

        stream = DecodeStream(skip_special_tokens=True)
        pieces: list[str] = []
        spans: list[tuple[int, int]] = [(0, 0)] * len(ids)
        length = 0
        pending: list[int] = []
        for index, token in enumerate(ids):
            if token in self._special_ids:
                spans[index] = (length, length)
                continue
            pending.append(index)
            chunk = stream.step(self._backend, token)
            if chunk:
                for i in pending:
                    spans[i] = (length, length + len(chunk))
                pieces.append(chunk)
                length += len(chunk)
                pending = []
        text = "".join(pieces)
        if pending:  # bytes that never completed a character: whatever the full decode makes of them
            full = self._backend.decode(list(ids), skip_special_tokens=True)
            if full.startswith(text) and len(full) > len(text):
                for i in pending:
                    spans[i] = (len(text), len(full))
                text = full
            else:
                for i in pending:
                    spans[i] = (length, length)
        return text, spans


def to_output(gen: PageGeneration, *, span_threshold: float) -> PageOutput:
    """The engine-neutral result: text, finish reason and confidences from the token probabilities."""
    if gen.error_code is not None:
        return PageOutput(text="", finish_reason="error", error_code=gen.error_code, error_message=gen.error_message)
    confidence, minimum, low = summarize(gen.content_probs, gen.char_spans or [], threshold=span_threshold)
    return PageOutput(
        text=gen.text,
        finish_reason=gen.finish_reason,
        confidence=confidence,
        min_token_confidence=minimum,
        low_confidence_spans=low,
        token_count=len(gen.token_ids),
    )
