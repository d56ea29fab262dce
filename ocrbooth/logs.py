"""Logging: JSON lines in Kubernetes, readable lines in a terminal, with per-message context from contextvars."""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

_CONTEXT: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("ocrbooth_log_context", default=None)


def current_context() -> dict[str, Any]:
    return dict(_CONTEXT.get() or {})


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Attach fields (topic, partition, offset, request_id, ...) to every record logged inside the block,
    including from tasks spawned inside it (asyncio copies the context)."""
    token = _CONTEXT.set({**(_CONTEXT.get() or {}), **fields})
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def bind(**fields: Any) -> None:
    """Add fields to the current context for the rest of this task."""
    _CONTEXT.set({**(_CONTEXT.get() or {}), **fields})


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.ctx = current_context()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, context fields and any `extra=`."""

    _STANDARD = frozenset(vars(logging.makeLogRecord({})).keys()) | {"ctx", "message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(getattr(record, "ctx", {}))
        out.update({k: v for k, v in vars(record).items() if k not in self._STANDARD})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class ConsoleFormatter(logging.Formatter):
    """`HH:MM:SS level logger: message key=value ...` for people."""

    _STANDARD = JsonFormatter._STANDARD

    def format(self, record: logging.LogRecord) -> str:
        fields = {**getattr(record, "ctx", {}), **{k: v for k, v in vars(record).items() if k not in self._STANDARD}}
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        line = f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {record.levelname:<7} {record.name}: "
        line += record.getMessage() + (f"  {extra}" if extra else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(level: str = "INFO", fmt: str = "auto") -> None:
    """Install one stderr handler on the root logger (idempotent)."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if use_json else ConsoleFormatter())
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_ocrbooth", False):
            root.removeHandler(old)
    handler._ocrbooth = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    # aiokafka logs every reconnect attempt at ERROR during a broker outage; our own metrics and logs cover it.
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, logging.getLevelName(level)))
