"""Against the real SeaweedFS: a 4xx answer is poison and sent once, a 503 is an outage and retried, and a
non-canonical key in an OCR source never reaches S3."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from typing import Any

import pytest

from ocrbooth.dev.embedded import EmbeddedStack
from ocrbooth.errors import PoisonError, RetryableError
from ocrbooth.storage import s3_call, s3_client
from ocrbooth.testing import samples
from tests.support.daemon import running_daemon, settings_for
from tests.support.kafka import consume_all, produce
from tests.support.s3faults import S3FaultProxy
from tests.support.stack import TopicNames


def _counting_client(endpoint_url: str, monkeypatch: pytest.MonkeyPatch, stack: EmbeddedStack) -> tuple[Any, list[str]]:
    """The daemon's own S3 client (standard retries, 3 attempts) and the HTTP requests it sends."""
    settings = settings_for(monkeypatch, {**stack.env(), "OCRBOOTH_S3_ENDPOINT_URL": endpoint_url})
    client = s3_client(settings.s3)
    sent: list[str] = []

    def count(request: Any, **_: Any) -> None:
        sent.append(f"{request.method} {request.url}")

    client.meta.events.register("before-send.s3", count)
    return client, sent


async def test_a_4xx_answer_is_poison_and_sent_once_while_a_503_is_retried(
    monkeypatch: pytest.MonkeyPatch, stack: EmbeddedStack, s3_prefix: str
) -> None:
    """SeaweedFS's 416 InvalidRange, 400 BadDigest and 400 InvalidArgument each become PoisonError
    `storage_request_rejected` after one HTTP request; the same read answered 503 SlowDown by a proxy is sent
    again (botocore's retries) and becomes RetryableError `storage_unavailable`."""
    client, sent = _counting_client(stack.s3_endpoint_url, monkeypatch, stack)
    bucket, key = stack.bucket, f"{s3_prefix}ten-bytes"
    s3_call(client, "put_object", Bucket=bucket, Key=key, Body=b"0123456789")
    wrong_md5 = base64.b64encode(hashlib.md5(b"other bytes", usedforsecurity=False).digest()).decode()
    rejected: dict[str, Callable[[], object]] = {
        "416 InvalidRange": lambda: s3_call(client, "get_object", Bucket=bucket, Key=key, Range="bytes=100-200"),
        "400 BadDigest": lambda: s3_call(
            client, "put_object", Bucket=bucket, Key=f"{key}-2", Body=b"abc", ContentMD5=wrong_md5
        ),
        "400 InvalidArgument": lambda: s3_call(client, "list_objects_v2", Bucket=bucket, MaxKeys=-1),
    }
    for answer, call in rejected.items():
        sent.clear()
        with pytest.raises(PoisonError) as caught:
            call()
        assert caught.value.code == "storage_request_rejected", answer
        assert answer.split()[1] in caught.value.message
        assert len(sent) == 1, (answer, sent)

    proxy = S3FaultProxy(stack.s3_endpoint_url)
    proxy.fail("GET", rf"/{key}$")
    with proxy.running():
        client, sent = _counting_client(proxy.url, monkeypatch, stack)
        with pytest.raises(RetryableError) as outage:
            s3_call(client, "get_object", Bucket=bucket, Key=key)
    assert outage.value.code == "storage_unavailable"
    assert len(sent) > 1  # the initial request and botocore's retries
    assert len(proxy.refused) == len(sent)


async def test_an_ocr_source_with_dot_dot_is_invalid_source_and_reads_nothing(
    monkeypatch: pytest.MonkeyPatch,
    stack: EmbeddedStack,
    topics: TopicNames,
    daemon_env: dict[str, str],
    s3_prefix: str,
) -> None:
    """`sub/../secret.pdf` (which S3 servers may resolve to `secret.pdf`), `./`, `//` and a backslash in a source
    key: each request fails with invalid_source; the canonical key of the same object is recognised."""
    secret = f"{s3_prefix}secret.pdf"
    stack.s3_client().put_object(
        Bucket=stack.bucket, Key=secret, Body=samples.text_pdf(["The quick brown fox jumps over the lazy dog."])
    )
    keys = {
        "dotdot": f"{s3_prefix}sub/../secret.pdf",
        "dot": f"{s3_prefix}./secret.pdf",
        "empty": f"{s3_prefix.rstrip('/')}//secret.pdf",
        "backslash": f"{s3_prefix}sub\\..\\secret.pdf",
        "canonical": secret,
    }
    await produce(
        stack.bootstrap_servers,
        topics.ocr_requests,
        [
            (
                name.encode(),
                json.dumps(
                    {"request_id": name, "document_id": name, "source": {"uri": f"s3://{stack.bucket}/{key}"}}
                ).encode(),
            )
            for name, key in keys.items()
        ],
    )
    env = {**daemon_env, "OCRBOOTH_HANDLERS": "ocr", "OCRBOOTH_OCR_ENGINE": "tesseract"}
    async with running_daemon(settings_for(monkeypatch, env)):
        records = await consume_all(stack.bootstrap_servers, topics.ocr_results, count=len(keys), timeout_s=120)
    results = {r["request_id"]: r for r in (json.loads(rec.value) for rec in records)}
    assert results["canonical"]["status"] == "succeeded"
    for name in ("dotdot", "dot", "empty", "backslash"):
        assert results[name]["status"] == "failed", results[name]
        assert results[name]["error"]["code"] == "invalid_source", results[name]
