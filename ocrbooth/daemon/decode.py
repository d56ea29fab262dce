"""Record bytes -> event model and message context. Runs before any expensive work, and never raises anything
but PoisonError: whatever a producer puts in a record is that record's failure, not the process's."""

from __future__ import annotations

import json
import logging
from typing import Any

from pydantic import BaseModel, ValidationError

from ocrbooth.constants import SCHEMA_VERSION
from ocrbooth.errors import PoisonError
from ocrbooth.messages import MessageContext, clip

log = logging.getLogger(__name__)

_MAX_PROBLEM_CHARS = 300  # one validation problem in an error message (a key can be megabytes long)


def decode(value: bytes | None, model: type[BaseModel], *, max_bytes: int) -> BaseModel:
    """Bytes -> event model, or PoisonError with a specific code."""
    if value is None or not value:
        raise PoisonError("message has no value", code="empty_message")
    if len(value) > max_bytes:
        raise PoisonError(f"message is {len(value)} bytes, over the {max_bytes} byte limit", code="message_too_large")
    try:
        # Fast path: parse and validate in one pass. Only a failure pays for the precise diagnosis below.
        # The model's validator itself: what model_validate_json calls, without its Python frame and keywords.
        event: BaseModel = model.__pydantic_validator__.validate_json(value)
        return event
    except ValidationError:
        pass
    except (RecursionError, ValueError, MemoryError):
        pass  # pydantic-core has its own limits; the diagnosis below names the problem
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PoisonError(f"value is not UTF-8: {exc}", code="invalid_utf8") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PoisonError(f"value is not JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        # The stdlib parser recurses once per nesting level; a 2 KB `[[[[…` exceeds the interpreter's limit.
        raise PoisonError("value is JSON nested too deeply", code="invalid_json") from None
    except ValueError as exc:
        # An integer literal longer than sys.get_int_max_str_digits(), for one.
        raise PoisonError(f"value is not usable JSON: {_short(str(exc))}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise PoisonError(f"value is a JSON {type(data).__name__}, expected an object", code="schema_violation")
    version = data.get("schema_version", SCHEMA_VERSION)
    if isinstance(version, bool) or not isinstance(version, int):
        raise PoisonError(f"schema_version must be an integer, got {_short(repr(version))}", code="schema_violation")
    if version != SCHEMA_VERSION:
        raise PoisonError(
            f"schema_version {_short(repr(version))} is not supported (this daemon reads {SCHEMA_VERSION})",
            code="unsupported_schema_version",
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            _short(f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}")
            for err in exc.errors(include_url=False, include_input=False)[:10]
        )
        raise PoisonError(f"{model.__name__} is invalid: {problems}", code="schema_violation") from None
    except (RecursionError, ValueError) as exc:
        raise PoisonError(f"{model.__name__} is invalid: {_short(str(exc))}", code="schema_violation") from None


def message_context(record: Any) -> MessageContext:
    """Where a record came from. Null header values stay None; nothing in a record can make this raise."""
    raw_headers = record.headers
    headers: tuple[tuple[str, bytes | None], ...] = ()
    if raw_headers:
        kept: list[tuple[str, bytes | None]] = []
        for header in raw_headers:
            try:
                key, raw = header
                kept.append((str(key), None if raw is None else bytes(raw)))
            except (TypeError, ValueError):
                log.warning("unreadable record header dropped", extra={"header_type": type(header).__name__})
        headers = tuple(kept)
    key = record.key
    return MessageContext(
        record.topic, record.partition, record.offset, None if key is None else bytes(key), record.timestamp, headers
    )


def _short(text: str) -> str:
    return clip(text, _MAX_PROBLEM_CHARS)
