"""The wire contract: what the models accept, what they reject, and that the checked-in schemas match."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from ocrbooth.constants import SCHEMA_VERSION
from ocrbooth.schemas import (
    ALL_MODELS,
    SCHEMA_DIR,
    DeadLetter,
    DocumentRequest,
    ErrorInfo,
    FinetuneEvent,
    FinetuneRequest,
    Header,
    InlineSource,
    OcrResult,
    Offloadable,
    PageResult,
    UriSource,
    schema_version_of,
    schemas_are_current,
    write_json_schemas,
)
from ocrbooth.schemas.registry import render_json_schema


def _request(**overrides: Any) -> dict[str, Any]:
    return {
        "request_id": "req-1",
        "document_id": "doc-1",
        "source": {"uri": "s3://bucket/a.pdf"},
        **overrides,
    }


def _finetune(**overrides: Any) -> dict[str, Any]:
    return {
        "job_id": "job-1",
        "base_model": "hf-internal-testing/tiny-stable-diffusion-pipe",
        "instance_images": ["s3://bucket/dog/"],
        "instance_prompt": "a photo of sks dog",
        "class_prompt": "a photo of dog",
        **overrides,
    }


def _page(number: int = 1) -> PageResult:
    return PageResult(page_number=number, width_px=800, height_px=1000, text="hello", finish_reason="stop")


@pytest.mark.parametrize(
    ("source", "kind"),
    [
        ({"uri": "s3://bucket/docs/a.pdf"}, UriSource),
        ({"data_base64": "JVBERi0=", "filename": "a.pdf"}, InlineSource),
        ({"data_base64": "JVBERi0="}, InlineSource),
    ],
)
def test_document_request_round_trips_through_json(source: dict[str, Any], kind: type[BaseModel]) -> None:
    """A valid DocumentRequest of each source kind survives encode and decode unchanged."""
    request = DocumentRequest.model_validate_json(
        json.dumps(_request(source=source, pages=[1, 3], metadata={"tenant": "acme"}))
    )
    assert isinstance(request.source, kind)
    assert DocumentRequest.model_validate_json(request.model_dump_json()) == request
    assert request.schema_version == SCHEMA_VERSION


@pytest.mark.parametrize(
    "source",
    [
        {"uri": "s3://bucket/a.pdf", "data_base64": "JVBERi0="},
        {},
        {"filename": "a.pdf"},
        "s3://bucket/a.pdf",
    ],
)
def test_source_needs_exactly_one_kind(source: object) -> None:
    """A source with both uri and data_base64, or neither, is rejected with one clear error."""
    with pytest.raises(ValidationError) as caught:
        DocumentRequest.model_validate(_request(source=source))
    assert [error["type"] for error in caught.value.errors()] == ["invalid_source"]


@pytest.mark.parametrize(
    "uri", ["https://bucket/a.pdf", "s3://bucket", "s3://bucket/", "s3:///key", "file:///data/a.pdf"]
)
def test_uri_source_must_be_an_s3_object(uri: str) -> None:
    """A uri source that is not `s3://bucket/key` is rejected."""
    with pytest.raises(ValidationError, match="pattern"):
        DocumentRequest.model_validate(_request(source={"uri": uri}))


@pytest.mark.parametrize("pages", [[0], [1, 0], [-1], []])
def test_pages_are_one_based_and_non_empty(pages: list[int]) -> None:
    """Page 0, negative pages and an empty page list are rejected."""
    with pytest.raises(ValidationError):
        DocumentRequest.model_validate(_request(pages=pages))


@pytest.mark.parametrize("model", [ALL_MODELS[name] for name in sorted(ALL_MODELS)])
def test_other_schema_versions_fail_clearly(model: type[BaseModel]) -> None:
    """Every top-level model rejects schema_version 2 with a message naming the version."""
    with pytest.raises(ValidationError, match="unsupported schema_version 2"):
        model.model_validate({"schema_version": 2})


def test_schema_version_defaults_to_current() -> None:
    """An omitted schema_version defaults to SCHEMA_VERSION, and `true` is not taken for version 1."""
    assert DocumentRequest.model_validate(_request()).schema_version == SCHEMA_VERSION
    assert DocumentRequest.model_validate(_request(schema_version=1)).schema_version == SCHEMA_VERSION
    with pytest.raises(ValidationError, match="unsupported schema_version"):
        DocumentRequest.model_validate(_request(schema_version=True))


@pytest.mark.parametrize(
    "raw",
    [
        _request(reqest_id="typo"),
        _request(options={"engin": "tesseract"}),
        _request(source={"uri": "s3://bucket/a.pdf", "bucket": "b"}),
    ],
)
def test_unknown_fields_fail(raw: dict[str, Any]) -> None:
    """An unknown field, at the top or nested, is rejected rather than ignored."""
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        DocumentRequest.model_validate(raw)


def test_offloaded_clears_pages_and_sets_result_uri() -> None:
    """OcrResult.offloaded returns a copy without pages that points at the S3 copy, leaving the original."""
    result = OcrResult(
        request_id="req-1",
        document_id="doc-1",
        status="succeeded",
        pages=[_page(1), _page(2)],
        confidence=0.9,
    )
    assert isinstance(result, Offloadable)
    small = result.offloaded("s3://bucket/offload/ocr.results/doc-1/req-1.json")
    assert small.pages == []
    assert small.result_uri == "s3://bucket/offload/ocr.results/doc-1/req-1.json"
    assert small.confidence == 0.9
    assert len(result.pages) == 2
    assert result.result_uri is None


def test_failed_result_needs_error() -> None:
    """An OcrResult carries `error` exactly when its status is failed."""
    with pytest.raises(ValidationError, match="error"):
        OcrResult(request_id="r", document_id="d", status="failed")
    with pytest.raises(ValidationError, match="error"):
        OcrResult(request_id="r", document_id="d", status="succeeded", error=ErrorInfo(code="x", message="y"))


def test_finetune_request_defaults_match_spec() -> None:
    """A minimal FinetuneRequest takes the documented DreamBooth defaults."""
    request = FinetuneRequest.model_validate(_finetune())
    assert request.model_dump(exclude=set(_finetune())) == {
        "schema_version": 1,
        "with_prior_preservation": True,
        "num_class_images": 100,
        "prior_loss_weight": 1.0,
        "resolution": 512,
        "center_crop": False,
        "train_text_encoder": True,
        "max_train_steps": 800,
        "learning_rate": 5e-6,
        "lr_scheduler": "constant",
        "lr_warmup_steps": 0,
        "train_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "mixed_precision": "bf16",
        "gradient_checkpointing": False,
        "seed": 0,
        "checkpointing_steps": 100,
        "checkpoints_total_limit": 3,
        "validation_prompts": [],
        "num_validation_images": 4,
        "guidance_scale": 7.5,
        "num_inference_steps": 30,
        "output_uri": None,
    }


def test_finetune_request_leaves_upper_bounds_to_settings() -> None:
    """An oversized but sane FinetuneRequest parses, so the handler can reject it with a specific code."""
    request = FinetuneRequest.model_validate(_finetune(resolution=100_000, max_train_steps=10**9))
    assert request.resolution == 100_000


@pytest.mark.parametrize(
    "overrides",
    [
        {"resolution": 0},
        {"max_train_steps": 0},
        {"instance_images": []},
        {"instance_images": ["/local/dog.jpg"]},
        {"job_id": "../escape"},
        {"class_prompt": None},
    ],
)
def test_finetune_request_rejects_insane_values(overrides: dict[str, Any]) -> None:
    """Non-positive counts, non-S3 images, path-like job ids, prior preservation without class prompt fail."""
    with pytest.raises(ValidationError):
        FinetuneRequest.model_validate(_finetune(**overrides))


def test_finetune_event_round_trips_with_utc_time() -> None:
    """A FinetuneEvent keeps its timezone-aware time through JSON, and a naive time is rejected."""
    event = FinetuneEvent(
        job_id="job-1",
        event="progress",
        seq=7,
        emitted_at=datetime.now(UTC),
        step=10,
        max_steps=800,
        loss=0.1,
    )
    assert FinetuneEvent.model_validate_json(event.model_dump_json()) == event
    with pytest.raises(ValidationError, match="timezone"):
        FinetuneEvent(job_id="job-1", event="accepted", seq=0, emitted_at=datetime(2025, 1, 1))


def test_dead_letter_round_trips() -> None:
    """A DeadLetter with headers and a null key survives encode and decode unchanged."""
    letter = DeadLetter(
        source_topic="ocr.requests",
        partition=0,
        offset=42,
        value_base64="e30=",
        headers=[Header(key="trace", value_base64="YQ=="), Header(key="empty")],
        error=ErrorInfo(code="unsupported_schema_version", message="version 2"),
        failed_at=datetime.now(UTC),
    )
    assert DeadLetter.model_validate_json(letter.model_dump_json()) == letter


@pytest.mark.parametrize(
    ("raw", "version"),
    [({"schema_version": 2}, 2), ({"schema_version": 1}, 1), ({}, None), ({"schema_version": "2"}, None),
     ({"schema_version": True}, None), ([1], None), (None, None)],
)  # fmt: skip
def test_schema_version_of_reads_only_integers(raw: object, version: int | None) -> None:
    """schema_version_of returns an integer schema_version of a JSON object and None otherwise."""
    assert schema_version_of(raw) == version


def test_every_model_and_field_is_described() -> None:
    """Every model and every property in the generated schemas has a description for producers."""
    missing = []
    for name, model in ALL_MODELS.items():
        schema = json.loads(render_json_schema(model))
        objects = {name: schema, **schema.get("$defs", {})}
        for object_name, definition in objects.items():
            if "description" not in definition:
                missing.append(object_name)
            for field, spec in definition.get("properties", {}).items():
                if "description" not in spec:
                    missing.append(f"{object_name}.{field}")
    assert missing == []


def test_checked_in_schemas_are_current(tmp_path: Path) -> None:
    """The checked-in JSON schemas equal a fresh generation; fix with `python -m ocrbooth.schemas`."""
    written = write_json_schemas(tmp_path)
    assert sorted(p.name for p in written) == sorted(f"{name}.schema.json" for name in ALL_MODELS)
    for path in written:
        assert (SCHEMA_DIR / path.name).read_text(encoding="utf-8") == path.read_text(encoding="utf-8"), path.name
    assert schemas_are_current(SCHEMA_DIR) == []


def test_staleness_is_detected(tmp_path: Path) -> None:
    """schemas_are_current names changed, missing and unexpected schema files."""
    write_json_schemas(tmp_path)
    assert schemas_are_current(tmp_path) == []
    (tmp_path / "OcrResult.schema.json").write_text("{}\n", encoding="utf-8")
    (tmp_path / "ReviewFlag.schema.json").unlink()
    (tmp_path / "Renamed.schema.json").write_text("{}\n", encoding="utf-8")
    assert schemas_are_current(tmp_path) == [
        "OcrResult.schema.json",
        "ReviewFlag.schema.json",
        "Renamed.schema.json",
    ]
    write_json_schemas(tmp_path)
    assert schemas_are_current(tmp_path) == []
