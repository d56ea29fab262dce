"""Confidence maths: geometric mean, minimum, and merging low-confidence tokens into character spans."""

from __future__ import annotations

import math

import pytest

from ocrbooth.models.ocr.confidence import geometric_mean, low_confidence_spans, summarize
from ocrbooth.models.ocr.engine import LowConfidenceSpan


@pytest.mark.parametrize(
    ("probs", "expected"),
    [
        ([1.0, 1.0, 1.0], 1.0),
        ([0.5], 0.5),
        ([0.25, 1.0], 0.5),
        ([0.9, 0.9, 0.9, 0.9], 0.9),
        ([0.1, 0.4, 0.8, 0.2], (0.1 * 0.4 * 0.8 * 0.2) ** 0.25),
    ],
)
def test_geometric_mean_known_values(probs: list[float], expected: float) -> None:
    """The page score is the n-th root of the product of token probabilities."""
    assert geometric_mean(probs) == pytest.approx(expected)


def test_geometric_mean_of_no_tokens_is_none() -> None:
    """An empty page has no confidence rather than 0 or 1."""
    assert geometric_mean([]) is None


def test_geometric_mean_survives_zero_probability() -> None:
    """A zero probability is floored instead of raising on log(0); the mean stays positive and tiny."""
    value = geometric_mean([0.0, 1.0])
    assert value is not None
    assert 0.0 < value < 1e-5
    assert math.isfinite(value)


def test_summarize_reports_mean_minimum_and_spans() -> None:
    """summarize returns the geometric mean, the smallest token probability and the spans below threshold."""
    probs = [0.9, 0.4, 0.8]
    confidence, minimum, spans = summarize(probs, [(0, 3), (4, 7), (8, 11)], threshold=0.5)
    assert confidence == pytest.approx((0.9 * 0.4 * 0.8) ** (1 / 3))
    assert minimum == 0.4
    assert spans == [LowConfidenceSpan(4, 7, 0.4)]


def test_summarize_of_nothing() -> None:
    """No tokens: no confidence, no minimum, no spans."""
    assert summarize([], [], threshold=0.5) == (None, None, [])


def test_adjacent_low_tokens_merge_into_one_span() -> None:
    """Low tokens whose ranges touch merge into one span whose confidence is their geometric mean."""
    spans = low_confidence_spans([0.2, 0.8, 0.95], [(0, 4), (4, 6), (6, 9)], threshold=0.9)
    assert len(spans) == 1
    assert (spans[0].start, spans[0].end) == (0, 6)
    assert spans[0].confidence == pytest.approx(0.4)


def test_overlapping_low_tokens_merge() -> None:
    """Overlapping ranges (sub-word tokens sharing characters) merge into one span covering both."""
    spans = low_confidence_spans([0.1, 0.1], [(0, 5), (3, 8)], threshold=0.5)
    assert [(s.start, s.end) for s in spans] == [(0, 8)]
    assert spans[0].confidence == pytest.approx(0.1)


def test_separated_low_tokens_give_separate_spans() -> None:
    """Low tokens split by a gap in the text or by a confident token become separate spans."""
    spans = low_confidence_spans([0.3, 0.99, 0.2, 0.1], [(0, 3), (4, 7), (8, 10), (11, 14)], threshold=0.5)
    assert [(s.start, s.end) for s in spans] == [(0, 3), (8, 10), (11, 14)]
    assert [s.confidence for s in spans] == pytest.approx([0.3, 0.2, 0.1])


def test_tokens_with_empty_ranges_are_skipped() -> None:
    """Special tokens (empty character ranges) neither open a span nor break a running one."""
    spans = low_confidence_spans([0.1, 0.0, 0.2], [(0, 3), (3, 3), (3, 6)], threshold=0.5)
    assert [(s.start, s.end) for s in spans] == [(0, 6)]
    assert spans[0].confidence == pytest.approx(math.sqrt(0.1 * 0.2))


def test_threshold_is_strict() -> None:
    """A token exactly at the threshold is not low."""
    assert low_confidence_spans([0.5, 0.49], [(0, 1), (2, 3)], threshold=0.5) == [LowConfidenceSpan(2, 3, 0.49)]


def test_length_mismatch_raises() -> None:
    """Probabilities and character ranges must pair one to one."""
    with pytest.raises(ValueError, match="2 probabilities for 1 character spans"):
        low_confidence_spans([0.1, 0.2], [(0, 1)], threshold=0.5)
