"""The wire contract: pydantic models of every topic's messages, and their JSON Schemas."""

from ocrbooth.schemas.base import ErrorInfo, Offloadable, WireModel, WireObject, schema_version_of
from ocrbooth.schemas.dlq import DeadLetter, Header
from ocrbooth.schemas.finetune import FinetuneControl, FinetuneEvent, FinetuneRequest
from ocrbooth.schemas.ocr import (
    DocumentRequest,
    InlineSource,
    OcrOptions,
    OcrResult,
    PageResult,
    ReviewFlag,
    Span,
    Table,
    Timings,
    UriSource,
)
from ocrbooth.schemas.registry import (
    ALL_MODELS,
    DEFAULT_TOPIC_MODELS,
    SCHEMA_DIR,
    schemas_are_current,
    write_json_schemas,
)

__all__ = [
    "ALL_MODELS",
    "DEFAULT_TOPIC_MODELS",
    "SCHEMA_DIR",
    "DeadLetter",
    "DocumentRequest",
    "ErrorInfo",
    "FinetuneControl",
    "FinetuneEvent",
    "FinetuneRequest",
    "Header",
    "InlineSource",
    "OcrOptions",
    "OcrResult",
    "Offloadable",
    "PageResult",
    "ReviewFlag",
    "Span",
    "Table",
    "Timings",
    "UriSource",
    "WireModel",
    "WireObject",
    "schema_version_of",
    "schemas_are_current",
    "write_json_schemas",
]
