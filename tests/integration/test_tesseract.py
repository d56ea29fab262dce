"""The Tesseract engine on pages rendered from PDFs with known text: accuracy in every supported language,
tables, blank pages, confidence, and per-page failures. Needs the `tesseract` binary and language packs."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pymupdf
import pytest
from PIL import Image, ImageFilter

from ocrbooth.errors import ConfigError, PoisonError
from ocrbooth.models.ocr.engine import OcrEngine, PageInput
from ocrbooth.models.ocr.tables import extract_tables
from ocrbooth.models.ocr.tesseract import SUPPORTED_LANGUAGES, TesseractEngine, validate_languages


@pytest.fixture(autouse=True)
def _tesseract_installed() -> None:
    """Fail (not skip) without tesseract: `make test` installs it, and a skip must not pass for a result."""
    assert shutil.which("tesseract"), "tesseract not installed: run scripts/install-system-deps.sh as root"


A4 = (595, 842)  # points
MARGIN = 72
RENDER_LONGEST_PX = 1540  # the daemon's render size
MAX_ZOOM = 200 / 72  # 200 dpi

TEXTS = {
    "eng": "The old lighthouse stands on a rocky cliff at the northern end of the island. Every evening the "
    "keeper climbs the narrow stairs and lights the great lamp, whose beam can be seen thirty miles out at sea. "
    "In winter, storms batter the walls and the windows rattle for days on end. Still, the keeper says he would "
    "not trade this quiet life for anything in the world.",
    "fra": "Le petit village se trouve au bord d'une rivière, entouré de collines couvertes de vignes. Chaque "
    "matin, le boulanger ouvre sa boutique à six heures et prépare des croissants encore tièdes. Les enfants "
    "traversent la place en courant pour arriver à l'école avant la cloche. En été, les touristes s'arrêtent "
    "volontiers pour goûter le vin et admirer l'église du douzième siècle.",
    "deu": "Im Herbst färben sich die Blätter der großen Bäume im Stadtpark gelb und rot. Viele Menschen gehen "
    "am Wochenende spazieren und genießen die frische Luft. Auf dem Markt verkaufen die Bauern Äpfel, Kürbisse "
    "und frisches Brot aus dem Holzofen. Am Abend treffen sich Freunde in der gemütlichen Kneipe an der Ecke, um "
    "über die Woche zu plaudern.",
    "spa": "La señora García vive en una casa antigua cerca del puerto de Valencia. Cada mañana camina hasta el "
    "mercado para comprar pescado fresco, naranjas y pan recién horneado. Sus nietos la visitan los domingos y "
    "juntos preparan una paella enorme en el jardín. Según ella, el secreto está en el azafrán y en la "
    "paciencia, porque el arroz no se debe remover nunca.",
    "ita": "Il piccolo paese di montagna si sveglia presto, quando il sole illumina le cime ancora coperte di "
    "neve. Il fornaio apre la bottega alle sei e il profumo del pane caldo si diffonde per le strade strette. "
    "Più tardi arrivano gli escursionisti, che si fermano al bar per un caffè prima di partire verso il rifugio. "
    "La sera, gli anziani giocano a carte sotto il portico della chiesa.",
    "nld": "Aan de rand van de stad ligt een oude molen die nog steeds graan maalt. Op zaterdag komen gezinnen "
    "uit de hele regio om te zien hoe de wieken draaien in de wind. De molenaar vertelt graag over de "
    "geschiedenis van het gebouw, dat meer dan tweehonderd jaar oud is. Na het bezoek drinken de meeste mensen "
    "koffie met appeltaart in het café ernaast.",
    "por": "A pequena cidade fica à beira do rio, rodeada de montanhas e plantações de café. Todas as manhãs, os "
    "pescadores saem em seus barcos antes do nascer do sol. À tarde, as crianças brincam na praça enquanto os "
    "avós conversam nos bancos à sombra das árvores. Durante o verão, a população triplica com a chegada dos "
    "turistas, que vêm à procura de tranquilidade e boa comida.",
    "swe": "I norra Sverige är vintrarna långa och mörka, men på sommaren går solen nästan aldrig ner. Många "
    "familjer tillbringar semestern i en liten stuga vid en sjö, där de fiskar, badar och plockar blåbär i "
    "skogen. På kvällarna grillar man korv och sitter ute länge i det ljusa vädret. När hösten kommer "
    "återvänder alla till staden med nya krafter.",
    "dan": "København er en by med mange cykler, smukke kanaler og hyggelige caféer. Om morgenen cykler folk til "
    "arbejde, uanset om det regner eller sner. I weekenden går familier en tur i parken eller besøger et af "
    "byens mange museer. Om sommeren bader de unge i havnen, og om aftenen spiser man smørrebrød med rødspætte "
    "og drikker en kold øl ved vandet.",
}


@pytest.fixture(scope="module")
def engine() -> TesseractEngine:
    """One loaded engine for the module (load checks the binary and all nine language packs)."""
    loaded = TesseractEngine()
    loaded.load()
    return loaded


@pytest.fixture
def pdf_page() -> Iterator[pymupdf.Page]:
    """A blank A4 page of a fresh in-memory PDF."""
    doc = pymupdf.open()
    try:
        yield doc.new_page(width=A4[0], height=A4[1])
    finally:
        doc.close()


def _render(page: pymupdf.Page) -> Image.Image:
    """Render as the daemon does: RGB, longest side 1540 px, at most 200 dpi."""
    zoom = min(RENDER_LONGEST_PX / max(page.rect.width, page.rect.height), MAX_ZOOM)
    pix = page.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), alpha=False)
    return Image.frombytes("RGB", (pix.width, pix.height), pix.samples)


def _write(page: pymupdf.Page, text: str, top: float, bottom: float) -> None:
    spare = page.insert_textbox(
        pymupdf.Rect(MARGIN, top, A4[0] - MARGIN, bottom), text, fontname="helv", fontsize=11, encoding=0
    )
    assert spare >= 0, "text did not fit its box"


def _levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def _cer(reference: str, hypothesis: str) -> float:
    ref, hyp = " ".join(reference.split()), " ".join(hypothesis.split())
    return _levenshtein(ref, hyp) / len(ref)


def test_engine_satisfies_the_protocol(engine: TesseractEngine) -> None:
    """The engine is an OcrEngine named "tesseract" whose model is the binary's version line."""
    assert isinstance(engine, OcrEngine)
    assert engine.name == "tesseract"
    assert engine.model is not None
    assert engine.model.startswith("tesseract ")


@pytest.mark.parametrize("language", SUPPORTED_LANGUAGES)
def test_character_error_rate_per_language(engine: TesseractEngine, pdf_page: pymupdf.Page, language: str) -> None:
    """Natural 11 pt Helvetica text in each supported language is read back with at most 3% character errors."""
    _write(pdf_page, TEXTS[language], MARGIN, 400)
    (output,) = engine.recognize([PageInput(_render(pdf_page), languages=(language,))], span_threshold=0.5)
    assert output.finish_reason == "stop", output.error_message
    cer = _cer(TEXTS[language], output.text)
    assert cer <= 0.03, f"{language}: CER {cer:.2%}\n{output.text}"


def test_ruled_table_becomes_a_markdown_table(engine: TesseractEngine, pdf_page: pymupdf.Page) -> None:
    """A ruled 3x4 table between paragraphs comes out as a pipe table that extract_tables reads back exactly."""
    rows = [["Region", "Revenue", "Growth"], ["North", "1200", "4%"], ["South", "980", "-2%"], ["West", "1530", "7%"]]
    _write(pdf_page, "Quarterly report. The figures below summarise the sales of each region.", MARGIN, 150)
    top, cell_width, row_height = 170, 150, 24
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            rect = pymupdf.Rect(
                MARGIN + c * cell_width, top + r * row_height, MARGIN + (c + 1) * cell_width, top + (r + 1) * row_height
            )
            pdf_page.draw_rect(rect, color=(0, 0, 0), width=0.8)
            pdf_page.insert_text((rect.x0 + 6, rect.y1 - 8), cell, fontname="helv", fontsize=11)
    _write(pdf_page, "After the table comes more prose about the quarter.", 300, 400)
    (output,) = engine.recognize([PageInput(_render(pdf_page))], span_threshold=0.5)
    assert extract_tables(output.text) == [rows], output.text
    assert output.text.startswith("Quarterly report.")
    assert output.text.endswith("\n\nAfter the table comes more prose about the quarter.")


def test_blank_page_gives_empty_text(engine: TesseractEngine, pdf_page: pymupdf.Page) -> None:
    """A page with nothing on it succeeds with empty text and no confidence."""
    (output,) = engine.recognize([PageInput(_render(pdf_page))], span_threshold=0.5)
    assert output.finish_reason == "stop"
    assert output.text == ""
    assert output.confidence is None
    assert output.min_token_confidence is None
    assert output.low_confidence_spans == []
    assert output.token_count == 0


def test_unknown_language_code_is_rejected() -> None:
    """Codes outside the nine supported ones are poison with code "unsupported_language"; valid ones normalise."""
    with pytest.raises(PoisonError, match="xyz") as caught:
        validate_languages(["eng", "xyz"])
    assert caught.value.code == "unsupported_language"
    assert validate_languages([" FRA", "eng", "fra"]) == ("fra", "eng")


def test_confidence_and_low_confidence_spans(engine: TesseractEngine, pdf_page: pymupdf.Page) -> None:
    """Confidences lie in (0, 1]; blurred words fall below a high threshold and are reported as text spans."""
    clean = "The invoice was paid in full on the second of March by bank transfer."
    _write(pdf_page, clean, MARGIN, 150)
    _write(pdf_page, "Reference number smudged faintly here", 200, 300)
    image = _render(pdf_page)
    zoom = image.width / A4[0]
    box = (int(MARGIN * zoom), int(200 * zoom), int((A4[0] - MARGIN) * zoom), int(230 * zoom))
    image.paste(image.crop(box).filter(ImageFilter.GaussianBlur(1.8)), box)

    (output,) = engine.recognize([PageInput(image)], span_threshold=0.95)
    assert output.text.startswith(clean)
    assert output.confidence is not None
    assert output.min_token_confidence is not None
    assert 0.0 < output.min_token_confidence <= output.confidence <= 1.0
    assert output.token_count == len(output.text.split())
    assert output.low_confidence_spans, output.text
    for span in output.low_confidence_spans:
        assert 0 <= span.start < span.end <= len(output.text)
        assert 0.0 < span.confidence < 0.95
    assert any(span.start > len(clean) for span in output.low_confidence_spans)


def test_a_failing_page_does_not_fail_its_batch(engine: TesseractEngine, pdf_page: pymupdf.Page) -> None:
    """A page tesseract cannot process gets finish_reason "error" and code "ocr_failed"; its batch-mate succeeds."""
    _write(pdf_page, TEXTS["eng"], MARGIN, 400)
    image = _render(pdf_page)
    good, bad = engine.recognize(
        [PageInput(image, languages=("eng",)), PageInput(image, languages=("no-such-traineddata",))],
        span_threshold=0.5,
    )
    assert good.finish_reason == "stop"
    assert _cer(TEXTS["eng"], good.text) <= 0.03
    assert bad.finish_reason == "error"
    assert bad.error_code == "ocr_failed"
    assert bad.error_message
    assert bad.text == ""


def test_timeout_fails_the_page_without_raising(pdf_page: pymupdf.Page) -> None:
    """A tesseract run past its timeout is killed and reported as a failed page."""
    _write(pdf_page, TEXTS["eng"], MARGIN, 400)
    (output,) = TesseractEngine(timeout_s=0.001).recognize([PageInput(_render(pdf_page))], span_threshold=0.5)
    assert output.finish_reason == "error"
    assert output.error_code == "ocr_failed"
    assert output.error_message is not None
    assert "timed out" in output.error_message


def test_load_reports_missing_binary() -> None:
    """Without the binary, load raises ConfigError naming the Debian package to install."""
    with pytest.raises(ConfigError, match="tesseract-ocr"):
        TesseractEngine(binary="no-such-tesseract-binary").load()


def test_load_reports_missing_language_packs(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no traineddata visible, load raises ConfigError naming every missing tesseract-ocr-<lang> package."""
    monkeypatch.setenv("TESSDATA_PREFIX", str(tmp_path_factory.mktemp("empty-tessdata")))
    with pytest.raises(ConfigError, match="tesseract-ocr-deu") as caught:
        TesseractEngine(default_languages=("eng",), required_languages=("deu", "fra")).load()
    assert "tesseract-ocr-eng" in caught.value.message
    assert "tesseract-ocr-fra" in caught.value.message


def test_unsupported_default_language_is_a_config_error() -> None:
    """Configuring a default language outside the supported set fails at construction."""
    with pytest.raises(ConfigError, match="klingon"):
        TesseractEngine(default_languages=("klingon",))
