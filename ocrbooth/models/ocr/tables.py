"""Tables out of page text, whichever engine wrote it: markdown pipe tables and HTML `<table>` elements. Pure.

Each table comes back as rows of stripped cell strings, header row first, the markdown `---` row left out,
in the order the tables start in the text.

Markdown follows GitHub's table rules where they matter for OCR output: a header row, then a delimiter row
(`---`, `:--`, `--:`, `:-:` cells) with as many cells as the header; body rows run until a blank line or a
line without a pipe, and are padded with empty cells or cut to the header's width. `\\|` is a literal pipe.

HTML: `<tr>` rows of `<td>`/`<th>` cells; `thead`/`tbody`/`tfoot` are just containers, attributes other
than the spans are ignored, markup inside a cell is dropped to its text, entities are unescaped and
whitespace collapses as a browser shows it (`<br>` counts as a space). Omitted `</td>`, `</tr>` are
tolerated. A cell spanning several columns or rows keeps its text in its first (top-left) position and
leaves the positions it covers empty (""), so every row keeps the grid's column positions without
duplicating text. A table nested in a cell is returned as a table of its own and adds nothing to the cell.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from html.parser import HTMLParser

_DELIMITER_CELL = re.compile(r"^:?-+:?$")
_MAX_SPAN = 1000  # what browsers clamp colspan to; also keeps a hostile rowspan from allocating millions of cells


def extract_tables(text: str) -> list[list[list[str]]]:
    """Every markdown pipe table and HTML table in `text`, as rows of cell strings, in text order."""
    html_tables, html_lines = _html_tables(text)
    found = html_tables + _markdown_tables(text.split("\n"), skip=html_lines)
    found.sort(key=lambda item: item[0])
    return [rows for _, rows in found]


# --- markdown ---------------------------------------------------------------------------------------------


def _split_row(line: str) -> list[str] | None:
    """Cells of a pipe-table row (outer pipes optional, `\\|` escaped), or None if the line has no pipe."""
    stripped = line.strip()
    pieces: list[str] = []
    current: list[str] = []
    pipes = 0
    index = 0
    while index < len(stripped):
        char = stripped[index]
        if char == "\\" and stripped[index + 1 : index + 2] == "|":
            current.append("|")
            index += 2
            continue
        if char == "|":
            pieces.append("".join(current))
            current = []
            pipes += 1
        else:
            current.append(char)
        index += 1
    pieces.append("".join(current))
    if pipes == 0:
        return None
    if stripped.startswith("|"):
        pieces = pieces[1:]
    if stripped.endswith("|") and not stripped.endswith("\\|"):
        pieces = pieces[:-1]
    return [piece.strip() for piece in pieces]


def _is_delimiter(cells: list[str]) -> bool:
    return bool(cells) and all(_DELIMITER_CELL.match(cell.replace(" ", "")) for cell in cells)


def _markdown_tables(lines: list[str], *, skip: set[int]) -> list[tuple[int, list[list[str]]]]:
    """(offset of the header line, rows) for each pipe table; lines in `skip` belong to HTML tables."""
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line) + 1)
    tables: list[tuple[int, list[list[str]]]] = []
    index = 0
    while index + 1 < len(lines):
        if index in skip or index + 1 in skip:
            index += 1
            continue
        header = _split_row(lines[index])
        delimiter = _split_row(lines[index + 1]) if header is not None else None
        if header is None or delimiter is None or len(delimiter) != len(header):
            index += 1
            continue
        if not _is_delimiter(delimiter):
            index += 1
            continue
        rows = [header]
        index += 2
        while index < len(lines) and index not in skip and lines[index].strip():
            cells = _split_row(lines[index])
            if cells is None:
                break
            rows.append((cells + [""] * len(header))[: len(header)])
            index += 1
        tables.append((offsets[index - len(rows) - 1], rows))
    return tables


# --- HTML -------------------------------------------------------------------------------------------------


@dataclass
class _HtmlTable:
    offset: int
    rows: list[list[str]] = field(default_factory=list)
    row: list[str] | None = None
    """The open row; None between rows."""
    cell: list[str] | None = None
    """Text pieces of the open cell; None outside cells."""
    cell_span: tuple[int, int] = (1, 1)
    covered: set[tuple[int, int]] = field(default_factory=set)
    """(row, column) positions taken by earlier cells' rowspans."""

    def start_row(self) -> None:
        self.end_row()
        self.row = []

    def end_row(self) -> None:
        self.end_cell()
        if self.row is not None:
            self._skip_covered()
            if self.row:
                self.rows.append(self.row)
            self.row = None

    def start_cell(self, colspan: int, rowspan: int) -> None:
        self.end_cell()
        if self.row is None:
            self.row = []
        self._skip_covered()
        self.cell = []
        self.cell_span = (colspan, rowspan)

    def end_cell(self) -> None:
        if self.cell is None or self.row is None:
            self.cell = None
            return
        colspan, rowspan = self.cell_span
        row_number, column = len(self.rows), len(self.row)
        self.row.append(" ".join("".join(self.cell).split()))
        self.row.extend([""] * (colspan - 1))
        for below in range(1, rowspan):
            for offset in range(colspan):
                self.covered.add((row_number + below, column + offset))
        self.cell = None

    def _skip_covered(self) -> None:
        """Fill positions that a cell above spans into, so this row's next cell lands in the right column."""
        while self.row is not None and (len(self.rows), len(self.row)) in self.covered:
            self.row.append("")


class _TableParser(HTMLParser):
    def __init__(self, line_offsets: list[int]) -> None:
        super().__init__(convert_charrefs=True)
        self._line_offsets = line_offsets
        self._open: list[tuple[_HtmlTable, int]] = []
        """Tables being read (innermost last) with the line each started on."""
        self._ignored_depth = 0
        self.tables: list[_HtmlTable] = []
        self.table_lines: set[int] = set()

    def _offset(self) -> int:
        line, column = self.getpos()
        return self._line_offsets[line - 1] + column

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style"):
            self._ignored_depth += 1
        if tag == "table":
            table = _HtmlTable(offset=self._offset())
            self.tables.append(table)
            self._open.append((table, self.getpos()[0]))
            return
        if not self._open:
            return
        table = self._open[-1][0]
        if tag == "tr":
            table.start_row()
        elif tag in ("td", "th"):
            spans = dict(attrs)
            table.start_cell(_span(spans.get("colspan")), _span(spans.get("rowspan")))
        elif tag == "br":
            self.handle_data(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self._ignored_depth = max(0, self._ignored_depth - 1)
        if not self._open:
            return
        table, first_line = self._open[-1]
        if tag == "table":
            table.end_row()
            self._open.pop()
            if not self._open:
                self.table_lines.update(range(first_line - 1, self.getpos()[0]))
        elif tag == "tr":
            table.end_row()
        elif tag in ("td", "th"):
            table.end_cell()

    def handle_data(self, data: str) -> None:
        if self._open and not self._ignored_depth:
            table = self._open[-1][0]
            if table.cell is not None:
                table.cell.append(data)

    def close(self) -> None:
        super().close()
        while self._open:  # an unterminated table still counts up to the end of the text
            table, first_line = self._open.pop()
            table.end_row()
            if not self._open:
                self.table_lines.update(range(first_line - 1, len(self._line_offsets)))


def _span(value: str | None) -> int:
    try:
        return min(max(int(value or "1"), 1), _MAX_SPAN)
    except ValueError:
        return 1


def _html_tables(text: str) -> tuple[list[tuple[int, list[list[str]]]], set[int]]:
    """(offset, rows) of each non-empty HTML table, and the 0-based line numbers that outer tables cover."""
    if "<table" not in text.lower():
        return [], set()
    line_offsets = [0]
    for line in text.split("\n"):
        line_offsets.append(line_offsets[-1] + len(line) + 1)
    parser = _TableParser(line_offsets)
    parser.feed(text)
    parser.close()
    return [(table.offset, table.rows) for table in parser.tables if table.rows], parser.table_lines
