"""Sample and hostile documents, generated in code so no binary test data lives in git.

The demo, the tests and the `submit` examples share these. Born-digital PDFs use PyMuPDF's built-in
Helvetica, which covers Latin-1: every accent of the nine supported languages, but not `œ` or `€`.
"""

# PyMuPDF ships py.typed but leaves most of its functions unannotated.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import io
import math
import random
import struct
import zlib
from dataclasses import dataclass, field

import pymupdf
from PIL import Image, ImageFilter

_A4 = (595.0, 842.0)  # points
_MARGIN = 72.0  # points: one inch on every side
_FONT = "helv"  # Helvetica, Latin-1 encoded by PyMuPDF
_FONT_BOLD = "hebo"

LANGUAGE_SAMPLES: dict[str, str] = {
    "eng": (
        "The quarterly report shows steady growth in every region. Our team delivered the new warehouse "
        "system two weeks ahead of schedule. Customers in the north praised the faster deliveries, while "
        "costs stayed within the approved budget."
    ),
    "fra": (
        "Madame, nous avons bien reçu votre lettre du 12 mars et nous vous en remercions. Le délai de "
        "livraison prévu était trop court; nous espérons que cette erreur ne vous a pas causé de gêne. "
        "Veuillez agréer, chère cliente, l'expression de nos salutations très distinguées, à bientôt."
    ),
    "deu": (
        "Sehr geehrte Damen und Herren, für die Lieferung vom fünften März berechnen wir Ihnen die "
        "folgenden Positionen. Bitte überweisen Sie den Betrag innerhalb von vierzehn Tagen. Bei Rückfragen "
        "wenden Sie sich gerne an unser Büro in Straßburg, wir antworten möglichst schnell."
    ),
    "spa": (
        "El señor Muñoz llegó a la reunión con una propuesta muy clara. ¿Cuántos años necesitará la "
        "compañía para recuperar la inversión? Según el análisis, la situación económica mejorará "
        "pronto. ¡Qué buena noticia para el equipo de diseño!"
    ),
    "ita": (
        "La città è piena di turisti durante l'estate, perciò conviene prenotare l'albergo con anticipo. "
        "Il caffè più famoso si trova vicino al duomo. Però la qualità del servizio è sempre così alta "
        "che nessuno si lamenta del prezzo."
    ),
    "nld": (
        "De vergadering van het bestuur werd gisteren in Utrecht gehouden. Er werd besloten om de "
        "financiële positie van de coöperatie te versterken. Het rapport wordt volgende week naar alle "
        "leden gestuurd, samen met een overzicht van de ideeën uit de enquête."
    ),
    "por": (
        "A reunião de amanhã será na sala de conferências do terceiro andar. Não se esqueça de trazer os "
        "relatórios da última edição. A direção espera uma apresentação clara sobre as ações e a "
        "situação financeira da organização, incluindo as previsões para o próximo ano."
    ),
    "swe": (
        "Vi tackar för ert brev och för det trevliga mötet i Göteborg förra veckan. Leveransen av de "
        "nya möblerna sker på måndag. Om ni har frågor är ni välkomna att höra av er till vår kundtjänst "
        "i Malmö, som är öppen även på lördagar."
    ),
    "dan": (
        "Tak for jeres brev og for det gode møde i Århus i sidste uge. Vi sender de nye varer med næste "
        "levering på fredag, og fakturaen følger med pakken. Hvis der er spørgsmål, er I velkomne til at kontakte "
        "vores kontor i København, som også har åbent om lørdagen."
    ),
}
"""Three or four natural sentences per language (ISO 639-2), using its special characters."""


@dataclass
class _Writer:
    """Greedy left-aligned text layout over as many A4 pages as it takes."""

    doc: pymupdf.Document = field(default_factory=pymupdf.open)
    fontsize: float = 11.0
    page: pymupdf.Page | None = None
    y: float = 0.0

    @property
    def leading(self) -> float:
        return self.fontsize * 1.4

    def _line(self, text: str, *, fontname: str, fontsize: float) -> None:
        if self.page is None or self.y + fontsize * 1.4 > _A4[1] - _MARGIN:
            self.page = self.doc.new_page(width=_A4[0], height=_A4[1])
            self.y = _MARGIN
        self.y += fontsize * 1.4
        self.page.insert_text((_MARGIN, self.y), text, fontname=fontname, fontsize=fontsize)

    def paragraph(self, text: str, *, fontname: str = _FONT, fontsize: float | None = None) -> None:
        size = fontsize or self.fontsize
        width = _A4[0] - 2 * _MARGIN
        line = ""
        for word in text.split():
            candidate = f"{line} {word}" if line else word
            if line and pymupdf.get_text_length(candidate, fontname=fontname, fontsize=size) > width:
                self._line(line, fontname=fontname, fontsize=size)
                line = word
            else:
                line = candidate
        if line:
            self._line(line, fontname=fontname, fontsize=size)
        self.y += size * 0.8  # paragraph spacing

    def tobytes(self) -> bytes:
        if self.doc.page_count == 0:
            self.doc.new_page(width=_A4[0], height=_A4[1])
        data: bytes = self.doc.tobytes(garbage=3, deflate=True)
        self.doc.close()
        return data


def text_pdf(paragraphs: list[str], *, title: str | None = None, fontsize: float = 11.0) -> bytes:
    """A born-digital A4 PDF: an optional bold title, then the paragraphs, flowing onto new pages as needed."""
    writer = _Writer(fontsize=fontsize)
    if title:
        writer.paragraph(title, fontname=_FONT_BOLD, fontsize=fontsize * 1.5)
    for text in paragraphs:
        writer.paragraph(text)
    return writer.tobytes()


def table_pdf(rows: list[list[str]], *, title: str | None = None) -> bytes:
    """A ruled table on A4: the first row is the (bold) header; columns sized to their longest cell."""
    if not rows:
        raise ValueError("a table needs at least a header row")
    ncols = max(len(r) for r in rows)
    grid = [r + [""] * (ncols - len(r)) for r in rows]
    fontsize, pad = 10.0, 4.0
    widths = [
        max(pymupdf.get_text_length(r[c], fontname=_FONT_BOLD, fontsize=fontsize) for r in grid) + 2 * pad
        for c in range(ncols)
    ]
    available = _A4[0] - 2 * _MARGIN
    if sum(widths) > available:  # shrink everything proportionally rather than clip cells
        scale = available / sum(widths)
        widths = [w * scale for w in widths]
        fontsize *= scale
    row_h = fontsize * 1.9

    doc = pymupdf.open()
    page: pymupdf.Page | None = None
    y = 0.0

    def draw_row(page: pymupdf.Page, cells: list[str], top: float, *, bold: bool) -> None:
        x = _MARGIN
        for text, w in zip(cells, widths, strict=True):
            page.draw_rect(pymupdf.Rect(x, top, x + w, top + row_h), color=(0, 0, 0), width=0.6)
            baseline = top + row_h / 2 + fontsize * 0.35
            page.insert_text((x + pad, baseline), text, fontname=_FONT_BOLD if bold else _FONT, fontsize=fontsize)
            x += w

    for i, cells in enumerate(grid):
        if page is None or y + row_h > _A4[1] - _MARGIN:
            page = doc.new_page(width=_A4[0], height=_A4[1])
            y = _MARGIN
            if title and doc.page_count == 1:
                page.insert_text((_MARGIN, y + 14), title, fontname=_FONT_BOLD, fontsize=14)
                y += 30
            if i > 0:  # repeat the header on continuation pages
                draw_row(page, grid[0], y, bold=True)
                y += row_h
        draw_row(page, cells, y, bold=i == 0)
        y += row_h
    data: bytes = doc.tobytes(garbage=3, deflate=True)
    doc.close()
    return data


def scanned_jpeg(text: str, *, seed: int = 0, dpi: int = 200) -> bytes:
    """A "scanned" A4 page: `text` typeset at 12 pt, rasterised, tilted by at most 1°, on grey noisy paper, JPEG q75.

    Deterministic for a given seed. Large type and a clean threshold keep it legible for Tesseract."""
    rng = random.Random(seed)
    src = pymupdf.open(stream=text_pdf([text], fontsize=12.0), filetype="pdf")
    pix = src[0].get_pixmap(dpi=dpi, colorspace=pymupdf.csGRAY, alpha=False)
    page = Image.frombytes("L", (pix.width, pix.height), pix.samples, "raw", "L", pix.stride)
    src.close()

    paper = rng.randint(222, 238)
    page = page.point(lambda v: paper * v // 255 + (255 - v) * 25 // 255)  # ink ~25, paper grey
    angle = rng.uniform(-1.0, 1.0)
    page = page.rotate(angle, resample=Image.Resampling.BICUBIC, expand=False, fillcolor=paper)
    noise = Image.frombytes("L", page.size, rng.randbytes(page.width * page.height))
    page = Image.blend(page, noise, 0.07).filter(ImageFilter.GaussianBlur(0.6))

    out = io.BytesIO()
    page.save(out, format="JPEG", quality=75, dpi=(dpi, dpi))
    return out.getvalue()


def empty() -> bytes:
    """A zero-byte upload."""
    return b""


def truncated_pdf() -> bytes:
    """A text PDF cut off part-way, as an interrupted upload leaves it: no trailer, no `%%EOF`."""
    data = text_pdf([LANGUAGE_SAMPLES["eng"]] * 40, title="Truncated report")
    return data[: len(data) * 3 // 5]


def encrypted_pdf() -> bytes:
    """A text PDF that needs a user password (AES-256) to open."""
    doc = pymupdf.open(stream=text_pdf([LANGUAGE_SAMPLES["eng"]], title="Confidential"), filetype="pdf")
    data: bytes = doc.tobytes(
        encryption=pymupdf.mupdf.PDF_ENCRYPT_AES_256,
        user_pw="sample-user",
        owner_pw="sample-owner",
    )
    doc.close()
    return data


def many_pages_pdf(n: int = 600) -> bytes:
    """An `n`-page PDF with one word per page (builds 600 pages in well under a second)."""
    doc = pymupdf.open()
    for i in range(n):
        page = doc.new_page(width=_A4[0], height=_A4[1])
        page.insert_text((_MARGIN, _MARGIN), f"Page{i + 1}", fontname=_FONT, fontsize=11)
    data: bytes = doc.tobytes(garbage=1, deflate=True)
    doc.close()
    return data


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def huge_png(side: int = 30000) -> bytes:
    """A valid, all-white, 1-bit `side` x `side` PNG: ~100 KB on disk, gigabytes once decoded (a pixel bomb).

    Rows are compressed in batches so building it never holds the decoded image in memory."""
    row = b"\x00" + b"\xff" * math.ceil(side / 8)  # filter type 0, then white 1-bit pixels
    batch_rows = max(1, (4 << 20) // len(row))  # ~4 MiB of raw rows per compressor call
    batch = row * batch_rows
    comp = zlib.compressobj(1)  # fastest; still ~600 KB for 30000 x 30000
    parts: list[bytes] = []
    remaining = side
    while remaining > 0:
        n = min(batch_rows, remaining)
        parts.append(comp.compress(batch if n == batch_rows else row * n))
        remaining -= n
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )


def huge_image_pdf(side: int = 30000) -> bytes:
    """A one-page PDF drawing a `side` x `side` 1-bit image: a pixel bomb wrapped in a PDF, a few hundred KB."""
    row = b"\xff" * math.ceil(side / 8)
    comp = zlib.compressobj(1)  # fastest; still ~600 KB for 30000 x 30000
    stream = b"".join(comp.compress(row * min(1024, side - i)) for i in range(0, side, 1024)) + comp.flush()
    doc = pymupdf.open()
    page = doc.new_page(width=_A4[0], height=_A4[1])
    xref = doc.get_new_xref()
    doc.update_object(
        xref,
        f"<</Type/XObject/Subtype/Image/Width {side}/Height {side}/ColorSpace/DeviceGray"
        f"/BitsPerComponent 1/Filter/FlateDecode/Length {len(stream)}>>",
    )
    doc.update_stream(xref, stream, compress=False)
    doc.xref_set_key(xref, "Filter", "/FlateDecode")  # update_stream(compress=False) drops the filter
    doc.xref_set_key(page.xref, "Resources", f"<</XObject<</Im0 {xref} 0 R>>>>")
    contents = doc.get_new_xref()
    doc.update_object(contents, "<<>>")
    doc.update_stream(contents, f"q {_A4[0]:g} 0 0 {_A4[1]:g} 0 0 cm /Im0 Do Q".encode())
    doc.xref_set_key(page.xref, "Contents", f"{contents} 0 R")
    data: bytes = doc.tobytes(garbage=0, deflate=False)
    doc.close()
    return data


def jpeg_named_pdf() -> tuple[str, bytes]:
    """A JPEG uploaded as `scan.pdf`: the bytes decide the format, so it must render as a JPEG."""
    return "scan.pdf", scanned_jpeg("Scanned receipt. Total due: 42.50 EUR. Thank you for your visit.", seed=7)


def demo_documents() -> list[tuple[str, bytes]]:
    """The demo set: one document per language family and layout, plus one broken upload."""
    invoice = [
        ["Pos.", "Beschreibung", "Menge", "Einzelpreis", "Betrag"],
        ["1", "Bürostühle, ergonomisch", "4", "189,00 EUR", "756,00 EUR"],
        ["2", "Schreibtische, höhenverstellbar", "2", "429,50 EUR", "859,00 EUR"],
        ["3", "Lieferung und Montage", "1", "120,00 EUR", "120,00 EUR"],
        ["", "Gesamtbetrag (inkl. 19 % MwSt.)", "", "", "1.735,00 EUR"],
    ]
    return [
        ("fr-letter.pdf", text_pdf([LANGUAGE_SAMPLES["fra"]], title="Objet : votre commande n° 4711")),
        ("de-invoice.pdf", table_pdf(invoice, title="Rechnung Nr. 2024-0815")),
        (
            "en-report.pdf",
            text_pdf(
                [LANGUAGE_SAMPLES["eng"], "Revenue rose by 12 percent; staff turnover fell to 4 percent."],
                title="Quarterly Report",
            ),
        ),
        ("sv-da-note.pdf", text_pdf([LANGUAGE_SAMPLES["swe"], LANGUAGE_SAMPLES["dan"]], title="Nordiska kontoret")),
        ("en-scan.jpg", scanned_jpeg(LANGUAGE_SAMPLES["eng"], seed=1)),
        ("broken.pdf", truncated_pdf()),
    ]
