"""Handlers: one per kind of work. Built-in names map to classes; `module:Class` loads any other."""

from __future__ import annotations

import importlib

from ocrbooth.config import Settings
from ocrbooth.errors import ConfigError
from ocrbooth.handlers.base import AnyHandler, Handler

BUILTIN_HANDLERS = {
    "ocr": "ocrbooth.handlers.ocr:OcrHandler",
    "finetune": "ocrbooth.handlers.finetune:FinetuneHandler",
    "echo": "ocrbooth.handlers.echo:EchoHandler",
}


def load_handlers(names: list[str], settings: Settings) -> list[AnyHandler]:
    """Instantiate the configured handlers; every problem is reported in one ConfigError."""
    handlers: list[AnyHandler] = []
    problems: list[str] = []
    for name in names:
        spec = BUILTIN_HANDLERS.get(name, name)
        module_name, sep, class_name = spec.partition(":")
        if not sep or not module_name or not class_name:
            problems.append(f"handlers: unknown handler {name!r} (built-in: {', '.join(BUILTIN_HANDLERS)})")
            continue
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except ModuleNotFoundError as exc:
            if name in BUILTIN_HANDLERS and exc.name == module_name:
                problems.append(f"handlers: {name!r} is not part of this build yet")
            else:
                problems.append(f"handlers: cannot import {spec!r}: {exc}")
            continue
        except AttributeError:
            problems.append(f"handlers: {module_name} has no {class_name}")
            continue
        except Exception as exc:  # a broken third-party module must be reported, not crash startup
            problems.append(f"handlers: cannot import {spec!r}: {type(exc).__name__}: {exc}")
            continue
        if not (isinstance(cls, type) and issubclass(cls, Handler)):
            problems.append(f"handlers: {spec} is not a Handler subclass")
            continue
        try:
            handlers.append(cls(settings))
        except Exception as exc:  # report it with the rest instead of a traceback
            problems.append(f"handlers: {spec} failed to construct: {type(exc).__name__}: {exc}")
    seen: dict[str, str] = {}
    for handler in handlers:
        for topic in handler.input_topics():
            if topic in seen:
                problems.append(f"handlers: {seen[topic]} and {handler.name} both consume {topic}")
            seen[topic] = handler.name
    if problems:
        raise ConfigError("invalid settings:\n" + "\n".join(f"  {p}" for p in problems))
    return handlers
