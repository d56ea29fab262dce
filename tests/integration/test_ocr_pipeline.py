"""The OCR pipeline through Kafka and S3 with the Tesseract engine: hostile inputs, review flags, offloading."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from pathlib import Path

import pytest

from ocrbooth.daemon.app import Daemon
from ocrbooth.dev.embedded import EmbeddedStack
from ocrbooth.testing import samples
from ocrbooth.testing.tiny_lightonocr import build_tiny_lightonocr
from tests.support.daemon import running_daemon, settings_for
from tests.support.documents import numbered_pages_pdf
from tests.support.kafka import consume_all, produce
from tests.support.stack import TopicNames

OCR_ENV = {
    "OCRBOOTH_HANDLERS": "ocr",
    "OCRBOOTH_OCR_ENGINE": "tesseract",
    "OCRBOOTH_OCR_RENDER_WORKERS": "2",
}


def _request(request_id: str, source: dict[str, str], **extra: object) -> bytes:
    return json.dumps(
        {"request_id": request_id, "document_id": f"doc-{request_id}", "source": source, **extra}
    ).encode()


def _inline(data: bytes, filename: str) -> dict[str, str]:
    return {"data_base64": base64.b64encode(data).decode(), "filename": filename}


async def test_every_error_code_comes_from_a_real_hostile_input_and_the_daemon_keeps_serving(
    monkeypatch: pytest.MonkeyPatch,
    stack: EmbeddedStack,
    topics: TopicNames,
    daemon_env: dict[str, str],
    s3_prefix: str,
) -> None:
    """0-byte, truncated, encrypted, 600-page, 30000x30000, missing key, foreign bucket, oversize, bad page
    number: each gets a failed result with its code; a .pdf that is a JPEG and a valid PDF succeed after them."""
    s3 = stack.s3_client()
    s3.create_bucket(Bucket="not-allowed")
    uploads = {
        "empty": samples.empty(),
        "truncated": samples.truncated_pdf(),
        "encrypted": samples.encrypted_pdf(),
        "many": samples.many_pages_pdf(600),
        "huge": samples.huge_png(30000),
        "jpeg-as-pdf": samples.jpeg_named_pdf()[1],
        "big": b"%PDF-1.4\n" + b"0" * 3_000_000,
        "good": samples.text_pdf(["The quick brown fox jumps over the lazy dog."]),
    }
    for name, data in uploads.items():
        s3.put_object(Bucket=stack.bucket, Key=f"{s3_prefix}{name}.pdf", Body=data)
    s3.put_object(Bucket="not-allowed", Key="x.pdf", Body=uploads["good"])
    uri = lambda name: {"uri": f"s3://{stack.bucket}/{s3_prefix}{name}.pdf"}  # noqa: E731
    cases: list[tuple[str, bytes, str | None]] = [
        ("empty", _request("empty", uri("empty")), "unsupported_format"),
        ("truncated", _request("truncated", uri("truncated")), "corrupt_document"),
        ("encrypted", _request("encrypted", uri("encrypted")), "encrypted_document"),
        ("many", _request("many", uri("many")), "too_many_pages"),
        ("huge", _request("huge", uri("huge")), "image_too_large"),
        ("missing", _request("missing", uri("no-such-key")), "source_not_found"),
        ("foreign", _request("foreign", {"uri": "s3://not-allowed/x.pdf"}), "source_not_allowed"),
        ("big", _request("big", uri("big")), "source_too_large"),
        ("inline-big", _request("inline-big", _inline(b"x" * 70_000, "big.pdf")), "source_too_large"),
        ("page", _request("page", uri("good"), pages=[1, 5]), "page_out_of_range"),
        ("jpeg-as-pdf", _request("jpeg-as-pdf", uri("jpeg-as-pdf")), None),
        ("good", _request("good", uri("good")), None),
    ]
    await produce(stack.bootstrap_servers, topics.ocr_requests, [(k.encode(), v) for k, v, _ in cases])
    settings = settings_for(
        monkeypatch,
        {**daemon_env, **OCR_ENV},
        OCRBOOTH_OCR_MAX_SOURCE_BYTES="2000000",
        OCRBOOTH_OCR_MAX_INLINE_BYTES="65536",
    )
    async with running_daemon(settings):
        records = await consume_all(stack.bootstrap_servers, topics.ocr_results, count=len(cases), timeout_s=180)
    results = {json.loads(r.value)["request_id"]: json.loads(r.value) for r in records}
    for request_id, _, code in cases:
        result = results[request_id]
        if code is None:
            assert result["status"] == "succeeded", result
        else:
            assert result["status"] == "failed", result
            assert result["error"]["code"] == code, result
            assert result["error"]["message"]
    assert "quick brown fox" in results["good"]["pages"][0]["text"].lower()
    assert results["jpeg-as-pdf"]["pages"][0]["text"].strip()


async def test_review_flags_and_offloaded_results(
    monkeypatch: pytest.MonkeyPatch, stack: EmbeddedStack, topics: TopicNames, daemon_env: dict[str, str]
) -> None:
    """A document under its review threshold gets needs_review and a ReviewFlag; a result over
    max_message_bytes is offloaded to S3 and both events point at it; pages come back in order, with the
    languages and orientation the engine detected."""
    three_pages = numbered_pages_pdf(3)
    requests = [
        (b"strict", _request("strict", _inline(three_pages, "a.pdf"), options={"review_threshold": 1.0})),
        (b"lenient", _request("lenient", _inline(three_pages, "b.pdf"), options={"review_threshold": 0.0})),
    ]
    await produce(stack.bootstrap_servers, topics.ocr_requests, requests)
    settings = settings_for(monkeypatch, {**daemon_env, **OCR_ENV}, OCRBOOTH_MAX_MESSAGE_BYTES="1024")
    async with running_daemon(settings):
        records = await consume_all(stack.bootstrap_servers, topics.ocr_results, count=2, timeout_s=120)
        flags = await consume_all(stack.bootstrap_servers, topics.ocr_review, count=1, timeout_s=30)
    results = {json.loads(r.value)["request_id"]: json.loads(r.value) for r in records}
    strict, lenient = results["strict"], results["lenient"]
    assert strict["needs_review"] is True
    assert "low_confidence" in strict["review_reasons"]
    assert lenient["needs_review"] is False
    flag = json.loads(flags[0].value)
    assert flag["request_id"] == "strict"
    assert flag["reasons"] == strict["review_reasons"]
    for result in (strict, lenient):
        assert result["pages"] == [], (len(json.dumps(result)), result["request_id"])
        assert result["result_uri"].startswith(f"s3://{stack.bucket}/offload/")
    assert flag["result_uri"] == strict["result_uri"]
    key = strict["result_uri"].split("/", 3)[3]
    full = json.loads(stack.s3_client().get_object(Bucket=stack.bucket, Key=key)["Body"].read())
    assert [p["page_number"] for p in full["pages"]] == [1, 2, 3]
    assert [p["text"].split()[:2] for p in full["pages"]] == [["Page", "1"], ["Page", "2"], ["Page", "3"]]
    # No language named: tesseract detected each page's language and orientation, and the result says so.
    assert [(p["rotation_deg"], p["languages"]) for p in full["pages"]] == [(0, ["eng"])] * 3
    assert 0 < full["confidence"] <= 1


async def test_explicit_lightonocr_that_cannot_load_is_a_startup_error(
    monkeypatch: pytest.MonkeyPatch, daemon_env: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """OCRBOOTH_OCR_ENGINE=lightonocr with weights that cannot be loaded stops startup with a clear message."""
    settings = settings_for(
        monkeypatch,
        {**daemon_env, **OCR_ENV},
        OCRBOOTH_OCR_ENGINE="lightonocr",
        OCRBOOTH_OCR_MODEL=str(tmp_path / "no-such-model"),
    )
    daemon = Daemon(settings)
    with caplog.at_level(logging.ERROR):
        assert await asyncio.wait_for(daemon.run(install_signals=False), 120) == 1
    message = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    assert "ocr.engine=lightonocr" in message
    assert "no-such-model" in message


async def test_lightonocr_engine_through_kafka_on_the_cpu(
    monkeypatch: pytest.MonkeyPatch,
    stack: EmbeddedStack,
    topics: TopicNames,
    daemon_env: dict[str, str],
    tmp_path: Path,
) -> None:
    """OCRBOOTH_OCR_ENGINE=lightonocr with a tiny random model saved to disk: the daemon loads it through
    from_pretrained, batches the pages of two documents, and publishes results with token confidences."""
    model = build_tiny_lightonocr(tmp_path / "tiny-lightonocr")
    requests = [
        (b"a", _request("a", _inline(numbered_pages_pdf(2), "a.pdf"), options={"max_new_tokens": 12})),
        (b"b", _request("b", _inline(samples.jpeg_named_pdf()[1], "b.jpg"), options={"max_new_tokens": 12})),
    ]
    await produce(stack.bootstrap_servers, topics.ocr_requests, requests)
    settings = settings_for(
        monkeypatch,
        {**daemon_env, **OCR_ENV},
        OCRBOOTH_OCR_ENGINE="lightonocr",
        OCRBOOTH_OCR_MODEL=str(model),
        OCRBOOTH_OCR_DEVICE="cpu",
        OCRBOOTH_OCR_RENDER_LONGEST_PX="224",
    )
    async with running_daemon(settings) as (daemon, _):
        records = await consume_all(stack.bootstrap_servers, topics.ocr_results, count=2, timeout_s=180)
        busy_s = daemon.metrics.ocr_engine_busy.labels("lightonocr")._value.get()
    results = {json.loads(r.value)["request_id"]: json.loads(r.value) for r in records}
    assert [p["page_number"] for p in results["a"]["pages"]] == [1, 2]
    for result in results.values():
        assert result["status"] == "succeeded", result
        assert result["engine"] == "lightonocr"
        for page in result["pages"]:
            assert page["finish_reason"] in ("stop", "length", "repetition")
            assert 0 < page["confidence"] <= 1
            assert page["min_token_confidence"] <= page["confidence"]
    assert busy_s > 0  # the pages went through the engine core's steps
