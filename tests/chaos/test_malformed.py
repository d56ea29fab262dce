"""Chaos: hundreds of generated malformed records on every input topic, then a valid one on each partition."""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from ocrbooth.dev.embedded import EmbeddedStack
from tests.chaos.common import SHORT_SESSION, exited, source_of
from tests.chaos.figures import Figures, codes_of
from tests.chaos.malformed import (
    GENERIC_CODES,
    Malformed,
    Topic,
    control_topic,
    finetune_topic,
    generate,
    kinds,
    ocr_topic,
)
from tests.support.daemon import DaemonProcess, http_get, request_event
from tests.support.kafka import consume_all, wait_until
from tests.support.stack import TopicNames, unique_suffix

INPUT_LIMIT = 64 * 1024  # max_input_message_bytes: small, so that oversize values stay cheap to produce
ALLOWED_MODEL = "chaos/allowed-model"
WALL_BOUND_S = 180

# Records per kind and topic: 306 in all. Huge keys are few (each is 1 MiB through the broker twice).
COUNTS = {
    "ocr.requests": {
        "tombstone": 8,
        "empty": 4,
        "invalid_utf8": 12,
        "not_json": 12,
        "not_object": 8,
        "schema": 24,
        "version": 6,
        "deep_nesting": 12,
        "huge_int": 10,
        "non_finite": 12,
        "oversize": 8,
        "headers": 14,
        "huge_key": 2,
    },
    "finetune.requests": {
        "tombstone": 4,
        "empty": 2,
        "invalid_utf8": 8,
        "not_json": 8,
        "not_object": 4,
        "schema": 21,
        "version": 4,
        "over_bounds": 10,
        "deep_nesting": 8,
        "huge_int": 8,
        "non_finite": 15,
        "oversize": 4,
        "headers": 8,
        "huge_key": 2,
    },
    "finetune.control": {
        "tombstone": 4,
        "empty": 2,
        "invalid_utf8": 6,
        "not_json": 6,
        "not_object": 4,
        "schema": 10,
        "version": 4,
        "deep_nesting": 6,
        "huge_int": 6,
        "non_finite": 6,
        "oversize": 4,
        "headers": 8,
        "huge_key": 2,
    },
}

Sent = dict[tuple[str, int, int], Malformed | str]
"""(topic, partition, offset) -> the malformed record there, or the kind of valid record ("valid:...")."""


@pytest.fixture
def topic_partitions() -> int:
    """Two partitions per group topic, each ending with a valid record."""
    return 2


def _malformed(topic: Topic) -> list[Malformed]:
    builds = kinds(INPUT_LIMIT)
    return [m for kind, count in COUNTS[topic.name].items() for m in generate(builds[kind](topic), count)]


async def _produce(
    bootstrap: str, topic: str, records: Sequence[tuple[int, Malformed | tuple[bytes, bytes]]]
) -> list[tuple[int, int]]:
    """Produce (partition, record) in order; return each one's (partition, offset)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, enable_idempotence=False, acks="all", max_request_size=4 * 1024 * 1024
    )
    await producer.start()
    try:
        futures = []
        for partition, record in records:
            if isinstance(record, Malformed):
                key, value, headers = record.key, record.value, list(record.headers)
            else:
                (key, value), headers = record, []
            futures.append(await producer.send(topic, value=value, key=key, partition=partition, headers=headers))
        return [(meta.partition, meta.offset) for meta in await asyncio.gather(*futures)]
    finally:
        await producer.stop()


def _s3_has(stack: EmbeddedStack, key: str) -> bool:
    s3 = stack.s3_client()
    try:
        return "Contents" in s3.list_objects_v2(Bucket=stack.bucket, Prefix=key)
    finally:
        s3.close()


def _outcome(topic: str, record: Any) -> tuple[str, str | None]:
    """("dead_letter" | "failed" | "succeeded" | "cancelled" | other, code) of one output record."""
    value = json.loads(record.value)
    if "source_topic" in value:
        return "dead_letter", value["error"]["code"]
    if "status" in value:  # OcrResult
        return value["status"], (value.get("error") or {}).get("code")
    kind = value["event"]  # FinetuneEvent
    return kind, (value.get("error") or {}).get("code")


@pytest.mark.timeout(WALL_BOUND_S + 60)
async def test_generated_malformed_records_are_dead_lettered_and_the_daemon_keeps_serving(
    stack: EmbeddedStack,
    topics: TopicNames,
    daemon_env: dict[str, str],
    tmp_path: Path,
    chaos_report: Callable[[Figures], None],
) -> None:
    """306 generated malformed records (tombstones, null and binary headers, invalid UTF-8, 5,000-deep nesting,
    20,000-digit and non-finite numbers, oversize values, 1 MiB keys, schema violations) on ocr.requests,
    finetune.requests and the finetune.control broadcast: each gets one dead letter or failed result with a
    specific code, the daemon never exits, and the valid record after them on every partition is answered."""
    started = time.monotonic()
    bootstrap = stack.bootstrap_servers
    job, control_job = f"chaos-{unique_suffix()}", f"chaos-{unique_suffix()}"
    ocr, finetune, control = ocr_topic(), finetune_topic(job, ALLOWED_MODEL), control_topic(job)
    generated = {t.name: _malformed(t) for t in (ocr, finetune, control)}
    assert sum(len(g) for g in generated.values()) >= 300
    real = {
        ocr.name: topics.ocr_requests,
        finetune.name: topics.finetune_requests,
        control.name: topics.finetune_control,
    }
    sent: Sent = {}

    env = {
        **daemon_env,
        **SHORT_SESSION,
        "OCRBOOTH_HANDLERS": "echo,finetune",
        "OCRBOOTH_MAX_INPUT_MESSAGE_BYTES": str(INPUT_LIMIT),
        "OCRBOOTH_OCR_MAX_INLINE_BYTES": str(INPUT_LIMIT // 2),  # an inline document must fit in a message
        # Only the cancelled job's model is allowed: whatever slips through validation can never train.
        "OCRBOOTH_FINETUNE_ALLOWED_BASE_MODELS": ALLOWED_MODEL,
        "OCRBOOTH_FINETUNE_WORKDIR": str(tmp_path / "jobs"),
    }
    proc = DaemonProcess(env, tmp_path / "daemon.log").start()
    try:
        await proc.wait_ready()

        # The control topic first: cancel `job`, the malformed records, then cancel `control_job`. Once the
        # second cancel is in S3, every control record before it has been read.
        cancel = lambda job_id: (job_id.encode(), json.dumps({"job_id": job_id, "action": "cancel"}).encode())  # noqa: E731
        control_records = [(0, cancel(job)), *((0, m) for m in generated[control.name]), (0, cancel(control_job))]
        for (p, o), (_, record) in zip(
            await _produce(bootstrap, topics.finetune_control, control_records), control_records, strict=True
        ):
            sent[(topics.finetune_control, p, o)] = record if isinstance(record, Malformed) else "valid:cancel"
        marker = f"jobs/{control_job}/cancel.json"
        await wait_until(
            lambda: exited(proc) or asyncio.to_thread(_s3_has, stack, marker),
            90,
            message="the cancel after the malformed",
        )
        cancels_seen = sum(
            [await asyncio.to_thread(_s3_has, stack, f"jobs/{j}/cancel.json") for j in (job, control_job)]
        )

        # The group topics: malformed records spread over both partitions, then one valid record on each.
        valid_request = json.dumps({**finetune.valid}).encode()
        for topic, valid in (
            (ocr.name, lambda p: (f"valid-{p}".encode(), request_event(10_000 + p))),
            (finetune.name, lambda p: (job.encode(), valid_request)),
        ):
            records: list[tuple[int, Malformed | tuple[bytes, bytes]]] = [
                (i % 2, m) for i, m in enumerate(generated[topic])
            ]
            records += [(0, valid(0)), (1, valid(1))]
            for (p, o), (_, record) in zip(await _produce(bootstrap, real[topic], records), records, strict=True):
                sent[(real[topic], p, o)] = record if isinstance(record, Malformed) else f"valid:{topic}"

        # Every record with an output, except the two cancels (answered by their S3 markers, checked above).
        expected = sum(1 for v in sent.values() if v != "valid:cancel")

        def outputs(records: list[Any]) -> bool:
            return len({source_of(r) for r in records} & set(sent)) >= expected

        streams = [topics.dlq, topics.ocr_results, topics.finetune_events]
        everything: list[Any] = []
        deadline = time.monotonic() + WALL_BOUND_S
        while True:
            everything = []
            for stream in streams:
                everything += await consume_all(bootstrap, stream, timeout_s=30)
            if outputs(everything) or time.monotonic() > deadline or exited(proc):
                break
            await asyncio.sleep(1)
        exit_code = proc.proc.poll() if proc.proc is not None else None
        health = (await asyncio.to_thread(http_get, proc.url + "/healthz"))[0]
    finally:
        proc.kill()

    by_input: dict[tuple[str, int, int], list[tuple[str, str | None]]] = defaultdict(list)
    for record in everything:
        source = source_of(record)
        if source is not None:
            by_input[source].append(_outcome(record.topic, record))
    answered = sum(1 for key in sent if by_input.get(key)) + cancels_seen  # a cancel is answered in S3
    duplicated = sum(max(0, len(v) - 1) for v in by_input.values())
    letters = [code for v in by_input.values() for outcome, code in v if outcome == "dead_letter"]
    failed = sum(1 for v in by_input.values() for outcome, _ in v if outcome == "failed")
    chaos_report(
        Figures(
            scenario="malformed",
            sent=len(sent),
            answered=answered,
            lost=len(sent) - answered,
            duplicated=duplicated,
            duplicate_bound=0,
            failed=failed,
            wall_s=time.monotonic() - started,
            wall_bound_s=WALL_BOUND_S,
            dead_lettered=codes_of(c or "?" for c in letters),
        )
    )

    assert exit_code is None, f"the daemon exited with {exit_code}:\n{proc.log_tail()}"
    assert health == 200
    assert cancels_seen == 2, "a valid control record was not answered"
    problems = []
    for key, what in sorted(sent.items(), key=lambda kv: kv[0]):
        got = by_input.get(key, [])
        if what == "valid:cancel":
            continue
        if isinstance(what, str):
            want = "succeeded" if what == f"valid:{ocr.name}" else "cancelled"
            if [o for o, _ in got] != [want]:
                problems.append(f"{key} valid {what}: {got}")
            continue
        if len(got) != 1:
            problems.append(f"{key} {what.describe()}: {len(got)} outputs {got}")
            continue
        outcome, code = got[0]
        if outcome not in ("dead_letter", "failed") or code is None or code in GENERIC_CODES:
            problems.append(f"{key} {what.describe()}: {outcome} {code}")
        elif what.codes is not None and code not in what.codes:
            problems.append(f"{key} {what.describe()}: code {code}, expected one of {sorted(what.codes)}")
    assert not problems, f"{len(problems)} records not answered as they should be:\n" + "\n".join(problems[:40])
    # A 1 MiB key cannot be repeated in a dead letter (raw and base64, over the broker's limit): it is cut.
    huge = {key for key, what in sent.items() if isinstance(what, Malformed) and what.kind == "huge_key"}
    letters_for_huge = [r for r in everything if r.topic == topics.dlq and source_of(r) in huge]
    assert len(letters_for_huge) == len(huge)
    for record in letters_for_huge:
        assert json.loads(record.value)["key_truncated"] is True
        assert len(record.key or b"") < 1024 * 1024
    assert duplicated == 0
