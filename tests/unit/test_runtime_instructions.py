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


def test_every_simulated_event_is_read_by_name() -> None:
    """With --sim, callgrind counts misses beside Ir: each total is read under the name the `events:` line gives it."""
    data = b"events: Ir Dr D1mr DLmr Bcm\nsummary: 0\nfn=(1) main\n0 5 1 0 0 0\ntotals: 2000 700 30 4 12\n"
    assert runtime_instructions.callgrind_events(data) == {"Ir": 2000, "Dr": 700, "D1mr": 30, "DLmr": 4, "Bcm": 12}
    assert runtime_instructions.callgrind_events(b"events: Ir\ntotals: 99\n") == {"Ir": 99}
    with pytest.raises(ValueError, match="events"):
        runtime_instructions.callgrind_events(b"totals: 99\n")


def test_function_rows_are_read_from_callgrind_annotate_output() -> None:
    """--sim lists functions by misses: counts ("." is 0, with or without a share), names shortened to file:symbol."""
    text = (
        "Ir  I1mr  DLmr  file:function\n"
        "--------------------------------------------------------------------------------\n"
        "113,533,987 ( 5.18%)   456 ( 0.81%)  .  ./string/../multiarch/memmove.S:__memcpy [/usr/lib/libc.so.6]\n"
        " 36,601,481 ( 1.67%)       0       146,547 ( 6.97%)  /project/aiokafka/crc32c.c:crc32c [/v/x.so]\n"
        "        12   ???:0x00000000001390f0'2 [/v/_pydantic_core.so]\n"
    )
    rows = runtime_instructions.annotate_rows(text, 3)
    assert rows == [
        ([113_533_987, 456, 0], "memmove.S:__memcpy [libc.so.6]"),
        ([36_601_481, 0, 146_547], "crc32c.c:crc32c [x.so]"),
    ]
