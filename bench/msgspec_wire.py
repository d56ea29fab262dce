"""The runtime benchmark's `--wire msgspec` experiment: the echo path's two wire models as msgspec Structs.

Issue #13's runtime ratio is measured with the wire contract as it is (pydantic models, `ocrbooth/schemas/`). This
module asks what the contract's model library costs on that path: it mirrors the two models the echo path
touches, `DocumentRequest` (decoded from each input record) and `OcrResult` (validated by the handler and encoded
by the publisher), as msgspec Structs with the same fields, defaults and constraints, and `install()` puts them
in the daemon's path for the rest of the process:

- `ocrbooth.daemon.dispatch.decode` decodes DocumentRequest records with the Struct's decoder (any other model,
  and every record the Struct rejects, goes through the daemon's own `decode`, so failures keep their codes);
- the echo handler validates its answer into the `OcrResult` Struct (`msgspec.convert`, which checks types and
  constraints as pydantic's `model_validate` does) instead of the pydantic model;
- the publisher encodes a Struct with msgspec's encoder. The bytes are the pydantic model's, byte for byte
  (`tests/unit/test_msgspec_wire.py` compares them), so the broker and the plain loop see the same records.

Nothing of this is in the daemon: it is an experiment of the benchmark, which says what moving the contract to
msgspec would be worth before anyone moves it. Not mirrored: the pydantic models' error messages, JSON Schemas and
the inline-document source (the benchmark's requests all point at S3).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

import msgspec
from pydantic import BaseModel

from ocrbooth import schemas
from ocrbooth.daemon import dispatch, publisher
from ocrbooth.handlers import echo
from ocrbooth.schemas.base import S3_URI_PATTERN

NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]
Confidence = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
PageNumber = Annotated[int, msgspec.Meta(ge=1)]
NonNegative = Annotated[float, msgspec.Meta(ge=0.0)]


class _Wire(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """WireObject's settings: unknown fields rejected, frozen (each Struct below is keyword-only: msgspec does not
    inherit that). msgspec's JSON reader takes no NaN or Infinity."""


class UriSource(_Wire, kw_only=True):
    uri: Annotated[str, msgspec.Meta(pattern=S3_URI_PATTERN)]


class OcrOptions(_Wire, kw_only=True):
    engine: Literal["auto", "lightonocr", "tesseract"] | None = None
    languages: list[NonEmpty] | None = None
    max_new_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    review_threshold: Confidence | None = None


class DocumentRequest(_Wire, kw_only=True):
    schema_version: Literal[1] = 1
    request_id: NonEmpty
    document_id: NonEmpty
    source: UriSource
    content_type: str | None = None
    pages: Annotated[list[PageNumber], msgspec.Meta(min_length=1)] | None = None
    options: OcrOptions = msgspec.field(default_factory=OcrOptions)
    metadata: dict[str, str] = msgspec.field(default_factory=dict)


class Timings(_Wire, kw_only=True):
    queued: NonNegative = 0.0
    render: NonNegative = 0.0
    inference: NonNegative = 0.0
    total: NonNegative = 0.0


class ErrorInfo(_Wire, kw_only=True):
    code: NonEmpty
    message: str


class OcrResult(_Wire, kw_only=True):
    """The fields of `schemas.OcrResult` in its order (its JSON keys come out in the same order). The echo path
    answers without pages, so a page is any object here."""

    schema_version: Literal[1] = 1
    request_id: NonEmpty
    document_id: NonEmpty
    status: Literal["succeeded", "failed"]
    error: ErrorInfo | None = None
    engine: str | None = None
    model: str | None = None
    pages: list[dict[str, Any]] = msgspec.field(default_factory=list)
    confidence: Confidence | None = None
    needs_review: bool = False
    review_reasons: list[str] = msgspec.field(default_factory=list)
    result_uri: str | None = None
    timings_ms: Timings = msgspec.field(default_factory=Timings)
    metadata: dict[str, str] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.status == "failed") != (self.error is not None):
            raise ValueError("`error` must be set when status is `failed`, and only then")

    @classmethod
    def model_validate(cls, data: dict[str, Any]) -> OcrResult:
        """What the echo handler calls: the answer validated into the Struct."""
        return msgspec.convert(data, cls)

    @classmethod
    def failure(cls, request: Any, error: schemas.ErrorInfo, engine: str | None) -> OcrResult:
        """`schemas.OcrResult.failure`'s answer as the Struct (a failure path: its cost does not matter here)."""
        return cls.model_validate(schemas.OcrResult.failure(request, error, engine).model_dump(mode="json"))


_request_decoder = msgspec.json.Decoder(DocumentRequest)
_encoder = msgspec.json.Encoder()


def decode_request(value: bytes) -> DocumentRequest:
    """One input record's value as the DocumentRequest Struct (msgspec.ValidationError or DecodeError if not)."""
    return _request_decoder.decode(value)


def encode(value: msgspec.Struct) -> bytes:
    """A Struct's JSON, as the publisher sends it once `install()` ran."""
    return _encoder.encode(value)


def install() -> None:
    """Put the Structs in the daemon's echo path for the rest of this process (see the module's docstring)."""
    daemon_decode: Callable[..., Any] = dispatch.decode
    daemon_encode: Callable[[BaseModel], bytes] = publisher._encode

    def decode(value: bytes | None, model: type[BaseModel], *, max_bytes: int) -> Any:
        if model is schemas.DocumentRequest and value and len(value) <= max_bytes:
            try:
                return _request_decoder.decode(value)
            except (msgspec.ValidationError, msgspec.DecodeError):
                pass  # the daemon's decode names the problem
        return daemon_decode(value, model, max_bytes=max_bytes)

    def publisher_encode(value: BaseModel | msgspec.Struct) -> bytes:
        return _encoder.encode(value) if isinstance(value, msgspec.Struct) else daemon_encode(value)

    dispatch.decode = decode  # type: ignore[assignment]
    echo.OcrResult = OcrResult  # type: ignore[assignment,misc]
    echo._NO_TIMINGS = Timings()  # type: ignore[assignment]
    publisher._encode = publisher_encode  # type: ignore[assignment]
