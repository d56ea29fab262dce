"""samples: generated documents say what they claim to, so tests built on them prove something."""

# PyMuPDF ships py.typed but leaves most of its functions unannotated.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import io
import re
import struct

import pymupdf
import pytest
from PIL import Image

from ocrbooth.errors import PoisonError
from ocrbooth.models.ocr.render import render_document, sniff_format
from ocrbooth.testing import samples

SPECIAL_CHARACTERS = {
    "eng": "",
    "fra": "çéèêà",
    "deu": "äöüß",
    "spa": "ñ¿¡áó",
    "ita": "àèòù",
    "nld": "ëö",
    "por": "ãõçáó",
    "swe": "åäö",
    "dan": "æøå",
}


def _text(data: bytes) -> str:
    with pymupdf.open(stream=data, filetype="pdf") as doc:
        return "".join(page.get_text() for page in doc)


def _words(text: str) -> str:
    return " ".join(text.split())


def test_language_samples_cover_the_nine_languages() -> None:
    """Every supported language has three or four sentences using each of its special characters."""
    assert set(samples.LANGUAGE_SAMPLES) == set(SPECIAL_CHARACTERS)
    for lang, text in samples.LANGUAGE_SAMPLES.items():
        sentences = re.findall(r"[.!?](?:\s|$)", text)
        assert 3 <= len(sentences) <= 4, lang
        missing = [c for c in SPECIAL_CHARACTERS[lang] if c not in text]
        assert not missing, (lang, missing)


@pytest.mark.parametrize("lang", list(samples.LANGUAGE_SAMPLES))
def test_text_pdf_round_trips_every_language(lang: str) -> None:
    """Text extracted back from text_pdf equals the title and paragraph, accents included."""
    paragraph = samples.LANGUAGE_SAMPLES[lang]
    data = samples.text_pdf([paragraph], title=f"Sample {lang}")
    assert _words(_text(data)) == _words(f"Sample {lang} {paragraph}")


def test_text_pdf_flows_onto_more_pages() -> None:
    """Text longer than a page continues on the next A4 page, in order, with nothing dropped."""
    paragraphs = [f"Paragraph {i}. {samples.LANGUAGE_SAMPLES['eng']}" for i in range(30)]
    data = samples.text_pdf(paragraphs)
    with pymupdf.open(stream=data, filetype="pdf") as doc:
        assert doc.page_count > 1
        assert {(round(p.rect.width), round(p.rect.height)) for p in doc} == {(595, 842)}
    assert _words(_text(data)) == _words(" ".join(paragraphs))


def test_table_pdf_has_every_cell_and_ruling() -> None:
    """Every word of every cell is extractable, and the grid lines are drawn."""
    rows = [["Artikel", "Menge", "Preis"], ["Bürostuhl", "4", "189,00"], ["Schreibtisch", "2", "429,50"]]
    data = samples.table_pdf(rows, title="Rechnung")
    text = _text(data)
    for word in [w for row in rows for cell in row for w in cell.split()] + ["Rechnung"]:
        assert word in text
    with pymupdf.open(stream=data, filetype="pdf") as doc:
        assert len(doc[0].get_drawings()) >= len(rows) * len(rows[0])


def test_scanned_jpeg_is_a_page_sized_greyscale_jpeg() -> None:
    """scanned_jpeg decodes to an A4-at-200-DPI greyscale JPEG, the same for a seed and different across seeds."""
    data = samples.scanned_jpeg("Scanned text", seed=1)
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG"
        assert image.mode == "L"
        assert image.size == (1653, 2339)
    assert samples.scanned_jpeg("Scanned text", seed=1) == data
    assert samples.scanned_jpeg("Scanned text", seed=2) != data


def test_huge_png_is_tiny_on_disk_with_a_huge_header() -> None:
    """huge_png's IHDR declares 30000x30000 while the file stays under a megabyte."""
    data = samples.huge_png()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert struct.unpack(">II", data[16:24]) == (30000, 30000)
    assert len(data) < 1_000_000


def test_hostile_pdfs_are_what_they_claim() -> None:
    """The encrypted PDF needs a password, the truncated one lost its trailer, many_pages_pdf has n pages."""
    with pymupdf.open(stream=samples.encrypted_pdf(), filetype="pdf") as doc:
        assert doc.needs_pass
    truncated = samples.truncated_pdf()
    assert truncated.startswith(b"%PDF-")
    assert b"%%EOF" not in truncated
    with pymupdf.open(stream=samples.many_pages_pdf(7), filetype="pdf") as doc:
        assert doc.page_count == 7
    assert samples.empty() == b""


def test_jpeg_named_pdf_is_a_jpeg() -> None:
    """The .pdf-named sample is JPEG bytes."""
    name, data = samples.jpeg_named_pdf()
    assert name == "scan.pdf"
    assert data.startswith(b"\xff\xd8\xff")


def test_demo_documents_render_except_the_broken_one() -> None:
    """Every demo document renders, except broken.pdf, which is rejected as corrupt."""
    docs = samples.demo_documents()
    names = [name for name, _ in docs]
    assert len(set(names)) == len(names) == 6
    for name, data in docs:
        if name == "broken.pdf":
            with pytest.raises(PoisonError) as caught:
                render_document(data)
            assert caught.value.code == "corrupt_document"
        else:
            pages = render_document(data)
            assert pages, name
            assert not any(p.blank for p in pages), name
    assert sniff_format(dict(docs)["en-scan.jpg"]) == "jpeg"
