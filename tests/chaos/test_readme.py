"""The README's chaos table says what the chaos scenarios of this session measured (run after them)."""

from __future__ import annotations

import os
from dataclasses import replace

from tests.chaos.figures import (
    BEGIN,
    END,
    MEASURED,
    README,
    SCENARIOS,
    UPDATE_ENV,
    Figures,
    disagreements,
    read_rows,
    rewrite,
)


def test_readme_chaos_table_matches_what_the_suite_measured() -> None:
    """Every scenario has a row; for each scenario that passed in this session, sent, answered, lost, failed
    and dead letters by code match exactly, and duplicates and wall time are within the row's bounds.
    With OCRBOOTH_UPDATE_README=1 the measured rows are written into the README instead."""
    text = README.read_text(encoding="utf-8")
    if os.environ.get(UPDATE_ENV) == "1" and MEASURED:
        text = rewrite(text, MEASURED)
        README.write_text(text, encoding="utf-8")
    rows = read_rows(text)
    missing = [key for key in SCENARIOS if key not in rows]
    assert not missing, f"README chaos table has no row for {missing}; run the suite with {UPDATE_ENV}=1"
    problems = [f"{key}: {p}" for key, measured in MEASURED.items() for p in disagreements(rows[key], measured)]
    assert not problems, (
        "the README's chaos table disagrees with this run:\n  "
        + "\n  ".join(problems)
        + f"\nIf the change is intended, rerun with {UPDATE_ENV}=1 to rewrite the table."
    )


def test_chaos_table_rows_read_back_as_written_and_disagreements_are_named() -> None:
    """A rendered row reads back with the same figures; a changed count or a blown bound is reported, and a
    `?` (not measured yet) never passes for a figure."""
    figures = Figures(
        scenario="crash_loop",
        sent=80,
        answered=80,
        lost=0,
        duplicated=3,
        duplicate_bound=24,
        failed=0,
        wall_s=41.4,
        wall_bound_s=150,
        dead_lettered={"crash_loop": 1},
    )
    text = f"x\n{BEGIN}\n{END}\ny"
    text = rewrite(text, {"crash_loop": figures})
    row = read_rows(text)["crash_loop"]
    assert disagreements(row, figures) == []
    assert disagreements(row, replace(figures, duplicated=7, wall_s=99)) == []
    assert disagreements(row, replace(figures, lost=1)) == ["lost: README says 0, measured 1"]
    assert disagreements(row, replace(figures, dead_lettered={"crash_loop": 2})) != []
    assert disagreements(row, replace(figures, duplicated=25)) != []
    assert disagreements(row, replace(figures, wall_s=151)) != []
    pending = read_rows(text.replace("| 80 | 80 |", "| ? | 80 |"))["crash_loop"]
    assert pending.sent is None
    assert disagreements(pending, figures) == ["sent: README has no figure yet (`?`), measured 80"]
    assert text.startswith("x\n")
    assert text.endswith(f"{END}\ny")
