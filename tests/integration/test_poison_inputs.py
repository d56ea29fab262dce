"""Records that used to crash the daemon on every read (so every replica, in turn): now each is dead-lettered."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from aiokafka import AIOKafkaProducer

from ocrbooth.daemon.app import Daemon
from tests.support.daemon import request_event, settings_for
from tests.support.kafka import committed_offsets, consume_all, high_watermarks
from tests.support.stack import TopicNames

_DEEP = b"[" * 1000 + b"]" * 1000
_HUGE_INT = b'{"schema_version": 1, "request_id": ' + b"9" * 5000 + b"}"
_DEEP_OBJECT = b'{"a":' * 1200 + b"1" + b"}" * 1200


async def _produce_raw(bootstrap: str, topic: str, records: list[dict[str, object]]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, enable_idempotence=False, acks="all", max_request_size=8 * 1024 * 1024
    )
    await producer.start()
    try:
        for rec in records:
            fut = await producer.send(topic, partition=0, **rec)  # type: ignore[arg-type]
            await fut
    finally:
        await producer.stop()


@pytest.mark.parametrize("topic_partitions", [1])
async def test_records_that_crashed_the_daemon_are_dead_lettered(
    monkeypatch: pytest.MonkeyPatch, bootstrap: str, topics: TopicNames, daemon_env: dict[str, str], group_id: str
) -> None:
    """A null header value, JSON nested past the parser's limit, a 5,000-digit integer and a 1 MB key each get a
    dead letter that fits the broker (the key cut and flagged); the daemon keeps running, answers the valid
    request after them and commits to the end of the partition."""
    huge_key = b"k" * (1024 * 1024)
    records: list[dict[str, object]] = [
        {"key": b"null-header", "value": request_event(1), "headers": [("trace", None), ("ok", b"1")]},
        {"key": b"deep", "value": _DEEP},
        {"key": b"deep-object", "value": _DEEP_OBJECT},
        {"key": b"huge-int", "value": _HUGE_INT},
        {"key": huge_key, "value": b"{not json"},
        {"key": b"binary-header", "value": b"\xff\xfe", "headers": [("bin", bytes(range(256)))]},
        {"key": b"valid", "value": request_event(7)},
    ]
    await _produce_raw(bootstrap, topics.ocr_requests, records)
    settings = settings_for(monkeypatch, daemon_env, OCRBOOTH_DLQ_MAX_KEY_BYTES="256")
    daemon = Daemon(settings)
    assert await asyncio.wait_for(daemon.run_until_idle(), 120) == 0

    letters = {}
    for rec in await consume_all(bootstrap, topics.dlq, count=5, timeout_s=30):
        letters[rec.key] = json.loads(rec.value)
    assert {k[:16] for k in letters} == {b"deep", b"deep-object", b"huge-int", b"k" * 16, b"binary-header"}
    assert letters[b"deep"]["error"]["code"] == "invalid_json"
    assert "nested too deeply" in letters[b"deep"]["error"]["message"]
    assert letters[b"deep-object"]["error"]["code"] == "invalid_json"
    assert letters[b"huge-int"]["error"]["code"] == "invalid_json"
    assert letters[b"binary-header"]["error"]["code"] == "invalid_utf8"
    assert letters[b"binary-header"]["headers"] == [
        {"key": "bin", "value_base64": base64.b64encode(bytes(range(256))).decode()}
    ]
    cut = letters[b"k" * 256]
    assert cut["key_truncated"] is True
    assert base64.b64decode(cut["key_base64"]) == b"k" * 256
    assert cut["error"]["code"] == "invalid_json"

    results = {json.loads(r.value)["request_id"] for r in await consume_all(bootstrap, topics.ocr_results, count=2)}
    assert results == {"req-1", "req-7"}  # the null header did not stop its own (valid) request either
    assert await committed_offsets(bootstrap, group_id, topics.ocr_requests) == await high_watermarks(
        bootstrap, topics.ocr_requests
    )


@pytest.mark.parametrize("topic_partitions", [1])
async def test_output_whose_key_is_too_long_fails_into_a_fitting_dead_letter(
    monkeypatch: pytest.MonkeyPatch, bootstrap: str, topics: TopicNames, daemon_env: dict[str, str], group_id: str
) -> None:
    """A request whose document_id (the output key) is 600 KB cannot get a result; it is dead-lettered as
    output_too_large with its key cut, and the partition moves on."""
    doc_id = "d" * (600 * 1024)
    event = json.loads(request_event(3))
    event["document_id"] = doc_id
    await _produce_raw(
        bootstrap,
        topics.ocr_requests,
        [{"key": b"long-id", "value": json.dumps(event).encode()}, {"key": b"after", "value": request_event(4)}],
    )
    daemon = Daemon(settings_for(monkeypatch, daemon_env))
    assert await asyncio.wait_for(daemon.run_until_idle(), 120) == 0

    (letter_rec,) = await consume_all(bootstrap, topics.dlq, count=1, timeout_s=30)
    letter = json.loads(letter_rec.value)
    assert letter["error"]["code"] == "output_too_large"
    assert letter["value_truncated"] is True
    assert len(letter_rec.value) < 200_000
    results = [json.loads(r.value)["request_id"] for r in await consume_all(bootstrap, topics.ocr_results, count=1)]
    assert results == ["req-4"]
    assert await committed_offsets(bootstrap, group_id, topics.ocr_requests) == await high_watermarks(
        bootstrap, topics.ocr_requests
    )
