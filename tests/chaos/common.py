"""Counting what came out of the daemon, shared by the chaos scenarios."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ocrbooth import constants
from tests.support.daemon import DaemonProcess, metric_value, request_event
from tests.support.kafka import consume_all

# A killed member holds its partitions until its session expires, and Tansu completes a join after half the
# session timeout: a 3 s session keeps the many restarts of these scenarios quick.
SHORT_SESSION = {"OCRBOOTH_KAFKA_SESSION_TIMEOUT_MS": "3000", "OCRBOOTH_KAFKA_HEARTBEAT_INTERVAL_MS": "1000"}


def handled(proc: DaemonProcess) -> float:
    """Messages this daemon process has finished (0 while its metrics server does not answer)."""
    try:
        return metric_value(proc.metrics(), "ocrbooth_handled_messages_total")
    except AssertionError:
        return 0.0


def exited(proc: DaemonProcess) -> bool:
    """Whether the daemon process has ended (a test waiting on its output can stop waiting)."""
    return proc.proc is None or proc.proc.poll() is not None


def echo_stream(n: int, seed: int, *, delay_ms: tuple[int, int]) -> list[tuple[bytes, bytes]]:
    """n (key, value) echo requests `req-0`..`req-{n-1}`, each with a delay drawn from `delay_ms` (seeded)."""
    rng = random.Random(seed)
    return [(f"doc-{i}".encode(), request_event(i, **{"echo.delay_ms": str(rng.randint(*delay_ms))})) for i in range(n)]


def request_ids(records: Iterable[Any]) -> list[str]:
    """The request_id of every OcrResult record, in order."""
    return [json.loads(r.value)["request_id"] for r in records]


@dataclass(frozen=True)
class Tally:
    """Distinct inputs answered, inputs with no output, and outputs beyond the first per input."""

    answered: int
    lost: int
    duplicated: int
    failed: int
    missing: tuple[str, ...]


def tally(expected: Iterable[str], results: Sequence[Any]) -> Tally:
    """Count OcrResults against the request ids sent; an output for an id never sent fails the test."""
    wanted = set(expected)
    values = [json.loads(r.value) for r in results]
    per_id = Counter(v["request_id"] for v in values)
    strangers = set(per_id) - wanted
    assert not strangers, f"results for requests never sent: {sorted(strangers)[:10]}"
    missing = tuple(sorted(wanted - set(per_id)))
    return Tally(
        answered=len(per_id),
        lost=len(missing),
        duplicated=sum(per_id.values()) - len(per_id),
        failed=len({v["request_id"] for v in values if v["status"] == "failed"}),
        missing=missing[:20],
    )


async def answered_ids(bootstrap: str, topic: str, n: int, timeout_s: float) -> list[Any]:
    """Read `topic` until n distinct request ids have results (AssertionError listing what came at timeout)."""
    return await consume_all(bootstrap, topic, until=lambda recs: len(set(request_ids(recs))) >= n, timeout_s=timeout_s)


def source_of(record: Any) -> tuple[str, int, int] | None:
    """(topic, partition, offset) of the input an output record answers, from its `ocrbooth-source` header."""
    for key, value in record.headers or ():
        if key == constants.HEADER_SOURCE and value is not None:
            topic, partition, offset = value.decode().rsplit("/", 2)
            return topic, int(partition), int(offset)
    return None


async def dead_lettered(bootstrap: str, dlq: str) -> dict[str, str]:
    """request_id -> code of every dead-lettered DocumentRequest (valid requests must have none)."""
    letters: dict[str, str] = {}
    for record in await consume_all(bootstrap, dlq, timeout_s=30):
        letter = json.loads(record.value)
        try:
            original = json.loads(base64.b64decode(letter.get("value_base64") or ""))
            request_id = str(original["request_id"])
        except (ValueError, KeyError, TypeError):
            request_id = f"{letter['partition']}@{letter['offset']}"
        letters[request_id] = letter["error"]["code"]
    return letters


async def settled(bootstrap: str, results: str, dlq: str, n: int, timeout_s: float) -> None:
    """Wait until n distinct requests have a result or a dead letter (a valid request that was dead-lettered
    must fail the test by name, not by a timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        answered = set(request_ids(await consume_all(bootstrap, results, timeout_s=30)))
        if len(answered) >= n or len(answered | set(await dead_lettered(bootstrap, dlq))) >= n:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{n - len(answered)} requests unanswered after {timeout_s:.0f}s")
        await asyncio.sleep(2)
