"""The CER normalisation (ocrbooth.testing.cer): what counts as an OCR error and what does not."""

from __future__ import annotations

import pytest

from ocrbooth.testing.cer import cer, edits, normalize


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("cafe\u0301 et the\u0301", "café et thé"),  # NFC: a combining accent equals the precomposed letter
        ("\ufb01chier \ufb02ux", "fichier flux"),  # PDF ligatures become letters
        ("l\u2019\u00e9t\u00e9 \u00ab\u00a0oui\u00a0\u00bb \u201cyes\u201d", 'l\'été " oui " "yes"'),
        ("Bitte beachten Sie eben-\nfalls", "Bitte beachten Sie ebenfalls"),  # line-end hyphenation
        ("text-based tools", "text-based tools"),  # a hyphen inside a line stays
        ("a\tb\n\n  c\u00a0d ", "a b c d"),  # every run of white space is one space
        ("| a | b |\n| --- | --- |\n| 1 | 2 |", "a b 1 2"),  # markdown table syntax is not text
        ("9 \u2013 10 \u2014 x\u2026", "9 - 10 - x..."),
    ],
)
def test_normalize_folds_what_a_page_image_cannot_show(raw: str, normalised: str) -> None:
    """Normalisation maps typographic variants, line-end hyphenation, table markup and white space as documented."""
    assert normalize(raw) == normalised


def test_cer_counts_real_misreadings() -> None:
    """A lost diacritic and a wrong letter count as errors; layout differences do not."""
    reference = "Le re\u00e7u est arriv\u00e9\nhier."
    assert cer(reference, "Le re\u00e7u est\narriv\u00e9 hier.") == 0.0
    assert edits(reference, "Le regu est arrive hier.") == (2, len("Le reçu est arrivé hier."))
    assert cer(reference, "") == 1.0
