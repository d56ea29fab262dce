"""Every top-level wire model by name, and their JSON Schemas as checked in under `schemas/json/`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

from pydantic import BaseModel

from ocrbooth.constants import (
    SCHEMA_VERSION,
    TOPIC_DLQ,
    TOPIC_FINETUNE_CONTROL,
    TOPIC_FINETUNE_EVENTS,
    TOPIC_FINETUNE_REQUESTS,
    TOPIC_OCR_REQUESTS,
    TOPIC_OCR_RESULTS,
    TOPIC_OCR_REVIEW,
)
from ocrbooth.schemas.dlq import DeadLetter
from ocrbooth.schemas.finetune import FinetuneControl, FinetuneEvent, FinetuneRequest
from ocrbooth.schemas.ocr import DocumentRequest, OcrResult, ReviewFlag

# The value of the `ocrbooth-schema` header names one of these.
ALL_MODELS: Final[dict[str, type[BaseModel]]] = {
    model.__name__: model
    for model in (
        DocumentRequest,
        OcrResult,
        ReviewFlag,
        FinetuneRequest,
        FinetuneControl,
        FinetuneEvent,
        DeadLetter,
    )
}

# The model carried by each default topic (topic names themselves are configurable).
DEFAULT_TOPIC_MODELS: Final[dict[str, type[BaseModel]]] = {
    TOPIC_OCR_REQUESTS: DocumentRequest,
    TOPIC_OCR_RESULTS: OcrResult,
    TOPIC_OCR_REVIEW: ReviewFlag,
    TOPIC_FINETUNE_REQUESTS: FinetuneRequest,
    TOPIC_FINETUNE_CONTROL: FinetuneControl,
    TOPIC_FINETUNE_EVENTS: FinetuneEvent,
    TOPIC_DLQ: DeadLetter,
}

# The checked-in copies, shipped as package data.
SCHEMA_DIR: Final = Path(__file__).parent / "json"

SCHEMA_SUFFIX: Final = ".schema.json"


def schema_filename(name: str) -> str:
    """File name of the JSON Schema of the model called `name`."""
    return f"{name}{SCHEMA_SUFFIX}"


def json_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of `model`, as producers validate against it."""
    schema = model.model_json_schema(mode="validation")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"urn:ocrbooth:schema:{model.__name__}:v{SCHEMA_VERSION}",
        **schema,
    }


def render_json_schema(model: type[BaseModel]) -> str:
    """The exact text of `model`'s schema file: sorted keys, two-space indent, trailing newline."""
    return json.dumps(json_schema(model), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_json_schemas(out_dir: Path) -> list[Path]:
    """Write `<ModelName>.schema.json` for every model into `out_dir`; returns the files written.

    Other `*.schema.json` files there are removed, so a renamed model leaves no stale copy behind.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    wanted = {schema_filename(name) for name in ALL_MODELS}
    for path in out_dir.glob(f"*{SCHEMA_SUFFIX}"):
        if path.name not in wanted:
            path.unlink()
    written = []
    for name, model in sorted(ALL_MODELS.items()):
        path = out_dir / schema_filename(name)
        path.write_text(render_json_schema(model), encoding="utf-8", newline="\n")
        written.append(path)
    return written


def schemas_are_current(directory: Path) -> list[str]:
    """File names in `directory` that are stale, missing or unexpected; empty when all are current."""
    problems = []
    for name, model in sorted(ALL_MODELS.items()):
        path = directory / schema_filename(name)
        try:
            current = path.read_text(encoding="utf-8") == render_json_schema(model)
        except FileNotFoundError:
            current = False
        if not current:
            problems.append(path.name)
    wanted = {schema_filename(name) for name in ALL_MODELS}
    if directory.is_dir():
        problems.extend(sorted(p.name for p in directory.glob(f"*{SCHEMA_SUFFIX}") if p.name not in wanted))
    return problems
