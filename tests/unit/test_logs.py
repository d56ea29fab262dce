"""Logging: one JSON object per record, carrying per-message context from contextvars and `extra=` fields."""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest

from ocrbooth.logs import bind, bind_message_of, bind_source, configure_logging, current_context, log_context
from ocrbooth.messages import MessageContext

LOGGER = "ocrbooth.test_logs"
DEADLINE_S = 5.0


def _json_lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    """Records our test logger wrote to stderr; every stderr line must be one JSON object."""
    err = capsys.readouterr().err
    records = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert all(isinstance(r, dict) for r in records)
    return [r for r in records if r["logger"] == LOGGER]


@pytest.mark.usefixtures("restore_logging")
def test_json_formatter_emits_one_object_per_record_with_context_and_extra(capsys: pytest.CaptureFixture[str]) -> None:
    """Each record is one JSON line with ts/level/logger/msg, the log_context fields and any extra= fields."""
    configure_logging("INFO", "json")
    log = logging.getLogger(LOGGER)
    with log_context(topic="ocr.requests", partition=3, offset=1234):
        log.info("handled %s", "doc-1", extra={"outcome": "handled", "attempt": 2})
        log.warning("multi\nline message")
    log.info("outside")
    log.debug("below the level")
    first, second, third = _json_lines(capsys)
    assert list(first)[:4] == ["ts", "level", "logger", "msg"]
    assert first["msg"] == "handled doc-1"
    assert first["level"] == "info"
    assert first["logger"] == LOGGER
    assert first["ts"].endswith("Z")
    assert (first["topic"], first["partition"], first["offset"]) == ("ocr.requests", 3, 1234)
    assert (first["outcome"], first["attempt"]) == ("handled", 2)
    assert second["msg"] == "multi\nline message"  # escaped inside the one line, not split
    assert second["level"] == "warning"
    assert second["offset"] == 1234
    assert "outcome" not in second
    assert third["msg"] == "outside"
    assert set(third) == {"ts", "level", "logger", "msg"}  # no context outside the block, no formatter leftovers


@pytest.mark.usefixtures("restore_logging")
def test_json_formatter_includes_the_exception(capsys: pytest.CaptureFixture[str]) -> None:
    """log.exception adds the traceback under `exc`, still inside one JSON object."""
    configure_logging("INFO", "json")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger(LOGGER).exception("handler raised")
    (record,) = _json_lines(capsys)
    assert record["level"] == "error"
    assert "ValueError: boom" in record["exc"]


@pytest.mark.usefixtures("restore_logging")
def test_console_format_shows_context_as_key_values(capsys: pytest.CaptureFixture[str]) -> None:
    """The terminal format is one readable line with context and extra fields as key=value."""
    configure_logging("INFO", "console")
    with log_context(topic="ocr.requests", offset=7):
        logging.getLogger(LOGGER).info("hello", extra={"code": "x"})
    (line,) = [line for line in capsys.readouterr().err.splitlines() if LOGGER in line]
    assert "\x1b[" not in line  # no colour codes when stderr is not a terminal
    assert re.match(rf"\d\d:\d\d:\d\d \[info\s*\] hello\s+\[{LOGGER}\] ", line), line
    assert set(line.split(f"[{LOGGER}] ")[1].split()) == {"topic=ocr.requests", "offset=7", "code=x"}, line


def test_log_context_nests_and_restores() -> None:
    """An inner log_context adds to the outer one and the outer context returns when it exits."""
    assert current_context() == {}
    with log_context(topic="t", partition=0):
        with log_context(offset=5, partition=1):
            assert current_context() == {"topic": "t", "partition": 1, "offset": 5}
        assert current_context() == {"topic": "t", "partition": 0}
    assert current_context() == {}


def test_a_log_context_restores_its_fields_and_bind_lasts_for_the_task() -> None:
    """On exit a block's own fields return to their earlier values (unset included) even if rebound inside;
    a field only bind() set stays for the rest of the task."""

    def in_a_fresh_context() -> dict[str, Any]:
        with log_context(topic="t", partition=0):
            with log_context(topic="inner"):
                bind(topic="rebound", request_id="req-a")
                assert current_context() == {"topic": "rebound", "partition": 0, "request_id": "req-a"}
            assert current_context() == {"topic": "t", "partition": 0, "request_id": "req-a"}
        return current_context()

    assert contextvars.copy_context().run(in_a_fresh_context) == {"request_id": "req-a"}
    assert current_context() == {}


@pytest.mark.usefixtures("restore_logging")
def test_extra_fields_win_over_context_and_odd_values_are_strings(capsys: pytest.CaptureFixture[str]) -> None:
    """An `extra=` field overrides a bound one of the same name; values JSON cannot hold are written with str()."""
    configure_logging("INFO", "json")
    with log_context(code="from-context"):
        logging.getLogger(LOGGER).warning("x", extra={"code": "from-extra", "path": Path("/data/a b")})
    (record,) = _json_lines(capsys)
    assert (record["code"], record["path"]) == ("from-extra", "/data/a b")


async def test_context_set_in_a_task_does_not_leak_to_a_sibling_task() -> None:
    """Fields bound inside one task are invisible to a task started alongside it, and to the parent."""
    bound = asyncio.Event()
    seen: dict[str, dict[str, Any]] = {}

    async def first() -> None:
        bind(topic="ocr.requests", partition=1, offset=10, request_id="req-a")
        seen["first"] = current_context()
        bound.set()

    async def sibling() -> None:
        await asyncio.wait_for(bound.wait(), DEADLINE_S)  # look only after the first task has bound its fields
        seen["sibling"] = current_context()

    with log_context(job="parent"):
        await asyncio.wait_for(asyncio.gather(first(), sibling()), DEADLINE_S)
        seen["parent"] = current_context()
    assert seen["first"] == {
        "job": "parent",
        "topic": "ocr.requests",
        "partition": 1,
        "offset": 10,
        "request_id": "req-a",
    }
    assert seen["sibling"] == {"job": "parent"}  # inherited from the parent at creation, nothing from the sibling
    assert seen["parent"] == {"job": "parent"}
    assert current_context() == {}


@pytest.mark.usefixtures("restore_logging")
async def test_records_from_concurrent_tasks_carry_their_own_context(capsys: pytest.CaptureFixture[str]) -> None:
    """Two interleaved tasks each log with their own offset, as the consumer does for concurrent messages."""
    configure_logging("INFO", "json")
    log = logging.getLogger(LOGGER)
    both_inside = asyncio.Barrier(2)

    async def handle(offset: int) -> None:
        with log_context(topic="ocr.requests", partition=0, offset=offset):
            await asyncio.wait_for(both_inside.wait(), DEADLINE_S)  # both contexts are open at once
            log.info("processing")

    await asyncio.wait_for(asyncio.gather(handle(1), handle(2)), DEADLINE_S)
    records = _json_lines(capsys)
    assert sorted(r["offset"] for r in records) == [1, 2]
    assert all(r["msg"] == "processing" for r in records)


@pytest.mark.usefixtures("restore_logging")
async def test_a_bound_source_logs_its_coordinates_and_takes_the_ids_after_them(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`bind_source` stands for the message's topic, partition and offset (built only when something reads them);
    `bind_message_of` adds ids after them, as `bind_message` would; another task's source does not leak in."""
    configure_logging("INFO", "json")
    log = logging.getLogger(LOGGER)
    ctx = MessageContext("ocr.requests", 2, 41, None, None)
    other = MessageContext("ocr.requests", 3, 7, None, None)

    async def one_message() -> dict[str, Any]:
        bind_source(ctx)
        assert current_context() == {"topic": "ocr.requests", "partition": 2, "offset": 41}
        log.info("decoded")
        bind_message_of(ctx, {"request_id": "req-1"})
        log.info("handled")
        bind_message_of(other, {"document_id": "doc-1"})  # not this task's source: merged as bind_message does
        return current_context()

    last = await asyncio.create_task(one_message())
    assert list(last) == ["topic", "partition", "offset", "request_id", "document_id"]
    assert current_context() == {}
    first, second = _json_lines(capsys)
    assert (first["topic"], first["partition"], first["offset"]) == ("ocr.requests", 2, 41)
    assert "request_id" not in first
    assert (second["offset"], second["request_id"]) == (41, "req-1")
