"""The event runtime against a real broker (Tansu) and S3 (SeaweedFS), daemon in-process."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import shutil
import subprocess
from collections import Counter

import pytest

from ocrbooth.daemon.app import Daemon
from ocrbooth.dev.embedded import EmbeddedStack
from tests.support.daemon import http_get, request_event, running_daemon, settings_for
from tests.support.kafka import committed_offsets, consume_all, high_watermarks, produce, wait_until
from tests.support.stack import TopicNames


def _by_request(records: list) -> Counter[str]:
    return Counter(json.loads(r.value)["request_id"] for r in records)


async def test_every_request_gets_exactly_one_output(
    monkeypatch: pytest.MonkeyPatch, bootstrap: str, topics: TopicNames, daemon_env: dict[str, str], group_id: str
) -> None:
    """2,000 events with random handler delays: one output per request, committed offsets equal the end offsets."""
    rng = random.Random(2)
    n = 2000
    ends = await produce(
        bootstrap,
        topics.ocr_requests,
        ((f"doc-{i}".encode(), request_event(i, **{"echo.delay_ms": str(rng.randint(0, 20))})) for i in range(n)),
    )
    settings = settings_for(monkeypatch, daemon_env, OCRBOOTH_MAX_IN_FLIGHT="64")
    daemon = Daemon(settings)
    assert await asyncio.wait_for(daemon.run_until_idle(), 180) == 0

    results = await consume_all(bootstrap, topics.ocr_results, count=n, timeout_s=30)
    seen = _by_request(results)
    assert set(seen) == {f"req-{i}" for i in range(n)}
    assert max(seen.values()) == 1, f"duplicates: {[k for k, v in seen.items() if v > 1][:10]}"
    assert all(json.loads(r.value)["status"] == "succeeded" for r in results)
    committed = await committed_offsets(bootstrap, group_id, topics.ocr_requests)
    assert committed == ends == await high_watermarks(bootstrap, topics.ocr_requests)


def _malformed(i: int, rng: random.Random) -> tuple[str, bytes]:
    kind = i % 5
    if kind == 0:
        return "invalid_utf8", b'{"request_id": "\xff\xfe' + rng.randbytes(8) + b'"}'
    if kind == 1:
        return "invalid_json", rng.choice([b"{", b"nope", b'{"a": 1,}', b"\x00\x01", b'{"request_id": "r"'])
    if kind == 2:
        bad = rng.choice(
            [
                {"request_id": "r"},  # missing fields
                {"request_id": "", "document_id": "d", "source": {"uri": "s3://b/k"}},  # empty id
                {"request_id": "r", "document_id": "d", "source": {"uri": "s3://b/k", "data_base64": "eA=="}},
                {"request_id": "r", "document_id": "d", "source": {"uri": "https://example.com/x.pdf"}},
                {"request_id": "r", "document_id": "d", "source": {"uri": "s3://b/k"}, "pages": [0]},
                {"request_id": "r", "document_id": "d", "source": {"uri": "s3://b/k"}, "surprise": 1},
                [1, 2, 3],
            ]
        )
        return "schema_violation", json.dumps(bad).encode()
    if kind == 3:
        version = rng.choice([0, 2, 99])
        doc = {"schema_version": version, "request_id": "r", "document_id": "d", "source": {"uri": "s3://b/k"}}
        return "unsupported_schema_version", json.dumps(doc).encode()
    return "message_too_large", json.dumps({"request_id": "r", "padding": "x" * 6000}).encode()


async def test_malformed_events_are_dead_lettered_with_specific_codes(
    monkeypatch: pytest.MonkeyPatch, bootstrap: str, topics: TopicNames, daemon_env: dict[str, str]
) -> None:
    """200 malformed events each get a DeadLetter with the right code; valid events interleaved are all processed."""
    rng = random.Random(7)
    items: list[tuple[bytes, bytes]] = []
    expected: dict[str, tuple[str, bytes]] = {}
    for i in range(200):
        code, value = _malformed(i, rng)
        key = f"bad-{i}"
        expected[key] = (code, value)
        items.append((key.encode(), value))
        items.append((f"doc-{i}".encode(), request_event(i)))
    await produce(bootstrap, topics.ocr_requests, items)
    settings = settings_for(
        monkeypatch,
        daemon_env,
        OCRBOOTH_MAX_INPUT_MESSAGE_BYTES="4096",
        OCRBOOTH_OCR_MAX_INLINE_BYTES="3072",  # an inline document must fit in a message, base64-encoded
        OCRBOOTH_DLQ_MAX_VALUE_BYTES="1024",
    )
    daemon = Daemon(settings)
    assert await asyncio.wait_for(daemon.run_until_idle(), 120) == 0

    letters = await consume_all(bootstrap, topics.dlq, count=200, timeout_s=30)
    assert len(letters) == 200
    for rec in letters:
        letter = json.loads(rec.value)
        code, value = expected[rec.key.decode()]
        assert letter["error"]["code"] == code, letter
        assert letter["error"]["message"]
        assert letter["source_topic"] == topics.ocr_requests
        kept = base64.b64decode(letter["value_base64"])
        assert letter["value_truncated"] == (len(value) > 1024)
        assert kept == value[:1024]
    results = await consume_all(bootstrap, topics.ocr_results, count=200, timeout_s=30)
    assert set(_by_request(results)) == {f"req-{i}" for i in range(200)}
    assert daemon.consumer.counts == {"succeeded": 200, "dead_lettered": 200, "failed_result": 0, "requeued": 0}


async def test_handler_failures_become_failed_results_and_oversize_outputs_go_to_s3(
    monkeypatch: pytest.MonkeyPatch, stack: EmbeddedStack, topics: TopicNames, daemon_env: dict[str, str]
) -> None:
    """Poison, crashing and exhausted-retry handlers give failed results with codes; transient ones recover;
    an output over max_message_bytes is offloaded to S3 and the event carries its URI."""
    bootstrap = stack.bootstrap_servers
    cases = {
        "poison": ("failed", "injected_failure"),
        "crash": ("failed", "handler_error"),
        "retryable": ("failed", "retries_exhausted"),
        "retryable:2": ("succeeded", None),
    }
    items = [(k.encode(), request_event(i, **{"echo.fail": k})) for i, k in enumerate(cases)]
    items.append((b"big", request_event(99, **{"echo.pad_bytes": "20000"})))
    await produce(bootstrap, topics.ocr_requests, items)
    settings = settings_for(
        monkeypatch,
        daemon_env,
        OCRBOOTH_MAX_MESSAGE_BYTES="8192",
        OCRBOOTH_RETRY_MAX_ATTEMPTS="3",
        OCRBOOTH_RETRY_INITIAL_BACKOFF_MS="5",
    )
    daemon = Daemon(settings)
    assert await asyncio.wait_for(daemon.run_until_idle(), 120) == 0

    results = {
        json.loads(r.value)["request_id"]: json.loads(r.value)
        for r in await consume_all(bootstrap, topics.ocr_results, count=5)
    }
    for i, (status, code) in enumerate(cases.values()):
        result = results[f"req-{i}"]
        assert result["status"] == status, result
        assert (result["error"] or {}).get("code") == code
    big = results["req-99"]
    assert big["pages"] == []
    assert big["result_uri"].startswith(f"s3://{stack.bucket}/offload/")
    key = big["result_uri"].split("/", 3)[3]
    full = json.loads(stack.s3_client().get_object(Bucket=stack.bucket, Key=key)["Body"].read())
    assert full["pages"][0]["text"] == "x" * 20000
    assert await consume_all(bootstrap, topics.dlq, count=None, timeout_s=10) == []


async def test_fatal_error_exits_non_zero_without_committing_the_message(
    monkeypatch: pytest.MonkeyPatch, bootstrap: str, topics: TopicNames, daemon_env: dict[str, str], group_id: str
) -> None:
    """A FatalError (e.g. the GPU is gone) stops the daemon with exit code 70 and leaves its message uncommitted."""
    ends = await produce(
        bootstrap,
        topics.ocr_requests,
        [(b"ok", request_event(0)), (b"fatal", request_event(1, **{"echo.fail": "fatal"}))],
        partition=0,
    )
    settings = settings_for(monkeypatch, daemon_env)
    daemon = Daemon(settings)
    assert await asyncio.wait_for(daemon.run_until_idle(), 120) == 70
    committed = await committed_offsets(bootstrap, group_id, topics.ocr_requests)
    assert ends == {0: 2}
    assert committed[0] is not None
    assert committed[0] <= 1, committed


async def test_broker_restart_mid_stream_loses_nothing(
    monkeypatch: pytest.MonkeyPatch, stack: EmbeddedStack, topics: TopicNames, daemon_env: dict[str, str]
) -> None:
    """Tansu restarted while the daemon works: the daemon reconnects by itself and every request gets output."""
    bootstrap = stack.bootstrap_servers
    n = 1000
    await produce(
        bootstrap,
        topics.ocr_requests,
        ((f"doc-{i}".encode(), request_event(i, **{"echo.delay_ms": "60"})) for i in range(n)),
    )
    settings = settings_for(monkeypatch, daemon_env, OCRBOOTH_MAX_IN_FLIGHT="16")
    async with running_daemon(settings) as (daemon, run):
        await wait_until(lambda: daemon.consumer.counts["succeeded"] >= 100, 60, message="100 handled before restart")
        before = daemon.consumer.counts["succeeded"]
        await asyncio.to_thread(stack.restart_broker)
        assert before < n / 2, "the stream was nearly done before the restart; slow the handler down"
        results = await consume_all(
            bootstrap, topics.ocr_results, until=lambda recs: len(_by_request(recs)) >= n, timeout_s=180
        )
        assert not run.done(), "the daemon exited during the outage"
        assert set(_by_request(results)) == {f"req-{i}" for i in range(n)}


async def test_metrics_pass_promtool(
    monkeypatch: pytest.MonkeyPatch, bootstrap: str, topics: TopicNames, daemon_env: dict[str, str]
) -> None:
    """/metrics, after real traffic with every outcome, passes `promtool check metrics`."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: `make test` installs Debian's prometheus package"
    await produce(
        bootstrap,
        topics.ocr_requests,
        [(b"a", request_event(0)), (b"b", b"{oops"), (b"c", request_event(2, **{"echo.fail": "poison"}))],
    )
    settings = settings_for(monkeypatch, daemon_env)
    async with running_daemon(settings) as (daemon, _):
        await wait_until(lambda: sum(daemon.consumer.counts.values()) >= 3, 60, message="3 messages handled")
        await wait_until(lambda: daemon.metrics.commits._value.get() >= 1, 10, message="a commit")
        status, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{daemon.health.port}/metrics")
    assert status == 200
    for name in (
        "ocrbooth_consumed_messages_total",
        "ocrbooth_handled_messages_total",
        "ocrbooth_produced_messages_total",
        "ocrbooth_dead_letters_total",
        "ocrbooth_handle_duration_seconds_bucket",
        "ocrbooth_publish_duration_seconds_bucket",
        "ocrbooth_in_flight_messages",
        "ocrbooth_paused_partitions",
        "ocrbooth_consumer_lag_messages",
        "ocrbooth_commits_total",
        "ocrbooth_commit_failures_total",
        "ocrbooth_rebalances_total",
    ):
        assert f"\n{name}" in body, name
    check = await asyncio.to_thread(
        subprocess.run, [promtool, "check", "metrics"], input=body.encode(), capture_output=True, timeout=30
    )
    assert check.returncode == 0, check
    assert not check.stdout.strip(), check
    assert not check.stderr.strip(), check


async def test_production_echo_gives_one_output_per_request_and_dead_letters_bad_ones(
    monkeypatch: pytest.MonkeyPatch, bootstrap: str, topics: TopicNames, daemon_env: dict[str, str], group_id: str
) -> None:
    """Echo as in production (no fault injection), budget of 500 filled and freed many times: 2,000 requests
    with malformed ones interleaved each get exactly one output or one dead letter, and committed offsets
    equal the end offsets."""
    items: list[tuple[bytes, bytes]] = []
    for i in range(2000):
        items.append((f"doc-{i}".encode(), request_event(i)))
        if i % 20 == 0:
            items.append((f"bad-{i}".encode(), b"{broken"))
    ends = await produce(bootstrap, topics.ocr_requests, items)
    settings = settings_for(monkeypatch, daemon_env, OCRBOOTH_ECHO_FAULTS="false", OCRBOOTH_MAX_IN_FLIGHT="500")
    daemon = Daemon(settings)
    assert not daemon.handlers[0].faults
    assert await asyncio.wait_for(daemon.run_until_idle(), 180) == 0
    results = await consume_all(bootstrap, topics.ocr_results, count=2000, timeout_s=30)
    seen = _by_request(results)
    assert set(seen) == {f"req-{i}" for i in range(2000)}
    assert max(seen.values()) == 1
    letters = await consume_all(bootstrap, topics.dlq, count=100, timeout_s=30)
    assert {json.loads(r.value)["error"]["code"] for r in letters} == {"invalid_json"}
    assert sorted(r.key for r in letters) == sorted(f"bad-{i}".encode() for i in range(0, 2000, 20))
    assert await committed_offsets(bootstrap, group_id, topics.ocr_requests) == ends
