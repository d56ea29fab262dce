# ruff: noqa: RUF001, RUF002 - this module exists to fold the look-alike characters these rules flag
"""Character error rate (CER) of OCR text against a reference, after one normalisation applied to both sides.

The normalisation removes differences that are not recognition errors, and nothing else:

1. Unicode NFC, so that `é` typed as one code point or as `e` + combining accent compare equal; typographic
   ligatures (`ﬁ`, `ﬂ`, `ﬀ`, `ﬃ`, `ﬄ`, `ﬅ`, `ﬆ`), which PDF text layers keep and OCR never produces, become
   their letters.
2. Quotes: every single quote, apostrophe and prime (`‘ ’ ‚ ‛ ′ ´` and the backtick) becomes `'`; every double
   quote (`“ ” „ ‟ ″ « »`) becomes `"`. Dashes (`‐ ‑ ‒ – — ―` and the minus sign) become `-`, `…` becomes
   `...`. Fonts draw these alike, so a page image cannot tell them apart.
3. Markdown table syntax that the engine adds around cells (`|` and `| --- |` separator rows) is dropped from
   both sides: a PDF's text layer has no table markup.
4. Hyphenation at line ends: a letter, `-`, line break, letter is joined (`eben-\\nfalls` → `ebenfalls`).
   Typesetters hyphenate where the layout needs it; the text layer keeps the break and OCR reads it too, but
   either may put it elsewhere.
5. Whitespace: every run of white space (line breaks, tabs, no-break spaces) becomes one space; both ends are
   stripped. Reading order across lines is what OCR decides, line breaks are not.

CER is then the Levenshtein distance between the normalised texts divided by the normalised reference length.
"""

from __future__ import annotations

import re
import unicodedata

from rapidfuzz.distance import Levenshtein

_LIGATURES = str.maketrans({"ﬁ": "fi", "ﬂ": "fl", "ﬀ": "ff", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "st", "ﬆ": "st"})
_PUNCTUATION = str.maketrans(
    {
        **dict.fromkeys("‘’‚‛′´`", "'"),
        **dict.fromkeys("“”„‟″«»", '"'),
        **dict.fromkeys("‐‑‒–—―−", "-"),
        "…": "...",
    }
)
_TABLE_RULE = re.compile(r"^[ \t]*\|(?:[ \t]*-{3,}[ \t]*\|)+[ \t]*$", re.MULTILINE)
_LINE_END_HYPHEN = re.compile(r"([^\W\d_])-[ \t]*\n[ \t]*([^\W\d_])")
_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """The text as CER compares it (see the module docstring)."""
    text = unicodedata.normalize("NFC", text).translate(_LIGATURES).translate(_PUNCTUATION)
    text = _TABLE_RULE.sub("", text).replace("|", " ")
    text = _LINE_END_HYPHEN.sub(r"\1\2", text)
    return _SPACE.sub(" ", text).strip()


def edits(reference: str, hypothesis: str) -> tuple[int, int]:
    """(Levenshtein distance, reference length) after normalising both: sum these over pages for a corpus CER."""
    ref, hyp = normalize(reference), normalize(hypothesis)
    return Levenshtein.distance(ref, hyp), len(ref)


def cer(reference: str, hypothesis: str) -> float:
    """Character error rate of `hypothesis` against `reference`, 0 for identical texts (may exceed 1)."""
    distance, length = edits(reference, hypothesis)
    return distance / length if length else float(distance > 0)
