"""OCR topics: `DocumentRequest` in, `OcrResult` and `ReviewFlag` out."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Discriminator, Field, Tag, model_validator

from ocrbooth.schemas.base import S3_URI_PATTERN, ErrorInfo, WireModel, WireObject

Confidence = Annotated[float, Field(ge=0.0, le=1.0)]
PageNumber = Annotated[int, Field(ge=1, description="1-based page number.")]


class UriSource(WireObject):
    """The document is an object in S3."""

    uri: str = Field(pattern=S3_URI_PATTERN, description="Object URI, `s3://bucket/key`.")


class InlineSource(WireObject):
    """The document travels inside the message."""

    data_base64: str = Field(min_length=1, description="The document's bytes, standard base64 (RFC 4648).")
    filename: str | None = Field(default=None, description="Original file name; informational only.")


def _source_kind(value: object) -> str | None:
    # Tell the shapes apart by their keys so that both-or-neither fails with one clear error
    # instead of one error per union member.
    if isinstance(value, UriSource):
        return "uri"
    if isinstance(value, InlineSource):
        return "inline"
    if isinstance(value, dict):
        has_uri, has_data = "uri" in value, "data_base64" in value
        if has_uri != has_data:
            return "uri" if has_uri else "inline"
    return None


DocumentSource = Annotated[
    Annotated[UriSource, Tag("uri")] | Annotated[InlineSource, Tag("inline")],
    Discriminator(
        _source_kind,
        custom_error_type="invalid_source",
        custom_error_message="source must be an object with exactly one of `uri` or `data_base64`",
    ),
]


class OcrOptions(WireObject):
    """Per-request overrides of the operator's OCR settings; unset fields take the configured value."""

    engine: Literal["auto", "lightonocr", "tesseract"] | None = Field(
        default=None, description="OCR engine to use; `auto` lets the daemon choose."
    )
    languages: list[Annotated[str, Field(min_length=1)]] | None = Field(
        default=None, description="Expected document languages as ISO 639 codes, most likely first."
    )
    max_new_tokens: int | None = Field(
        default=None, ge=1, description="Most tokens a generative engine may produce per page."
    )
    review_threshold: Confidence | None = Field(
        default=None, description="Document confidence below which the result is flagged for review."
    )


class DocumentRequest(WireModel):
    """A document to OCR. Keyed by `document_id`."""

    request_id: str = Field(
        min_length=1, description="Idempotency key: a redelivered request with the same id is not redone."
    )
    document_id: str = Field(min_length=1, description="The producer's identifier of the document.")
    source: DocumentSource = Field(description="Where the document's bytes are: in S3 or inline.")
    content_type: str | None = Field(
        default=None, description="Producer's MIME type hint; the daemon decides from the bytes themselves."
    )
    pages: list[PageNumber] | None = Field(
        default=None, min_length=1, description="Pages to OCR (1-based); all pages when omitted."
    )
    options: OcrOptions = Field(default_factory=OcrOptions, description="Per-request OCR options.")
    metadata: dict[str, str] = Field(
        default_factory=dict, description="Opaque producer data, echoed back unchanged on the result."
    )


class Span(WireObject):
    """A stretch of a page's text that the engine was unsure of."""

    start: int = Field(ge=0, description="Start character offset into the page text (inclusive).")
    end: int = Field(ge=0, description="End character offset into the page text (exclusive).")
    confidence: Confidence = Field(description="Lowest token confidence inside the span, 0..1.")

    @model_validator(mode="after")
    def _ordered(self) -> Span:
        if self.end < self.start:
            raise ValueError(f"span end {self.end} is before its start {self.start}")
        return self


class Table(WireObject):
    """A table recognised on a page."""

    rows: list[list[str]] = Field(description="Cell texts, row by row.")


class PageResult(WireObject):
    """The OCR output of one page."""

    page_number: PageNumber
    width_px: int = Field(ge=0, description="Width of the rendered page image, in pixels.")
    height_px: int = Field(ge=0, description="Height of the rendered page image, in pixels.")
    text: str = Field(description="Recognised text (Markdown for generative engines).")
    confidence: Confidence | None = Field(
        default=None, description="Page confidence, 0..1; null when the engine gives none."
    )
    min_token_confidence: Confidence | None = Field(
        default=None, description="Lowest single-token confidence on the page, 0..1."
    )
    low_confidence_spans: list[Span] = Field(
        default_factory=list, description="Stretches of text below the confidence threshold."
    )
    tables: list[Table] = Field(default_factory=list, description="Tables recognised on the page.")
    languages: list[str] | None = Field(
        default=None,
        description="Languages (ISO 639-2) the engine detected on the page and read it with, when the request "
        "named none; null when the request named them or the engine needs none.",
    )
    rotation_deg: Literal[0, 90, 180, 270] | None = Field(
        default=None,
        description="Clockwise rotation applied to the page image before recognition (a page scanned upside "
        "down or sideways); null when the engine does not check orientation.",
    )
    finish_reason: Literal["stop", "length", "repetition", "error"] = Field(
        description="Why recognition of the page ended: done, token limit, repetition stopped it, or error."
    )


class Timings(WireObject):
    """Where a request's time went, in milliseconds."""

    queued: float = Field(default=0.0, ge=0.0, description="From the request's arrival to its first page.")
    render: float = Field(default=0.0, ge=0.0, description="Fetching and rendering pages to images.")
    inference: float = Field(default=0.0, ge=0.0, description="Running the OCR engine.")
    total: float = Field(default=0.0, ge=0.0, description="From arrival to the result being ready.")


class OcrResult(WireModel):
    """The outcome of one `DocumentRequest`. Keyed by `document_id`."""

    request_id: str = Field(min_length=1, description="`request_id` of the request this answers.")
    document_id: str = Field(min_length=1, description="`document_id` of the request this answers.")
    status: Literal["succeeded", "failed"] = Field(description="Whether the document was recognised.")
    error: ErrorInfo | None = Field(default=None, description="Why it failed; set exactly when `failed`.")
    engine: str | None = Field(default=None, description="Engine that produced the text.")
    model: str | None = Field(default=None, description="Model (hub id or version) the engine ran.")
    pages: list[PageResult] = Field(
        default_factory=list, description="Per-page output; empty when offloaded to `result_uri`."
    )
    confidence: Confidence | None = Field(default=None, description="Document confidence, 0..1.")
    needs_review: bool = Field(default=False, description="Whether a human should check this result.")
    review_reasons: list[str] = Field(default_factory=list, description="Why it needs review.")
    result_uri: str | None = Field(
        default=None, description="S3 URI of the full result (with pages) when it was too large for Kafka."
    )
    timings_ms: Timings = Field(default_factory=Timings, description="Time spent, in milliseconds.")
    metadata: dict[str, str] = Field(default_factory=dict, description="The request's metadata, echoed.")

    @model_validator(mode="after")
    def _error_iff_failed(self) -> OcrResult:
        if (self.status == "failed") != (self.error is not None):
            raise ValueError("`error` must be set when status is `failed`, and only then")
        return self

    def offloaded(self, uri: str) -> OcrResult:
        """A copy without pages that points at `uri`, where the full result was stored."""
        return self.model_copy(update={"pages": [], "result_uri": uri})

    @classmethod
    def failure(cls, request: DocumentRequest, error: ErrorInfo, engine: str | None) -> OcrResult:
        """The failed answer to `request`: its ids and metadata, the error, no pages."""
        return cls(
            request_id=request.request_id,
            document_id=request.document_id,
            status="failed",
            error=error,
            engine=engine,
            metadata=request.metadata,
        )


class ReviewFlag(WireModel):
    """A result that a human should check. Keyed by `document_id`."""

    request_id: str = Field(min_length=1, description="`request_id` of the request concerned.")
    document_id: str = Field(min_length=1, description="`document_id` of the request concerned.")
    pages: list[PageNumber] = Field(default_factory=list, description="Pages that need review (1-based).")
    reasons: list[str] = Field(default_factory=list, description="Why the result needs review.")
    confidence: Confidence | None = Field(default=None, description="Document confidence, 0..1.")
    result_uri: str | None = Field(default=None, description="S3 URI of the full result, when offloaded.")
