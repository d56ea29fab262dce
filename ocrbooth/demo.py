"""`ocrbooth demo`: the embedded stack, a daemon, sample events through every path, and what came out.

At this stage the daemon runs the diagnostic `echo` handler (the OCR engines arrive with the OCR pipeline):
valid requests get a result, malformed ones a dead letter with its code, and the probes and metrics are
read back over HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from ocrbooth.daemon.app import Daemon
from ocrbooth.daemon.config import load_settings
from ocrbooth.daemon.embedded import EmbeddedStack
from ocrbooth.logs import configure_logging

_VALID = 5
_MALFORMED: list[tuple[str, bytes]] = [
    ("bad UTF-8", b"\xff\xfe\x00garbage"),
    ("not JSON", b"{this is not json"),
    ("unknown schema_version", json.dumps({"schema_version": 99, "request_id": "r", "document_id": "d"}).encode()),
    ("schema violation", json.dumps({"request_id": "r-bad", "source": {"uri": "http://nope"}}).encode()),
]


def _http(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310  (our own 127.0.0.1 server)
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def _collect(bootstrap: str, topic: str, want: int, timeout_s: float) -> list[Any]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    seen: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(seen) < want and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                seen.extend(records)
    finally:
        await consumer.stop()
    return seen


async def _demo(stack: EmbeddedStack) -> int:
    settings = load_settings()
    daemon = Daemon(settings)
    run = asyncio.create_task(daemon.run(install_signals=False))
    port_deadline = time.monotonic() + 60
    while time.monotonic() < port_deadline:
        if (
            daemon.health.port
            and (await asyncio.to_thread(_http, f"http://127.0.0.1:{daemon.health.port}/readyz"))[0] == 200
        ):
            break
        await asyncio.sleep(0.2)
    print(f"daemon ready; probes and metrics on http://127.0.0.1:{daemon.health.port}\n")

    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap_servers, enable_idempotence=False)
    await producer.start()
    try:
        for i in range(_VALID):
            request = {
                "schema_version": 1,
                "request_id": f"demo-req-{i}",
                "document_id": f"demo-doc-{i}",
                "source": {"data_base64": base64.b64encode(b"%PDF-1.4 sample").decode(), "filename": f"doc{i}.pdf"},
                "metadata": {"customer": "demo"},
            }
            await producer.send_and_wait(
                settings.topics.ocr_requests, json.dumps(request).encode(), key=f"demo-doc-{i}".encode()
            )
        for label, value in _MALFORMED:
            await producer.send_and_wait(settings.topics.ocr_requests, value, key=label.encode())
    finally:
        await producer.stop()
    print(
        f"published {_VALID} valid requests and {len(_MALFORMED)} malformed messages "
        f"to {settings.topics.ocr_requests}\n"
    )

    results = await _collect(stack.bootstrap_servers, settings.topics.ocr_results, _VALID, 60)
    letters = await _collect(stack.bootstrap_servers, settings.topics.dlq, len(_MALFORMED), 60)
    print(f"{settings.topics.ocr_results}:")
    for rec in results:
        value = json.loads(rec.value)
        print(
            f"  {value['request_id']:<12} status={value['status']} engine={value['engine']} "
            f"metadata={value['metadata']}"
        )
    print(f"\n{settings.topics.dlq}:")
    for rec in letters:
        value = json.loads(rec.value)
        print(f"  offset {value['offset']:<3} {value['error']['code']:<28} {value['error']['message'][:70]}")

    base = f"http://127.0.0.1:{daemon.health.port}"
    print("\nhealth:")
    for path in ("/healthz", "/readyz"):
        status, body = await asyncio.to_thread(_http, base + path)
        print(f"  GET {path:<9} {status} {body.strip()}")
    _, metrics = await asyncio.to_thread(_http, base + "/metrics")
    print("\nmetrics (excerpt):")
    for line in metrics.splitlines():
        if line.startswith(
            ("ocrbooth_handled_messages_total", "ocrbooth_dead_letters_total", "ocrbooth_commits_total")
        ):
            print("  " + line)

    daemon.lifecycle.request_stop("demo finished")
    code = await run
    ok = len(results) == _VALID and len(letters) == len(_MALFORMED) and code == 0
    print(
        f"\ndemo {'OK' if ok else 'FAILED'}: {len(results)}/{_VALID} results, "
        f"{len(letters)}/{len(_MALFORMED)} dead letters, daemon exit {code}"
    )
    return 0 if ok else 1


def run_demo(*, keep: bool = False) -> int:
    """Start the embedded stack in a fresh directory, run the demo against it, tear everything down."""
    configure_logging("WARNING", "console")
    data_dir = Path(tempfile.mkdtemp(prefix="ocrbooth-demo-"))
    stack = EmbeddedStack(data_dir)
    print(f"starting SeaweedFS and Tansu in {data_dir} ...")
    try:
        stack.start()
        print(f"  Kafka {stack.bootstrap_servers}   S3 {stack.s3_endpoint_url}\n")
        os.environ.update(stack.env())
        os.environ.update(
            {
                "OCRBOOTH_HANDLERS": "echo",
                "OCRBOOTH_METRICS_PORT": "0",
                "OCRBOOTH_GROUP_ID": "ocrbooth-demo",
                # A short session makes the first group join quick on Tansu (it waits half a session).
                "OCRBOOTH_KAFKA_SESSION_TIMEOUT_MS": "6000",
                "OCRBOOTH_KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
            }
        )
        return asyncio.run(_demo(stack))
    finally:
        stack.stop()
        if not keep:
            shutil.rmtree(data_dir, ignore_errors=True)
