"""Logging: JSON lines in Kubernetes, readable lines in a terminal, with per-message context from contextvars.

The code logs through the standard library (`log.info("...", extra={...})`); structlog's ProcessorFormatter
renders every record, adding the fields bound with structlog's contextvars module.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
from typing import Any, Protocol

import structlog
from structlog.contextvars import (
    bind_contextvars,
    get_contextvars,
    merge_contextvars,
    reset_contextvars,
)
from structlog.typing import EventDict, Processor, WrappedLogger

# Set on a LogRecord once another handler's Formatter has run; not fields of ours.
_FORMATTER_ATTRS = ("message", "asctime")


class Source(Protocol):
    """Where a message came from (`MessageContext` fits)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...


_MESSAGE: contextvars.ContextVar[dict[str, Any] | Source | None] = contextvars.ContextVar(
    "ocrbooth_message", default=None
)
"""The fields of the message this task handles: one variable set once or twice per message, where structlog's
`bind_contextvars` sets one variable per field (it runs for every message, thousands a second). A `Source`
(`bind_source`) stands for its topic, partition and offset until a record is logged or fields are added."""


def _message_fields() -> dict[str, Any] | None:
    message = _MESSAGE.get()
    if message is None or isinstance(message, dict):
        return message
    return {"topic": message.topic, "partition": message.partition, "offset": message.offset}


def current_context() -> dict[str, Any]:
    """The fields bound in this task now."""
    message = _message_fields()
    return {**message, **get_contextvars()} if message else get_contextvars()


def bind_message(**fields: Any) -> None:
    """Add fields of the message being handled (its coordinates, its ids) to every record this task logs from
    here on, and to the tasks it starts. Fields bound with `bind`/`log_context` win over these."""
    message = _message_fields()
    _MESSAGE.set({**message, **fields} if message else fields)


def bind_message_of(source: Source, fields: dict[str, Any]) -> None:
    """`bind_message(**fields)` in a task that bound `source` (`bind_source`), in one step when nothing else was
    bound since."""
    if _MESSAGE.get() is source:
        _MESSAGE.set({"topic": source.topic, "partition": source.partition, "offset": source.offset, **fields})
    else:
        bind_message(**fields)


def bind_source(source: Source) -> None:
    """`bind_message(topic=..., partition=..., offset=...)` of `source`, without building the fields until a record
    is logged (a message's task binds its coordinates first, and most messages log nothing)."""
    if _MESSAGE.get() is None:
        _MESSAGE.set(source)
    else:
        bind_message(topic=source.topic, partition=source.partition, offset=source.offset)


def log_context(**fields: Any) -> contextlib.AbstractContextManager[None]:
    """Attach fields (topic, partition, offset, request_id, ...) to every record logged inside the block,
    including from tasks spawned inside it (asyncio copies the context); on exit they return to their values
    before it. Fields `bind()` adds inside the block stay for the rest of the task."""
    return _LogContext(fields)


class _LogContext(contextlib.AbstractContextManager[None]):
    """structlog's `bound_contextvars`, restoring through the tokens of its own binds: it runs once per
    message, and reading the whole context first (as `bound_contextvars` does) costs as much again."""

    __slots__ = ("_fields", "_tokens")

    def __init__(self, fields: dict[str, Any]) -> None:
        self._fields = fields

    def __enter__(self) -> None:
        self._tokens = bind_contextvars(**self._fields)

    def __exit__(self, *exc_info: object) -> None:
        reset_contextvars(**self._tokens)


def bind(**fields: Any) -> None:
    """Add fields to the current context for the rest of this task (or the enclosing `log_context`)."""
    bind_contextvars(**fields)


def _merge_message(_logger: WrappedLogger, _name: str, event: EventDict) -> EventDict:
    message = _message_fields()
    if message:
        for key, value in message.items():
            event.setdefault(key, value)
    return event


def _drop_formatter_attrs(_logger: WrappedLogger, _name: str, event: EventDict) -> EventDict:
    for attr in _FORMATTER_ATTRS:
        event.pop(attr, None)
    return event


def _shape(_logger: WrappedLogger, _name: str, event: EventDict) -> EventDict:
    """ts, level, logger, msg first (as before structlog), the traceback under `exc`."""
    shaped = {k: event.pop(k) for k in ("ts", "level", "logger") if k in event}
    shaped["msg"] = event.pop("event")
    if "exception" in event:
        event["exc"] = event.pop("exception")
    return {**shaped, **event}


def _formatter(use_json: bool) -> structlog.stdlib.ProcessorFormatter:
    timestamper = (
        structlog.processors.TimeStamper(fmt="%Y-%m-%dT%H:%M:%S.%fZ", utc=True, key="ts")
        if use_json
        else structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False, key="ts")
    )
    pre_chain: list[Processor] = [
        timestamper,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        merge_contextvars,
        _merge_message,
        structlog.stdlib.ExtraAdder(),  # after the context: an `extra=` field wins over a bound one
        _drop_formatter_attrs,
    ]
    render: list[Processor] = (
        [
            structlog.processors.format_exc_info,
            _shape,
            structlog.processors.JSONRenderer(serializer=json.dumps, default=str),
        ]
        if use_json
        else [
            structlog.dev.ConsoleRenderer(
                colors=sys.stderr.isatty(),
                timestamp_key="ts",
                sort_keys=False,
                # The standard traceback: rich's would print local variables, credentials among them.
                exception_formatter=structlog.dev.plain_traceback,
            )
        ]
    )
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=pre_chain,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *render],
    )


def configure_logging(level: str = "INFO", fmt: str = "auto") -> None:
    """Install one stderr handler on the root logger (idempotent). `fmt`: json, console, or auto (JSON unless
    stderr is a terminal)."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_formatter(use_json))
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_ocrbooth", False):
            root.removeHandler(old)
    handler._ocrbooth = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    # aiokafka logs every reconnect attempt at ERROR during a broker outage; our own metrics and logs cover it.
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, logging.getLevelName(level)))
