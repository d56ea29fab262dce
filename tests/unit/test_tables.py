"""Table extraction from page text: markdown pipe tables and HTML tables, alone and mixed."""

from __future__ import annotations

import pytest

from ocrbooth.models.ocr.tables import extract_tables

# --- markdown ---------------------------------------------------------------------------------------------


def test_markdown_table_with_outer_pipes() -> None:
    """A header, a `---` row and body rows give the header and body rows, cells stripped, separator left out."""
    text = "| Name | Qty | Price |\n| --- | --- | --- |\n| Apple | 3 | 1.20 |\n| Pear  | 10 | 0.80 |"
    assert extract_tables(text) == [
        [["Name", "Qty", "Price"], ["Apple", "3", "1.20"], ["Pear", "10", "0.80"]],
    ]


def test_markdown_table_without_outer_pipes() -> None:
    """Rows need no leading or trailing pipe."""
    text = "Name | Qty\n--- | ---\nApple | 3\nPear | 10"
    assert extract_tables(text) == [[["Name", "Qty"], ["Apple", "3"], ["Pear", "10"]]]


def test_markdown_alignment_row_is_a_separator() -> None:
    """Delimiter cells with alignment colons (`:--`, `:-:`, `--:`) are recognised and dropped."""
    text = "| L | C | R |\n|:---|:---:|---:|\n| a | b | c |"
    assert extract_tables(text) == [[["L", "C", "R"], ["a", "b", "c"]]]


def test_markdown_single_column_table() -> None:
    """A one-column table with outer pipes is a table."""
    assert extract_tables("| Item |\n| --- |\n| one |\n| two |") == [[["Item"], ["one"], ["two"]]]


def test_markdown_header_only_table() -> None:
    """A header and a separator with no body rows yield just the header row."""
    assert extract_tables("| a | b |\n|---|---|\n\nAfter.") == [[["a", "b"]]]


def test_markdown_escaped_pipes_stay_inside_cells() -> None:
    """`\\|` is a literal pipe in a cell, not a column boundary, including at the end of a row."""
    text = "| Expr | Meaning |\n| --- | --- |\n| a \\| b | a or b |\n| x | ends with \\|"
    assert extract_tables(text) == [[["Expr", "Meaning"], ["a | b", "a or b"], ["x", "ends with |"]]]


def test_markdown_empty_cells_and_ragged_rows() -> None:
    """Empty cells stay as "", short rows are padded and long rows cut to the header's width."""
    text = "| a | b | c |\n| --- | --- | --- |\n| 1 | | 3 |\n| 4 |\n| 5 | 6 | 7 | 8 |"
    assert extract_tables(text) == [
        [["a", "b", "c"], ["1", "", "3"], ["4", "", ""], ["5", "6", "7"]],
    ]


def test_two_markdown_tables_in_one_text() -> None:
    """Two tables separated by prose come back as two tables, in order; the prose is not a row."""
    text = (
        "Intro line.\n\n| a | b |\n| --- | --- |\n| 1 | 2 |\n\nSome prose between.\n\n"
        "| x | y | z |\n|---|---|---|\n| 7 | 8 | 9 |\n"
    )
    assert extract_tables(text) == [
        [["a", "b"], ["1", "2"]],
        [["x", "y", "z"], ["7", "8", "9"]],
    ]


def test_table_ends_at_a_line_without_pipes() -> None:
    """Prose right after the last row (no blank line) is not swallowed into the table."""
    text = "| a | b |\n| - | - |\n| 1 | 2 |\nThe total is 3."
    assert extract_tables(text) == [[["a", "b"], ["1", "2"]]]


@pytest.mark.parametrize(
    "text",
    [
        "Choose yes | no on the form.\nThen sign below.",
        "Choose yes | no.\n---\nA ruler, not a delimiter row of two cells.",
        "| a | b |\n| --- |\n| 1 | 2 |",
        "a | b\n--- | x\n1 | 2",
        "Plain text with no tables at all.",
        "",
    ],
)
def test_pipes_in_prose_are_not_tables(text: str) -> None:
    """Pipes in prose, or a delimiter row that does not match the header, give no table."""
    assert extract_tables(text) == []


# --- HTML -------------------------------------------------------------------------------------------------


def test_html_table_with_thead_tbody_and_th() -> None:
    """`thead`/`tbody` are containers; `th` and `td` cells both count, attributes are ignored."""
    text = (
        '<table class="grid" border="1">\n<thead><tr><th scope="col">Name</th><th>Qty</th></tr></thead>\n'
        '<tbody>\n<tr><td style="x">Apple</td><td>3</td></tr>\n<tr><td>Pear</td><td>10</td></tr>\n</tbody>\n</table>'
    )
    assert extract_tables(text) == [[["Name", "Qty"], ["Apple", "3"], ["Pear", "10"]]]


def test_html_entities_are_unescaped() -> None:
    """Named and numeric character references become the characters they stand for."""
    text = "<table><tr><td>Fish &amp; chips</td><td>&lt;5&gt;</td><td>caf&eacute; &#8364;3</td></tr></table>"
    assert extract_tables(text) == [[["Fish & chips", "<5>", "café €3"]]]


def test_html_nested_markup_is_reduced_to_text() -> None:
    """Inline markup inside cells is dropped, its text kept; whitespace and `<br>` collapse to single spaces."""
    text = (
        "<table><tr><td><b>Total</b> <i>due</i></td><td>  12\n  <span>EUR</span></td></tr>"
        "<tr><td>line one<br/>line two</td><td><a href='#'>link</a></td></tr></table>"
    )
    assert extract_tables(text) == [[["Total due", "12 EUR"], ["line one line two", "link"]]]


def test_html_colspan_and_rowspan_leave_covered_positions_empty() -> None:
    """A spanning cell keeps its text in its first position; positions it covers are "" so columns line up."""
    text = (
        "<table><tr><th colspan='2'>Period</th><th>Total</th></tr>"
        "<tr><td rowspan=2>Q1</td><td>Jan</td><td>5</td></tr>"
        "<tr><td>Feb</td><td>6</td></tr></table>"
    )
    assert extract_tables(text) == [[["Period", "", "Total"], ["Q1", "Jan", "5"], ["", "Feb", "6"]]]


def test_html_omitted_end_tags_are_tolerated() -> None:
    """Rows and cells without `</td>`/`</tr>` (valid HTML) still parse, as does a table left unclosed."""
    text = "<table><tr><td>a<td>b<tr><td>c<td>d</table>\n<table><tr><td>open"
    assert extract_tables(text) == [[["a", "b"], ["c", "d"]], [["open"]]]


def test_html_nested_table_is_its_own_table() -> None:
    """A table inside a cell comes back separately, after its outer table, and adds nothing to the outer cell."""
    text = "<table><tr><td>outer<table><tr><td>inner</td></tr></table></td><td>x</td></tr></table>"
    assert extract_tables(text) == [[["outer", "x"]], [["inner"]]]


def test_html_without_rows_gives_no_table() -> None:
    """An empty `<table>` and markup outside tables give nothing."""
    assert extract_tables("<p>Hello <b>there</b></p><table></table>") == []


# --- mixed ------------------------------------------------------------------------------------------------


def test_mixed_markdown_and_html_tables_in_text_order() -> None:
    """Markdown and HTML tables in one text come back in the order they appear."""
    text = (
        "# Report\n\n<table><tr><th>h1</th><th>h2</th></tr><tr><td>1</td><td>2</td></tr></table>\n\n"
        "Then markdown:\n\n| k | v |\n| --- | --- |\n| a | b |\n\n"
        "<table>\n<tr><td>last</td></tr>\n</table>"
    )
    assert extract_tables(text) == [
        [["h1", "h2"], ["1", "2"]],
        [["k", "v"], ["a", "b"]],
        [["last"]],
    ]


def test_pipes_inside_html_tables_do_not_make_markdown_tables() -> None:
    """Pipe-and-dash text inside an HTML table's lines is cell text, not a second (markdown) table."""
    text = "<table>\n<tr><td>a | b</td></tr>\n<tr><td>--- | ---</td></tr>\n</table>"
    assert extract_tables(text) == [[["a | b"], ["--- | ---"]]]
