"""Confidence from per-token probabilities: page score, minimum, and low-confidence character spans. Pure."""

from __future__ import annotations

import math
from collections.abc import Sequence

from ocrbooth.models.ocr.engine import LowConfidenceSpan

_FLOOR = 1e-12  # log(0) guard: a probability that underflowed still counts as "very unsure"


def geometric_mean(probs: Sequence[float]) -> float | None:
    """exp(mean(log p)); None for no tokens."""
    if not probs:
        return None
    return math.exp(sum(math.log(max(p, _FLOOR)) for p in probs) / len(probs))


def low_confidence_spans(
    probs: Sequence[float], char_spans: Sequence[tuple[int, int]], *, threshold: float
) -> list[LowConfidenceSpan]:
    """Merge touching or overlapping character ranges of tokens below `threshold` into spans; each span's
    confidence is the geometric mean of its tokens. Tokens with empty ranges (special tokens) are skipped."""
    if len(probs) != len(char_spans):
        raise ValueError(f"{len(probs)} probabilities for {len(char_spans)} character spans")
    spans: list[LowConfidenceSpan] = []
    current: list[float] = []
    start = end = 0
    for p, (s, e) in zip(probs, char_spans, strict=True):
        if e <= s:
            continue
        if p < threshold:
            if current and s <= end:
                end = max(end, e)
                current.append(p)
                continue
            if current:
                spans.append(LowConfidenceSpan(start, end, geometric_mean(current) or 0.0))
            start, end, current = s, e, [p]
        elif current:
            spans.append(LowConfidenceSpan(start, end, geometric_mean(current) or 0.0))
            current = []
    if current:
        spans.append(LowConfidenceSpan(start, end, geometric_mean(current) or 0.0))
    return spans


def summarize(
    probs: Sequence[float], char_spans: Sequence[tuple[int, int]], *, threshold: float
) -> tuple[float | None, float | None, list[LowConfidenceSpan]]:
    """(page confidence, minimum token confidence, low-confidence spans)."""
    return (
        geometric_mean(probs),
        (min(probs) if probs else None),
        low_confidence_spans(probs, char_spans, threshold=threshold),
    )
