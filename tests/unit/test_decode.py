"""decode(): every way an input value can be bad maps to its own dead-letter code and a message naming the problem."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ocrbooth.constants import SCHEMA_VERSION
from ocrbooth.daemon.decode import decode
from ocrbooth.errors import PoisonError
from ocrbooth.schemas import DocumentRequest, UriSource

MAX_BYTES = 4096


def _request(**fields: Any) -> dict[str, Any]:
    return {"request_id": "req-1", "document_id": "doc-1", "source": {"uri": "s3://bucket/a.pdf"}, **fields}


def _encode(data: object) -> bytes:
    return json.dumps(data).encode()


def _poison(value: bytes | None, max_bytes: int = MAX_BYTES) -> PoisonError:
    with pytest.raises(PoisonError) as caught:
        decode(value, DocumentRequest, max_bytes=max_bytes)
    return caught.value


def test_valid_document_request_decodes() -> None:
    """A well-formed request, with or without schema_version, decodes to a DocumentRequest."""
    for data in (_request(), _request(schema_version=SCHEMA_VERSION, metadata={"tenant": "acme"})):
        event = decode(_encode(data), DocumentRequest, max_bytes=MAX_BYTES)
        assert isinstance(event, DocumentRequest)
        assert event.request_id == "req-1"
        assert event.document_id == "doc-1"
        assert isinstance(event.source, UriSource)
        assert event.schema_version == SCHEMA_VERSION


def test_non_ascii_utf8_text_decodes() -> None:
    """Non-ASCII UTF-8 in string fields is accepted and preserved."""
    event = decode(_encode(_request(document_id="rapport-été-№1")), DocumentRequest, max_bytes=MAX_BYTES)
    assert isinstance(event, DocumentRequest)
    assert event.document_id == "rapport-été-№1"


@pytest.mark.parametrize("value", [b"", None])
def test_empty_value_is_empty_message(value: bytes | None) -> None:
    """A tombstone (None) or zero-length value is dead-lettered as empty_message."""
    error = _poison(value)
    assert error.code == "empty_message"
    assert "no value" in error.message


def test_value_over_the_limit_is_message_too_large() -> None:
    """A value one byte over max_bytes is refused before parsing, and the message gives both sizes."""
    value = _encode(_request(metadata={"pad": "x" * 200}))
    error = _poison(value, max_bytes=len(value) - 1)
    assert error.code == "message_too_large"
    assert f"{len(value)} bytes" in error.message
    assert f"{len(value) - 1} byte limit" in error.message
    assert isinstance(decode(value, DocumentRequest, max_bytes=len(value)), DocumentRequest)  # exactly at the limit


def test_bytes_that_are_not_utf8_are_invalid_utf8() -> None:
    """A UTF-16 byte-order mark is not UTF-8."""
    error = _poison(b"\xff\xfe")
    assert error.code == "invalid_utf8"
    assert "not UTF-8" in error.message


def test_text_that_is_not_json_is_invalid_json() -> None:
    """Broken JSON is invalid_json, with the parser's position in the message."""
    error = _poison(b"{nope")
    assert error.code == "invalid_json"
    assert "not JSON" in error.message
    assert "line 1 column 2" in error.message


@pytest.mark.parametrize(
    ("value", "kind"), [(b"[1,2]", "list"), (b'"text"', "str"), (b"42", "int"), (b"null", "NoneType")]
)
def test_json_that_is_not_an_object_is_schema_violation(value: bytes, kind: str) -> None:
    """A JSON array, string, number or null is a schema_violation that says what it got."""
    error = _poison(value)
    assert error.code == "schema_violation"
    assert f"JSON {kind}, expected an object" in error.message


@pytest.mark.parametrize("version", [2, 0])
def test_other_schema_version_is_unsupported_schema_version(version: int) -> None:
    """A schema_version this daemon does not read gets its own code, naming both versions."""
    error = _poison(_encode(_request(schema_version=version)))
    assert error.code == "unsupported_schema_version"
    assert f"schema_version {version} is not supported" in error.message
    assert f"reads {SCHEMA_VERSION}" in error.message


def test_missing_required_fields_are_schema_violation_naming_each_field() -> None:
    """An object without the required fields is a schema_violation listing every missing one."""
    error = _poison(_encode({"document_id": "doc-1"}))
    assert error.code == "schema_violation"
    assert error.message.startswith("DocumentRequest is invalid:")
    assert "request_id: Field required" in error.message
    assert "source: Field required" in error.message
    assert "document_id" not in error.message


def test_unknown_field_is_schema_violation_naming_the_field() -> None:
    """A producer's typo (an unknown field) is rejected, naming the field."""
    error = _poison(_encode(_request(documentid="typo")))
    assert error.code == "schema_violation"
    assert "documentid: Extra inputs are not permitted" in error.message


def test_nested_problem_is_named_by_its_path() -> None:
    """A bad value inside a nested object is reported with its dotted path."""
    error = _poison(_encode(_request(pages=[0])))
    assert error.code == "schema_violation"
    assert "pages.0:" in error.message
