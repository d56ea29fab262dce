"""Tesseract's TSV output to lines of words, and lines to text: paragraphs separated by a blank line, lines by
a newline, runs of lines whose words fall into the same columns as markdown pipe tables. Each word keeps its
confidence and its character range in the text, for the page's confidence and low-confidence spans."""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

_WORD_LEVEL = 5  # TSV `level` of a word row (1 page, 2 block, 3 paragraph, 4 line)
_TSV_COLUMNS = 12
_COLUMN_GAP_HEIGHTS = 2.0  # a gap wider than this many word heights separates table cells, not words
_ROW_GAP_HEIGHTS = 3.0  # table rows further apart than this (in line heights) belong to different tables
_RULE_WORD = re.compile(r"^[|¦]+$")  # a vertical table rule read as characters: a cell border, not text


@dataclass(frozen=True, slots=True)
class Word:
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
class Line:
    paragraph: tuple[int, int]
    """(block, paragraph) numbers: lines of one paragraph stay together in the text."""
    words: list[Word] = field(default_factory=list)

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
    rows: list[list[list[Word]]]
    """Rows of cells of words, cells in column order."""


class TextBuilder:
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

    def add_word(self, word: Word, text: str) -> None:
        if word.probability is not None:
            self.probs.append(word.probability)
            self.spans.append((self._length, self._length + len(text)))
        self.add(text)

    def text(self) -> str:
        return "".join(self._parts)


def parse_tsv(tsv: str) -> list[Line]:
    """Tesseract TSV to lines of words in tesseract's reading order (blocks, paragraphs, lines, words).
    Layout rows and words without text (blank boxes tesseract reports for table rules) are dropped."""
    lines: dict[tuple[int, int, int], Line] = {}
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
        word = Word(
            text=text,
            probability=None if conf < 0 else min(conf / 100.0, 1.0),
            left=int(cols[6]),
            top=int(cols[7]),
            width=int(cols[8]),
            height=int(cols[9]),
        )
        lines.setdefault((block, par, line), Line(paragraph=(block, par))).words.append(word)
    return list(lines.values())


def layout(lines: Sequence[Line]) -> TextBuilder:
    """Paragraphs joined by blank lines, lines by newlines, words by spaces; detected tables as markdown."""
    tables = {table.first: table for table in _find_tables(lines)}
    builder = TextBuilder()
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


def _segments(line: Line) -> list[list[Word]]:
    """Split a line's words into cells at gaps much wider than a word space, or at `|` rule characters."""
    cells: list[list[Word]] = [[]]
    limit = _COLUMN_GAP_HEIGHTS * line.height
    previous: Word | None = None
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


def _span(cell: list[Word]) -> tuple[int, int]:
    return min(w.left for w in cell), max(w.right for w in cell)


def _place(columns: list[list[int]], cells: list[list[Word]]) -> list[int] | None:
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


def _find_tables(lines: Sequence[Line]) -> list[_Table]:
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
                row: list[list[Word]] = [[] for _ in current.columns]
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


def _emit_table(builder: TextBuilder, table: _Table) -> None:
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
