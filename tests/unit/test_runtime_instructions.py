"""bench/runtime_instructions.py: the window it counts is runtime_overhead.py's, and it reads callgrind's total."""

from __future__ import annotations

import pytest
from aiokafka import TopicPartition

from bench import runtime_instructions


def test_the_count_is_the_totals_line_not_the_summary() -> None:
    """With instrumentation off at the start, callgrind writes `summary: 0` before the real `totals:`."""
    data = b"version: 1\ncmd: python x\nevents: Ir\nsummary: 0\nfn=(1) main\n0 5\ntotals: 2533581497\n"
    assert runtime_instructions.callgrind_totals(data) == 2_533_581_497
    with pytest.raises(ValueError, match="totals"):
        runtime_instructions.callgrind_totals(b"summary: 0\n")


def test_instrumentation_is_on_exactly_from_the_first_records_to_the_commit_covering_all(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    switched: list[bool] = []
    monkeypatch.setattr(runtime_instructions, "_toggle", switched.append)
    probe = runtime_instructions._CountingProbe(expected=10)
    tp = TopicPartition("t", 0)
    probe._fetched({})  # an empty poll before the records: not yet
    assert switched == []
    probe._fetched({tp: [object()] * 6})
    probe._fetched({tp: [object()] * 4})  # later fetches change nothing
    assert switched == [True]
    probe._committed({tp: 6})
    assert switched == [True]
    probe._committed({tp: 10})
    probe._committed({tp: 10})  # a commit after the window
    assert switched == [True, False]
