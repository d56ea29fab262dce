"""The CPU engine: the `tesseract` binary run as a subprocess per page, its TSV output turned into markdown.

Each page is one `tesseract stdin stdout -l LANGS --psm N tsv` call (PNG on stdin), so pages run in parallel
on a small thread pool and a crash or timeout fails only its own page. Words come back with boxes and a
confidence; we rebuild the text in tesseract's reading order (paragraphs separated by a blank line, lines by
a newline) and turn runs of lines whose words fall into the same columns into markdown pipe tables.

A page that names no language (and an engine configured without default languages) is detected first: a cheap
`eng` pass over two sampled text bands (detect.sample_bands) whose text py3langid classifies; when that sample
reads badly (few words or low confidence), or the page is landscape, Tesseract OSD (`--psm 0`) says which way
up the page is and it is turned before sampling again. Pages with explicit languages are turned only when
their own recognition reads badly (or they are landscape) and OSD then finds them rotated.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import statistics
import subprocess
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ocrbooth.errors import ConfigError, PoisonError
from ocrbooth.models.ocr.confidence import summarize
from ocrbooth.models.ocr.detect import LanguageIdentifier, Orientation, parse_osd, sample_bands, upright
from ocrbooth.models.ocr.engine import PageInput, PageOutput, Rotation

if TYPE_CHECKING:
    from PIL.Image import Image

SUPPORTED_LANGUAGES: tuple[str, ...] = ("eng", "fra", "deu", "spa", "ita", "nld", "por", "swe", "dan")
"""ISO 639-2 codes we accept; each is also tesseract's traineddata name and Debian's `tesseract-ocr-<code>`."""

DEFAULT_LANGUAGES: tuple[str, ...] = ("eng",)
"""What a page is read with when detection finds too little text to tell (and what the sample pass reads with)."""

OSD_LANGUAGE = "osd"  # tesseract's orientation-and-script model (Debian: tesseract-ocr-osd)
_READS_BADLY = 0.60  # mean word confidence below which a page may be turned: ask OSD
_MIN_SAMPLE_WORDS = 8  # a sample with fewer words may be sideways text: ask OSD
_MIN_OSD_CONFIDENCE = 2.0  # below this OSD's angle is a guess; the page is left as it is

_WORD_LEVEL = 5  # TSV `level` of a word row (1 page, 2 block, 3 paragraph, 4 line)
_TSV_COLUMNS = 12
_COLUMN_GAP_HEIGHTS = 2.0  # a gap wider than this many word heights separates table cells, not words
_ROW_GAP_HEIGHTS = 3.0  # table rows further apart than this (in line heights) belong to different tables
_RULE_WORD = re.compile(r"^[|¦]+$")  # a vertical table rule read as characters: a cell border, not text


def validate_languages(codes: Iterable[str]) -> tuple[str, ...]:
    """Normalise request language codes (lower case, duplicates dropped, order kept); raise
    PoisonError(code="unsupported_language") for any code outside SUPPORTED_LANGUAGES. Call before any work."""
    seen: list[str] = []
    unknown: list[str] = []
    for raw in codes:
        code = raw.strip().lower()
        if code not in SUPPORTED_LANGUAGES:
            unknown.append(raw)
        elif code not in seen:
            seen.append(code)
    if unknown:
        raise PoisonError(
            f"unsupported language code(s) {unknown!r}; supported: {', '.join(SUPPORTED_LANGUAGES)}",
            code="unsupported_language",
        )
    return tuple(seen)


@dataclass(frozen=True, slots=True)
class Detection:
    """What detection made of a page that named no language."""

    image: Image
    """The page, upright."""
    rotate_deg: Rotation
    """Clockwise rotation applied to make it upright."""
    languages: tuple[str, ...]
    """Languages to read it with; empty when the sample held too little text to tell."""


@dataclass(frozen=True, slots=True)
class _Word:
    text: str
    probability: float | None
    """conf/100; None where tesseract gave -1 (text kept, but it does not count towards confidence)."""
    left: int
    top: int
    width: int
    height: int

    @property
    def right(self) -> int:
        return self.left + self.width


@dataclass(slots=True)
class _Line:
    paragraph: tuple[int, int]
    """(block, paragraph) numbers: lines of one paragraph stay together in the text."""
    words: list[_Word] = field(default_factory=list)

    @property
    def top(self) -> int:
        return min(w.top for w in self.words)

    @property
    def bottom(self) -> int:
        return max(w.top + w.height for w in self.words)

    @property
    def height(self) -> float:
        return statistics.median(w.height for w in self.words)


@dataclass(slots=True)
class _Table:
    first: int
    """Index of the table's first line."""
    columns: list[list[int]]
    """[left, right] pixel range of each column, widened as rows join."""
    rows: list[list[list[_Word]]]
    """Rows of cells of words, cells in column order."""


class _TextBuilder:
    """Appends text and remembers each word's character range in the final string."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._length = 0
        self.probs: list[float] = []
        self.spans: list[tuple[int, int]] = []

    @property
    def length(self) -> int:
        return self._length

    def add(self, text: str) -> None:
        self._parts.append(text)
        self._length += len(text)

    def add_word(self, word: _Word, text: str) -> None:
        if word.probability is not None:
            self.probs.append(word.probability)
            self.spans.append((self._length, self._length + len(text)))
        self.add(text)

    def text(self) -> str:
        return "".join(self._parts)


class TesseractEngine:
    """OcrEngine on the `tesseract` binary (CPU). No Python bindings: one subprocess per page."""

    name = "tesseract"

    def __init__(
        self,
        *,
        default_languages: Sequence[str] = (),
        required_languages: Sequence[str] = SUPPORTED_LANGUAGES,
        psm: int = 3,
        timeout_s: float = 120.0,
        max_workers: int = 2,
        binary: str = "tesseract",
    ) -> None:
        """`default_languages` serve pages that name none; empty means detect each such page's language and
        orientation. `load()` checks that those and `required_languages` are installed. `psm` is tesseract's
        page segmentation mode (3: automatic)."""
        try:
            self.default_languages = validate_languages(default_languages)
            self.required_languages = validate_languages(required_languages)
        except PoisonError as exc:
            raise ConfigError(f"tesseract engine: {exc}") from exc
        self.model: str | None = None
        self.psm = psm
        self.timeout_s = timeout_s
        self.max_workers = max(1, max_workers)
        self.binary = binary
        self.identifier = LanguageIdentifier(self.required_languages or SUPPORTED_LANGUAGES)
        # tesseract's OpenMP threads would oversubscribe the cores our own thread pool already fills.
        self._env = {**os.environ, "OMP_THREAD_LIMIT": "1"}

    def load(self) -> None:
        """Check the binary runs and every default/required language pack is installed; ConfigError if not."""
        path = shutil.which(self.binary)
        if path is None:
            raise ConfigError(
                f"tesseract binary {self.binary!r} not found on PATH; install the Debian package tesseract-ocr "
                "(scripts/install-system-deps.sh)"
            )
        version = self._run_info("--version")
        self.model = next((line.strip() for line in version.splitlines() if line.strip()), "tesseract")
        listed = self._run_info("--list-langs").splitlines()[1:]  # first line names the tessdata folder
        installed = {line.strip() for line in listed}
        # OSD serves every engine: pages with explicit languages are turned upright too when they read badly.
        wanted = dict.fromkeys((*self.default_languages, *self.required_languages, *DEFAULT_LANGUAGES, OSD_LANGUAGE))
        missing = [code for code in wanted if code not in installed]
        if missing:
            packages = " ".join(f"tesseract-ocr-{code}" for code in missing)
            raise ConfigError(
                f"tesseract language data missing for {', '.join(missing)}; install the Debian packages: "
                f"apt-get install {packages} (scripts/install-system-deps.sh)"
            )
        if not self.default_languages:
            self.identifier.load()

    def _run_info(self, flag: str) -> str:
        try:
            done = subprocess.run(
                [self.binary, flag], capture_output=True, timeout=30, check=True, env=self._env, text=True
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise ConfigError(f"tesseract {flag} failed: {exc}") from exc
        # Older builds print --version on stderr.
        return done.stdout or done.stderr

    def cost(self, page: PageInput) -> int:
        """Every page costs one slot: tesseract has no token budget."""
        return 1

    def recognize(self, pages: list[PageInput], *, span_threshold: float) -> list[PageOutput]:
        """Recognise pages in parallel (one subprocess each); a failing page gets finish_reason="error"."""
        if len(pages) <= 1 or self.max_workers == 1:
            return [self._recognize_one(page, span_threshold) for page in pages]
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(pages)), thread_name_prefix="tesseract") as pool:
            return list(pool.map(lambda page: self._recognize_one(page, span_threshold), pages))

    def detect(self, image: Image) -> Detection:
        """Orientation and languages of a page that names none (see the module docstring)."""
        words = self._sample(image)
        rotate: Rotation = 0
        # Tesseract reads a sideways page's vertical lines well enough to pass the sample check, so a landscape
        # page (what a portrait page scanned sideways becomes) always asks OSD.
        if image.width > image.height or _reads_badly(words, _MIN_SAMPLE_WORDS):
            orientation = self._orientation(image)
            if orientation is not None:
                rotate = orientation.rotate_deg
                image = upright(image, rotate)
                words = self._sample(image)
        text = "\n".join(" ".join(word.text for word in line.words) for line in words)
        return Detection(image=image, rotate_deg=rotate, languages=self.identifier.choose(text))

    def _sample(self, image: Image) -> list[_Line]:
        return _parse_tsv(self._run_tesseract(sample_bands(image), DEFAULT_LANGUAGES))

    def _orientation(self, image: Image) -> Orientation | None:
        """OSD's rotation when it is confident the page is not upright; None otherwise (or when OSD fails)."""
        try:
            osd = parse_osd(self._run_tesseract(image, (OSD_LANGUAGE,), psm=0, output=()))
        except subprocess.SubprocessError:  # "too few characters" and the like: leave the page as it is
            return None
        if osd is None or osd.rotate_deg == 0 or osd.confidence < _MIN_OSD_CONFIDENCE:
            return None
        return osd

    def _recognize_one(self, page: PageInput, span_threshold: float) -> PageOutput:
        languages = page.languages or self.default_languages
        image = page.image
        rotate: Rotation = 0
        detected: tuple[str, ...] = ()
        try:
            if not languages:
                detection = self.detect(image)
                image, rotate, detected = detection.image, detection.rotate_deg, detection.languages
                languages = detected or DEFAULT_LANGUAGES
            lines = _parse_tsv(self._run_tesseract(image, languages))
            if not detected and (image.width > image.height or _reads_badly(lines, 1)):
                orientation = self._orientation(image)
                if orientation is not None:
                    turned = _parse_tsv(self._run_tesseract(upright(image, orientation.rotate_deg), languages))
                    if _mean_probability(turned) > _mean_probability(lines):
                        lines, rotate = turned, orientation.rotate_deg
        except subprocess.TimeoutExpired:
            return _failed(f"tesseract timed out after {self.timeout_s:g} s")
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            return _failed(str(exc))
        builder = _layout(lines)
        text = builder.text()
        confidence, minimum, spans = summarize(builder.probs, builder.spans, threshold=span_threshold)
        return PageOutput(
            text=text,
            finish_reason="stop",
            confidence=confidence,
            min_token_confidence=minimum,
            low_confidence_spans=spans,
            token_count=len(builder.probs),
            languages=detected,
            rotation_deg=rotate,
        )

    def _run_tesseract(
        self, image: Image, languages: Sequence[str], *, psm: int | None = None, output: Sequence[str] = ("tsv",)
    ) -> str:
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1)  # speed over size: it only crosses a pipe
        mode = self.psm if psm is None else psm
        argv = [self.binary, "stdin", "stdout", "-l", "+".join(languages), "--psm", str(mode), *output]
        done = subprocess.run(argv, input=buffer.getvalue(), capture_output=True, timeout=self.timeout_s, env=self._env)
        if done.returncode != 0:
            stderr = done.stderr.decode("utf-8", "replace").strip()[-500:]
            raise subprocess.SubprocessError(f"tesseract exited with {done.returncode}: {stderr}")
        return done.stdout.decode("utf-8", "replace")


def _mean_probability(lines: Sequence[_Line]) -> float:
    probs = [word.probability for line in lines for word in line.words if word.probability is not None]
    return sum(probs) / len(probs) if probs else 0.0


def _reads_badly(lines: Sequence[_Line], min_words: int) -> bool:
    """Too few words, or words read with low confidence: what upside-down or sideways text looks like."""
    words = sum(len(line.words) for line in lines)
    return words < min_words or _mean_probability(lines) < _READS_BADLY


def _failed(message: str) -> PageOutput:
    return PageOutput(text="", finish_reason="error", error_code="ocr_failed", error_message=message)


def _parse_tsv(tsv: str) -> list[_Line]:
    """Tesseract TSV to lines of words in tesseract's reading order (blocks, paragraphs, lines, words).
    Layout rows and words without text (blank boxes tesseract reports for table rules) are dropped."""
    lines: dict[tuple[int, int, int], _Line] = {}
    rows = tsv.splitlines()
    if rows and rows[0].startswith("level"):
        rows = rows[1:]
    for row in rows:
        cols = row.split("\t")
        if len(cols) < _TSV_COLUMNS:
            if row.strip():
                raise ValueError(f"unexpected tesseract TSV row: {row!r}")
            continue
        if int(cols[0]) != _WORD_LEVEL:
            continue
        text = cols[11].strip()
        conf = float(cols[10])
        if not text:
            continue
        block, par, line = int(cols[2]), int(cols[3]), int(cols[4])
        word = _Word(
            text=text,
            probability=None if conf < 0 else min(conf / 100.0, 1.0),
            left=int(cols[6]),
            top=int(cols[7]),
            width=int(cols[8]),
            height=int(cols[9]),
        )
        lines.setdefault((block, par, line), _Line(paragraph=(block, par))).words.append(word)
    return list(lines.values())


def _layout(lines: Sequence[_Line]) -> _TextBuilder:
    """Paragraphs joined by blank lines, lines by newlines, words by spaces; detected tables as markdown."""
    tables = {table.first: table for table in _find_tables(lines)}
    builder = _TextBuilder()
    index = 0
    previous_paragraph: tuple[int, int] | None = None
    while index < len(lines):
        if builder.length:
            same_paragraph = previous_paragraph == lines[index].paragraph and index not in tables
            builder.add("\n" if same_paragraph else "\n\n")
        table = tables.get(index)
        if table is not None:
            _emit_table(builder, table)
            index += len(table.rows)
            previous_paragraph = None  # whatever follows a table starts a new paragraph
            continue
        line = lines[index]
        for position, word in enumerate(line.words):
            if position:
                builder.add(" ")
            builder.add_word(word, word.text)
        previous_paragraph = line.paragraph
        index += 1
    return builder


def _segments(line: _Line) -> list[list[_Word]]:
    """Split a line's words into cells at gaps much wider than a word space, or at `|` rule characters."""
    cells: list[list[_Word]] = [[]]
    limit = _COLUMN_GAP_HEIGHTS * line.height
    previous: _Word | None = None
    for word in line.words:
        if _RULE_WORD.match(word.text):
            cells.append([])
            previous = None
            continue
        if previous is not None and word.left - previous.right > limit:
            cells.append([])
        cells[-1].append(word)
        previous = word
    return [cell for cell in cells if cell]


def _span(cell: list[_Word]) -> tuple[int, int]:
    return min(w.left for w in cell), max(w.right for w in cell)


def _place(columns: list[list[int]], cells: list[list[_Word]]) -> list[int] | None:
    """Column index of each cell (by horizontal overlap), or None if two cells claim one column or a cell
    straddles two: then the line does not continue the table."""
    placed: list[int] = []
    for cell in cells:
        left, right = _span(cell)
        hits = [i for i, (c_left, c_right) in enumerate(columns) if left < c_right and right > c_left]
        if len(hits) != 1 or hits[0] in placed or (placed and hits[0] < placed[-1]):
            return None
        placed.append(hits[0])
    return placed


def _find_tables(lines: Sequence[_Line]) -> list[_Table]:
    """Runs of >= 2 consecutive lines, each split into >= 2 cells that line up in the same columns."""
    tables: list[_Table] = []
    current: _Table | None = None
    for index, line in enumerate(lines):
        cells = _segments(line)
        if len(cells) < 2:
            _close(current, tables)
            current = None
            continue
        if current is not None:
            last = lines[index - 1]
            placed = _place(current.columns, cells)
            close_below = last.bottom <= line.top + line.height / 2 and (
                line.top - last.bottom <= _ROW_GAP_HEIGHTS * max(line.height, last.height)
            )
            if placed is not None and close_below:
                row: list[list[_Word]] = [[] for _ in current.columns]
                for column, cell in zip(placed, cells, strict=True):
                    row[column] = cell
                    left, right = _span(cell)
                    bounds = current.columns[column]
                    current.columns[column] = [min(bounds[0], left), max(bounds[1], right)]
                current.rows.append(row)
                continue
            _close(current, tables)
        current = _Table(first=index, columns=[list(_span(cell)) for cell in cells], rows=[cells])
    _close(current, tables)
    return tables


def _close(table: _Table | None, tables: list[_Table]) -> None:
    if table is not None and len(table.rows) >= 2:
        tables.append(table)


def _emit_table(builder: _TextBuilder, table: _Table) -> None:
    width = len(table.columns)
    for number, row in enumerate(table.rows):
        if number == 1:
            builder.add("|" + " --- |" * width + "\n")
        builder.add("|")
        for cell in row:
            builder.add(" ")
            for position, word in enumerate(cell):
                if position:
                    builder.add(" ")
                builder.add_word(word, word.text.replace("|", "\\|"))
            builder.add(" |" if cell else "|")
        if number < len(table.rows) - 1:
            builder.add("\n")
