"""What a page is before it is read: which way up (Tesseract OSD) and which language (a text sample + py3langid).

Pure pieces the Tesseract engine composes: parsing OSD output, cutting a small sample of a page's text lines for
a cheap first recognition pass, and choosing recognition languages from that sample's text. py3langid's model
ships inside its wheel (numpy only), so detection needs nothing fetched at run time.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, cast

import numpy as np
from PIL import Image

from ocrbooth.models.ocr.engine import Rotation

# ISO 639-1 (py3langid's labels) to the ISO 639-2 codes requests and tesseract use.
_TO_ISO639_2 = {
    "en": "eng",
    "fr": "fra",
    "de": "deu",
    "es": "spa",
    "it": "ita",
    "nl": "nld",
    "pt": "por",
    "sv": "swe",
    "da": "dan",
}
_TO_ISO639_1 = {three: two for two, three in _TO_ISO639_2.items()}

SAMPLE_BAND_FRACTION = 0.05
"""Height of each of the two sampled bands, as a fraction of the page height (about 4 text lines at 150 dpi)."""
MIN_SAMPLE_LETTERS = 40
"""Fewer letters than this in the sample and the language is not guessed (the engine's fallback applies)."""
MIN_LINE_LETTERS = 15
"""Shorter sample lines are too short to classify alone; they still count towards the whole-sample guess."""
MIX_SHARE = 0.15
# Languages the `eng` sample cannot tell apart: it drops å, ä, ö, æ and ø, the letters that separate them. A page
# classified as either is read with both, Swedish first: measured on the samples' Swedish, Danish and mixed pages,
# swe+dan read all three without an error, dan+swe turned Swedish ö into å (CER 0.9 to 1.2 %).
_NORDIC = ("swe", "dan")
"""A second language whose lines hold at least this share of the sample's letters is read alongside."""
_LETTER = re.compile(r"[^\W\d_]", re.UNICODE)


@dataclass(frozen=True, slots=True)
class Orientation:
    """Tesseract OSD's answer for one page."""

    rotate_deg: Rotation
    """Clockwise rotation that puts the page upright."""
    confidence: float
    """OSD's orientation confidence (unbounded; above ~2 it is usually right)."""
    script: str | None


def parse_osd(text: str) -> Orientation | None:
    """`tesseract --psm 0` stdout to an Orientation; None when OSD found too little text to say."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    try:
        rotate = int(fields["Rotate"]) % 360
        confidence = float(fields["Orientation confidence"])
    except (KeyError, ValueError):
        return None
    if rotate not in (0, 90, 180, 270):
        return None
    return Orientation(rotate_deg=cast(Rotation, rotate), confidence=confidence, script=fields.get("Script"))


def upright(image: Image.Image, rotate_deg: int) -> Image.Image:
    """The page turned `rotate_deg` clockwise (PIL rotates counter-clockwise, hence the sign)."""
    if rotate_deg % 360 == 0:
        return image
    return image.rotate(-rotate_deg, expand=True, fillcolor="white")


def sample_bands(image: Image.Image) -> Image.Image:
    """Two horizontal bands with the most ink, one from each half of the page, stacked into one small image.

    A first recognition pass over about a tenth of the page gives enough text to tell the language and costs a
    fraction of reading the whole page; taking one band per half keeps one table or code block from deciding
    for a page of prose.
    """
    gray = image.convert("L")
    width, height = gray.size
    band = max(32, int(height * SAMPLE_BAND_FRACTION))
    if height < 4 * band:
        return gray
    # Ink per row on every 4th column: enough to find text lines, and cheap on a 1540 px page.
    ink = (np.asarray(gray, dtype=np.uint8)[:, ::4] < 128).sum(axis=1).astype(np.int64)
    window = np.convolve(ink, np.ones(band, dtype=np.int64), mode="valid")  # window[i]: rows i .. i+band-1
    half = height // 2
    tops = [int(np.argmax(window[: half - band + 1])), half + int(np.argmax(window[half : len(window)]))]
    gap = band // 4
    out = Image.new("L", (width, 2 * band + 3 * gap), 255)
    for number, top in enumerate(tops):
        out.paste(gray.crop((0, top, width, top + band)), (0, gap + number * (band + gap)))
    return out


class _Classifier(Protocol):
    def classify(self, text: str) -> tuple[str, float]: ...


class LanguageIdentifier:
    """py3langid restricted to the languages tesseract can read here; load once, then thread-safe reads."""

    def __init__(self, languages: Sequence[str]) -> None:
        self.languages = tuple(code for code in languages if code in _TO_ISO639_1)
        self._model: _Classifier | None = None

    def load(self) -> None:
        """Unpack the model from the wheel (about half a second); call once, off the event loop."""
        from py3langid.langid import MODEL_FILE
        from py3langid.langid import LanguageIdentifier as Py3LangId

        model = Py3LangId.from_model_file(MODEL_FILE, norm_probs=True)
        model.set_languages([_TO_ISO639_1[code] for code in self.languages])
        self._model = model

    def classify(self, text: str) -> str:
        """The most likely language of `text` (ISO 639-2)."""
        if self._model is None:
            raise RuntimeError("LanguageIdentifier.load() was not called")
        label, _ = self._model.classify(text)
        return _TO_ISO639_2[label]

    def choose(self, text: str) -> tuple[str, ...]:
        """Recognition languages for a page whose sample reads `text`: the dominant language, then a second
        one whose lines hold at least MIX_SHARE of the letters (English first among equals); () when the
        sample is too short to tell."""
        if _letters(text) < MIN_SAMPLE_LETTERS:
            return ()
        shares: Counter[str] = Counter()
        for line in text.splitlines():
            letters = _letters(line)
            if letters >= MIN_LINE_LETTERS:
                shares[self.classify(line)] += letters
        primary = self.classify(text)
        nordic = primary in _NORDIC and all(code in self.languages for code in _NORDIC)
        chosen: tuple[str, ...] = _NORDIC if nordic else (primary,)
        total = sum(shares.values())
        if not total:
            return chosen
        others = sorted(
            (code for code, n in shares.items() if code not in chosen and n >= MIX_SHARE * total),
            key=lambda code: (code != "eng", -shares[code]),
        )
        return (*chosen, *others[:1])


def _letters(text: str) -> int:
    return len(_LETTER.findall(text))
