"""bench/msgspec_wire.py: the msgspec mirrors of the echo path's models take and give what the contract's
pydantic models do, so `runtime_overhead.py --wire msgspec` compares model libraries and nothing else."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from bench import msgspec_wire
from bench.runtime_overhead import request_value
from ocrbooth import schemas
from ocrbooth.daemon import dispatch, publisher
from ocrbooth.errors import PoisonError
from ocrbooth.handlers import echo


def _answer(request: object, timings: object) -> dict[str, object]:
    """The dict the echo handler validates into its OcrResult."""
    return {
        "request_id": request.request_id,  # type: ignore[attr-defined]
        "document_id": request.document_id,  # type: ignore[attr-defined]
        "status": "succeeded",
        "engine": "echo",
        "pages": [],
        "timings_ms": timings,
        "metadata": request.metadata,  # type: ignore[attr-defined]
    }


@pytest.mark.parametrize("i", [0, 7, 123_456])
def test_requests_decode_to_the_same_fields(i: int) -> None:
    value = request_value(i)
    theirs = schemas.DocumentRequest.model_validate_json(value).model_dump(mode="json")
    ours = msgspec_wire.decode_request(value)
    assert msgspec_wire.msgspec.to_builtins(ours) == theirs


@pytest.mark.parametrize("i", [0, 99_999])
def test_the_answer_encodes_to_the_same_bytes(i: int) -> None:
    value = request_value(i)
    pydantic_answer = schemas.OcrResult.model_validate(
        _answer(schemas.DocumentRequest.model_validate_json(value), schemas.Timings())
    )
    msgspec_answer = msgspec_wire.OcrResult.model_validate(
        _answer(msgspec_wire.decode_request(value), msgspec_wire.Timings())
    )
    assert msgspec_wire.encode(msgspec_answer) == publisher._encode(pydantic_answer)


def test_a_failed_answer_encodes_to_the_same_bytes() -> None:
    value = request_value(3)
    error = schemas.ErrorInfo(code="source_not_found", message="no such object")
    theirs = schemas.OcrResult.failure(schemas.DocumentRequest.model_validate_json(value), error, "echo")
    ours = msgspec_wire.OcrResult.failure(msgspec_wire.decode_request(value), error, "echo")
    assert msgspec_wire.encode(ours) == publisher._encode(theirs)


@pytest.mark.parametrize(
    "change",
    [
        {"request_id": ""},
        {"source": {"uri": "http://example.com/a.pdf"}},
        {"pages": []},
        {"pages": [0]},
        {"options": {"review_threshold": 1.5}},
        {"options": {"engine": "gpt"}},
        {"schema_version": 2},
        {"surprise": 1},
    ],
)
def test_the_mirror_rejects_what_the_contract_rejects(change: dict[str, object]) -> None:
    body = {**json.loads(request_value(1)), **change}
    value = json.dumps(body).encode()
    with pytest.raises(ValidationError):
        schemas.DocumentRequest.model_validate_json(value)
    with pytest.raises(msgspec_wire.msgspec.ValidationError):
        msgspec_wire.decode_request(value)


def test_install_puts_the_mirrors_in_the_daemon_path(monkeypatch: pytest.MonkeyPatch) -> None:
    for module, name in [(dispatch, "decode"), (echo, "OcrResult"), (echo, "_NO_TIMINGS"), (publisher, "_encode")]:
        monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
    msgspec_wire.install()
    event = dispatch.decode(request_value(5), schemas.DocumentRequest, max_bytes=10_000)
    assert isinstance(event, msgspec_wire.DocumentRequest)
    assert echo.OcrResult is msgspec_wire.OcrResult
    # The publisher still encodes the daemon's pydantic models (dead letters, every other topic) as before.
    letter = schemas.ErrorInfo(code="x", message="y")
    assert publisher._encode(letter) == letter.model_dump_json().encode()
    # A record the mirror rejects gets the daemon's own diagnosis and code.
    with pytest.raises(PoisonError) as caught:
        dispatch.decode(b'{"request_id": 1}', schemas.DocumentRequest, max_bytes=10_000)
    assert caught.value.code == "schema_violation"
    with pytest.raises(PoisonError) as too_large:
        dispatch.decode(request_value(5), schemas.DocumentRequest, max_bytes=10)
    assert too_large.value.code == "message_too_large"


@pytest.mark.usefixtures("clean_env", "restore_logging")
def test_the_daemon_path_runs_every_message_to_success_on_the_mirrors(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import runtime_per_message
    from ocrbooth.daemon import eventloop

    for module, name in [(dispatch, "decode"), (echo, "OcrResult"), (echo, "_NO_TIMINGS"), (publisher, "_encode")]:
        monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
    monkeypatch.setattr("gc.freeze", lambda: None)  # keep the test process's collector as it was
    monkeypatch.setattr("gc.set_threshold", lambda *args: None)
    for name, value in {**runtime_per_message.DAEMON_ENV, "OCRBOOTH_MAX_IN_FLIGHT": "40"}.items():
        monkeypatch.setenv(name, value)  # the benchmark sets these: put back after the test
    msgspec_wire.install()
    options = runtime_per_message.parser().parse_args(
        ["--batch", "40", "--batches", "1", "--warmup", "1", "--repeat", "1", "--loop", "asyncio", "--wire", "msgspec"]
    )
    # main() asserts that all 80 messages succeeded: a Struct the daemon cannot handle would dead-letter them.
    assert len(eventloop.run(runtime_per_message.main(options), "asyncio")) == 1
