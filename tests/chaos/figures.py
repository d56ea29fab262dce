"""What each chaos scenario measured, and the README table made from it.

Every scenario builds one `Figures` and hands it to the `chaos_report` fixture, which prints it and keeps
it for the session if the test passed. `test_readme.py` (run last) compares the README's table with what
was kept: the deterministic columns (sent, answered, lost, failed, dead letters by code) exactly, the
others (duplicates, wall time) against the bounds the table states. `OCRBOOTH_UPDATE_README=1` rewrites
the table instead.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

README = Path(__file__).resolve().parents[2] / "README.md"
BEGIN = "<!-- chaos-table:begin (written by tests/chaos; OCRBOOTH_UPDATE_README=1 pytest tests/chaos) -->"
END = "<!-- chaos-table:end -->"
UPDATE_ENV = "OCRBOOTH_UPDATE_README"

# Row order of the table, and the label each scenario id is shown with.
SCENARIOS: dict[str, str] = {
    "sigkill": "10 SIGKILLs during a stream",
    "rebalance_storm": "rebalance storm, 3 replicas",
    "broker_restart": "2 broker restarts (log in S3)",
    "s3_outage": "S3 down for 60 s during OCR",
    "broker_proxy": "proxy resets and stalls broker connections",
    "malformed": "generated malformed messages, every input topic",
    "crash_loop": "planted message kills the process",
}

HEADER = (
    "| scenario | sent | answered | lost | duplicated (bound) | failed | dead-lettered, by code | wall time (bound) |"
)
RULE = "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |"


@dataclass
class Figures:
    """One scenario's outcome. `answered` counts distinct inputs with an output (result or dead letter)."""

    scenario: str
    sent: int
    answered: int
    lost: int
    duplicated: int
    duplicate_bound: int
    failed: int
    wall_s: float
    wall_bound_s: int
    dead_lettered: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of_tally(
        cls,
        scenario: str,
        counted: Any,
        *,
        sent: int,
        duplicate_bound: int,
        started: float,
        wall_bound_s: int,
        dead_lettered: dict[str, int] | None = None,
    ) -> Figures:
        """From `common.tally`'s counts of the results, the scenario's bounds and its `time.monotonic()` start."""
        return cls(
            scenario=scenario,
            sent=sent,
            answered=counted.answered,
            lost=counted.lost,
            duplicated=counted.duplicated,
            duplicate_bound=duplicate_bound,
            failed=counted.failed,
            wall_s=time.monotonic() - started,
            wall_bound_s=wall_bound_s,
            dead_lettered=dead_lettered or {},
        )

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {self.scenario!r}; add it to SCENARIOS")

    def line(self) -> str:
        """One line for logs and the terminal summary."""
        letters = _codes(self.dead_lettered)
        return (
            f"{self.scenario}: sent={self.sent} answered={self.answered} lost={self.lost} "
            f"duplicated={self.duplicated} (bound {self.duplicate_bound}) failed={self.failed} "
            f"dead-lettered={letters} wall={self.wall_s:.0f}s (bound {self.wall_bound_s}s)"
        )

    def row(self) -> str:
        """This scenario's README table row."""
        return (
            f"| {SCENARIOS[self.scenario]} | {self.sent} | {self.answered} | {self.lost} "
            f"| {self.duplicated} (≤ {self.duplicate_bound}) | {self.failed} | {_codes(self.dead_lettered)} "
            f"| {self.wall_s:.0f} s (≤ {self.wall_bound_s} s) |"
        )


def _codes(counts: Mapping[str, int]) -> str:
    return ", ".join(f"`{code}` {n}" for code, n in sorted(counts.items())) or "—"


def codes_of(pairs: Iterable[str]) -> dict[str, int]:
    """Code -> count, from a sequence of codes."""
    return dict(Counter(pairs))


# ---- the README section ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """A table row as read back from the README; None where the row says `?` (not measured yet)."""

    scenario: str
    sent: int | None
    answered: int | None
    lost: int | None
    duplicate_bound: int
    failed: int | None
    dead_lettered: dict[str, int] | None
    wall_bound_s: int
    text: str


_N = r"(\d+|\?)"
_ROW = re.compile(
    rf"^\| (?P<label>[^|]+?) \| (?P<sent>{_N}) \| (?P<answered>{_N}) \| (?P<lost>{_N}) "
    rf"\| {_N} \(≤ (?P<dup_bound>\d+)\) \| (?P<failed>{_N}) \| (?P<codes>[^|]+?) "
    rf"\| {_N} s \(≤ (?P<wall_bound>\d+) s\) \|$"
)
_CODE = re.compile(r"^`([a-z0-9_]+)` (\d+)$")


def _int(text: str) -> int | None:
    return None if text == "?" else int(text)


def section(text: str) -> tuple[int, int]:
    """Character span of the table between the markers (exclusive of the markers)."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise AssertionError(f"README.md has no chaos table between {BEGIN!r} and {END!r}")
    return start + len(BEGIN), end


def read_rows(text: str) -> dict[str, Row]:
    """Scenario id -> its row, from the README text; raises AssertionError on a row that does not parse."""
    by_label = {label: key for key, label in SCENARIOS.items()}
    start, end = section(text)
    rows: dict[str, Row] = {}
    for line in text[start:end].strip().splitlines():
        if line in (HEADER, RULE) or not line.strip():
            continue
        match = _ROW.match(line)
        assert match, f"README chaos table: cannot read row {line!r}"
        label = match["label"]
        assert label in by_label, f"README chaos table: unknown scenario {label!r}"
        letters: dict[str, int] | None = {}
        if match["codes"] == "?":
            letters = None
        elif match["codes"] != "—":
            for part in match["codes"].split(", "):
                code = _CODE.match(part)
                assert code, f"README chaos table: cannot read dead-letter count {part!r} in {line!r}"
                letters[code[1]] = int(code[2])
        rows[by_label[label]] = Row(
            scenario=by_label[label],
            sent=_int(match["sent"]),
            answered=_int(match["answered"]),
            lost=_int(match["lost"]),
            duplicate_bound=int(match["dup_bound"]),
            failed=_int(match["failed"]),
            dead_lettered=letters,
            wall_bound_s=int(match["wall_bound"]),
            text=line,
        )
    return rows


def disagreements(row: Row, measured: Figures) -> list[str]:
    """Where the README's row and this session's figures disagree (empty when they agree)."""
    problems = []
    for name in ("sent", "answered", "lost", "failed", "dead_lettered", "duplicate_bound", "wall_bound_s"):
        said = getattr(row, name)
        if said is None:
            problems.append(f"{name}: README has no figure yet (`?`), measured {getattr(measured, name)}")
        elif said != getattr(measured, name):
            problems.append(f"{name}: README says {said}, measured {getattr(measured, name)}")
    if measured.duplicated > row.duplicate_bound:
        problems.append(f"duplicated: measured {measured.duplicated}, over the README's bound {row.duplicate_bound}")
    if measured.wall_s > row.wall_bound_s:
        problems.append(f"wall time: measured {measured.wall_s:.0f} s, over the README's bound {row.wall_bound_s} s")
    return problems


def render(rows: Mapping[str, str]) -> str:
    """The table (scenario id -> row text), in SCENARIOS order."""
    lines = [HEADER, RULE, *(rows[key] for key in SCENARIOS if key in rows)]
    return "\n" + "\n".join(lines) + "\n"


def rewrite(text: str, measured: Mapping[str, Figures]) -> str:
    """The README text with measured rows replacing theirs; rows of scenarios not measured are kept."""
    start, end = section(text)
    try:
        kept = {key: row.text for key, row in read_rows(text).items()}
    except AssertionError:
        kept = {}
    kept.update({key: fig.row() for key, fig in measured.items()})
    return text[:start] + render(kept) + text[end:]


# This session's figures: every one reported, and those of scenarios whose test passed (for the README).
REPORTED: list[Figures] = []
MEASURED: dict[str, Figures] = {}
