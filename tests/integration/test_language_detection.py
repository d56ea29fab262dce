"""The Tesseract engine without a language hint, on real published pages (tests/data/debian-reference): it
detects the language and the orientation, and reads as well as with the right hint."""

from __future__ import annotations

import shutil
from pathlib import Path

import pymupdf
import pytest
from PIL import Image

from ocrbooth.models.ocr.detect import LanguageIdentifier, parse_osd, sample_bands
from ocrbooth.models.ocr.engine import PageInput, PageOutput
from ocrbooth.models.ocr.tesseract import SUPPORTED_LANGUAGES, TesseractEngine
from ocrbooth.testing.cer import cer
from ocrbooth.testing.corpus import render

DATA = Path(__file__).parents[1] / "data" / "debian-reference"
PAGES = {
    "fra": "debian-reference.fr.p36.pdf",
    "deu": "debian-reference.de.p53.pdf",
    "por": "debian-reference.pt.p85.pdf",
}
TOLERANCE = 0.005  # the bound: within 0.5 percentage points of the hinted reading


@pytest.fixture(autouse=True)
def _tesseract_installed() -> None:
    """Fail (not skip) without tesseract: `make test` installs it, and a skip must not pass for a result."""
    assert shutil.which("tesseract"), "tesseract not installed: run scripts/install-system-deps.sh as root"


@pytest.fixture(scope="module")
def engine() -> TesseractEngine:
    """An engine with no default languages: pages that name none are detected (load checks `osd` too)."""
    loaded = TesseractEngine(max_workers=2)
    loaded.load()
    return loaded


def _page(language: str, rotation_deg: int = 0) -> tuple[Image.Image, str]:
    """The page scanned at 150 dpi in grayscale (turned clockwise), and its text layer."""
    with pymupdf.open(stream=(DATA / PAGES[language]).read_bytes(), filetype="pdf") as pdf:
        return render(pdf, 1, 150, rotation_deg), str(pdf[0].get_text("text"))


def _read(engine: TesseractEngine, *pages: PageInput) -> list[PageOutput]:
    outputs = engine.recognize(list(pages), span_threshold=0.5)
    for out in outputs:
        assert out.finish_reason == "stop", out.error_message
    return outputs


@pytest.fixture(scope="module")
def upright(engine: TesseractEngine) -> dict[str, tuple[PageOutput, PageOutput]]:
    """Each upright page read without a hint and with its language, as one batch (two at a time)."""
    images = {language: _page(language)[0] for language in PAGES}
    pages = [PageInput(images[lang], languages=hint) for lang in PAGES for hint in ((), (lang,))]
    outputs = _read(engine, *pages)
    return {lang: (outputs[2 * i], outputs[2 * i + 1]) for i, lang in enumerate(PAGES)}


@pytest.mark.parametrize("language", sorted(PAGES))
def test_unhinted_page_reads_as_well_as_with_the_right_hint(
    upright: dict[str, tuple[PageOutput, PageOutput]], language: str
) -> None:
    """A page naming no language is detected as its language and read within 0.5 points of the hinted CER."""
    _, reference = _page(language)
    unhinted, hinted = upright[language]
    assert unhinted.languages[:1] == (language,), unhinted.languages
    assert unhinted.rotation_deg == 0
    assert hinted.languages == (), "a request's own languages are not replaced by detection"
    assert cer(reference, unhinted.text) <= cer(reference, hinted.text) + TOLERANCE
    assert cer(reference, unhinted.text) <= 0.02, unhinted.text


@pytest.mark.parametrize(("language", "rotation_deg"), [("deu", 90), ("fra", 270), ("por", 180)])
def test_turned_scan_is_turned_back_and_read_as_upright(
    engine: TesseractEngine,
    upright: dict[str, tuple[PageOutput, PageOutput]],
    language: str,
    rotation_deg: int,
) -> None:
    """A page scanned sideways or upside down is turned upright before recognition and read as well as upright."""
    image, reference = _page(language, rotation_deg)
    (turned,) = _read(engine, PageInput(image))
    assert turned.rotation_deg == (360 - rotation_deg) % 360
    assert turned.languages[:1] == (language,)
    assert cer(reference, turned.text) <= cer(reference, upright[language][0].text) + TOLERANCE


def test_turned_scan_with_explicit_language_is_turned_too(engine: TesseractEngine) -> None:
    """A request's languages are kept, and its upside-down page is still turned upright and read."""
    image, reference = _page("por", 180)
    (out,) = _read(engine, PageInput(image, languages=("por",)))
    assert out.rotation_deg == 180
    assert out.languages == ()
    assert cer(reference, out.text) <= 0.02, out.text


def test_language_identifier_adds_english_to_a_mixed_sample() -> None:
    """A French sample with English lines is read with fra+eng; a plain French one with fra alone; too little
    text gives no guess."""
    identifier = LanguageIdentifier(SUPPORTED_LANGUAGES)
    identifier.load()
    french = "Pour donner un accès privilégié à certains périphériques, vous devriez envisager un groupe."
    english = "Low level package management system for Debian, with a text based front end."
    assert identifier.choose("\n".join([french] * 3)) == ("fra",)
    assert identifier.choose("\n".join([french, french, english])) == ("fra", "eng")
    assert identifier.choose("12 / 237") == ()


def test_osd_output_parses_and_sample_is_a_strip_of_the_page() -> None:
    """OSD's answer gives the clockwise rotation; an answer without one gives None; the language sample is two
    bands of the page, far smaller than the page."""
    osd = parse_osd("Page number: 0\nOrientation in degrees: 270\nRotate: 90\nOrientation confidence: 15.09\n")
    assert osd is not None
    assert (osd.rotate_deg, osd.confidence) == (90, 15.09)
    assert parse_osd("Too few characters. Skipping this page\n") is None
    image, _ = _page("fra")
    sample = sample_bands(image)
    assert sample.width == image.width
    assert sample.height < image.height / 5


def test_a_swedish_and_danish_note_keeps_its_letters_without_a_hint(engine: TesseractEngine) -> None:
    """The demo's Nordic note (Swedish, then Danish) read with no hint is read with both languages: the `eng`
    sample cannot tell them apart (it drops å, ä, ö, æ, ø), and reading with one loses the other's letters."""
    from ocrbooth.models.ocr.render import render_document
    from ocrbooth.testing.samples import LANGUAGE_SAMPLES, text_pdf

    reference = " ".join([LANGUAGE_SAMPLES["swe"], LANGUAGE_SAMPLES["dan"]])
    (page,) = render_document(text_pdf([LANGUAGE_SAMPLES["swe"], LANGUAGE_SAMPLES["dan"]]))
    (out,) = _read(engine, PageInput(page.image))
    assert out.languages == ("swe", "dan"), out.languages
    for word in ("möblerna", "Göteborg", "måndag", "møde", "København"):
        assert word in out.text, (word, out.text)
    assert cer(reference, out.text) <= 0.02, out.text
