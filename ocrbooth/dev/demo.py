"""`ocrbooth demo`: the embedded stack, a daemon with the `auto` OCR engine, sample documents through it.

Prints each document's text excerpt, confidence, tables and review flags, the broken file's error code,
the dead letters of two malformed messages, and the daemon's probes and metrics.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from ocrbooth.client.submit import excerpt, submit
from ocrbooth.config import load_settings
from ocrbooth.daemon.app import Daemon
from ocrbooth.dev.embedded import EmbeddedStack
from ocrbooth.logs import configure_logging
from ocrbooth.testing.samples import demo_documents

_MALFORMED: list[tuple[str, bytes]] = [
    ("not JSON", b"{this is not json"),
    ("unknown schema_version", json.dumps({"schema_version": 99, "request_id": "r", "document_id": "d"}).encode()),
]


def _http(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310  (our own 127.0.0.1 server)
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


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


async def _demo(stack: EmbeddedStack, out_dir: Path) -> int:
    settings = load_settings()
    daemon = Daemon(settings)
    run = asyncio.create_task(daemon.run(install_signals=False))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not run.done():
        if (
            daemon.health.port
            and (await asyncio.to_thread(_http, f"http://127.0.0.1:{daemon.health.port}/readyz"))[0] == 200
        ):
            break
        await asyncio.sleep(0.2)
    if run.done():
        print("the daemon failed to start; see the log above")
        return 1
    engine = next((getattr(h, "default_engine", "?") for h in daemon.handlers if h.name == "ocr"), "?")
    print(f"daemon ready (OCR engine: {engine}); probes and metrics on http://127.0.0.1:{daemon.health.port}\n")

    docs = demo_documents()
    print(f"submitting {len(docs)} sample documents with `ocrbooth submit` ...")
    subs = await submit(settings, docs, out_dir=out_dir, timeout_s=300, progress=sys.stdout)
    print()
    for sub in subs:
        r = sub.result
        if r is None:
            print(f"{sub.name:<22} NO RESULT")
            continue
        if r.status == "failed":
            assert r.error is not None
            print(f"{sub.name:<22} FAILED  {r.error.code}: {r.error.message}")
            continue
        conf = f"{r.confidence:.2f}" if r.confidence is not None else "n/a"
        tables = sum(len(p.tables) for p in r.pages)
        review = f"  needs review: {', '.join(r.review_reasons)}" if r.needs_review else ""
        print(f"{sub.name:<22} {len(r.pages)} page(s)  confidence {conf}  tables {tables}{review}")
        print(f"{'':<22} {excerpt(r)}")
    print(f"\nmarkdown and JSON written to {out_dir}")

    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap_servers, enable_idempotence=False)
    await producer.start()
    try:
        for label, value in _MALFORMED:
            await producer.send_and_wait(settings.topics.ocr_requests, value, key=label.encode())
    finally:
        await producer.stop()
    letters = await _collect(stack.bootstrap_servers, settings.topics.dlq, len(_MALFORMED), 60)
    print(f"\n{settings.topics.dlq} (two malformed messages published to {settings.topics.ocr_requests}):")
    for rec in letters:
        value = json.loads(rec.value)
        print(f"  {value['error']['code']:<28} {value['error']['message'][:80]}")

    finetune_ok = await _finetune(settings, stack)

    base = f"http://127.0.0.1:{daemon.health.port}"
    print("\nhealth:")
    for path in ("/healthz", "/readyz"):
        status, body = await asyncio.to_thread(_http, base + path)
        print(f"  GET {path:<9} {status} {body.strip()}")
    _, metrics = await asyncio.to_thread(_http, base + "/metrics")
    print("\nmetrics (excerpt):")
    shown = (
        "ocrbooth_ocr_documents_total",
        "ocrbooth_ocr_pages_total",
        "ocrbooth_dead_letters_total",
        "ocrbooth_finetune_jobs_total",
    )
    for line in metrics.splitlines():
        if line.startswith(shown):
            print("  " + line)

    daemon.lifecycle.request_stop("demo finished")
    code = await run
    answered = sum(1 for s in subs if s.result is not None)
    succeeded = sum(1 for s in subs if s.result is not None and s.result.status == "succeeded")
    ok = (
        answered == len(docs)
        and succeeded == len(docs) - 1
        and len(letters) == len(_MALFORMED)
        and finetune_ok
        and code == 0
    )
    print(
        f"\ndemo {'OK' if ok else 'FAILED'}: {succeeded} recognised, {answered - succeeded} failed as expected, "
        f"{len(letters)} dead letters, fine-tune job {'completed' if finetune_ok else 'FAILED'}, daemon exit {code}"
    )
    return 0 if ok else 1


async def _finetune(settings: Any, stack: EmbeddedStack) -> bool:
    """One DreamBooth job on a tiny Stable Diffusion built from configs (random weights, 64 px), so the whole
    path (class images, training, checkpoints, samples, export) runs on a CPU in about a minute."""
    from ocrbooth.client.submit import submit_finetune
    from ocrbooth.testing.tiny_sd import build_tiny_sd, make_instance_images

    base = await asyncio.to_thread(build_tiny_sd, Path(tempfile.mkdtemp(prefix="ocrbooth-demo-sd-")) / "tiny-sd")
    print(f"\nfine-tune job on a tiny Stable Diffusion ({base}), 3 subject photos, prior preservation:")
    events = await submit_finetune(
        settings,
        [(f"subject-{i}.png", data) for i, data in enumerate(make_instance_images(3))],
        instance_prompt="a photo of sks dog",
        class_prompt="a photo of dog",
        base_model=str(base),
        overrides={
            "resolution": 64,
            "max_train_steps": 12,
            "checkpointing_steps": 4,
            "num_class_images": 4,
            "mixed_precision": "no",
            "num_inference_steps": 4,
            "num_validation_images": 1,
            "learning_rate": 1e-4,
        },
        timeout_s=600,
        progress=sys.stdout,
    )
    return bool(events) and events[-1].event == "completed"


def run_demo(*, keep: bool = False) -> int:
    """Start the embedded stack in a fresh directory, run the demo against it, tear everything down."""
    configure_logging("WARNING", "console")
    data_dir = Path(tempfile.mkdtemp(prefix="ocrbooth-demo-"))
    stack = EmbeddedStack(data_dir / "stack")
    print(f"starting SeaweedFS and Tansu in {data_dir} ...")
    try:
        stack.start()
        print(f"  Kafka {stack.bootstrap_servers}   S3 {stack.s3_endpoint_url}\n")
        os.environ.update(stack.env())
        os.environ.update(
            {
                "OCRBOOTH_HANDLERS": "ocr,finetune",
                "OCRBOOTH_FINETUNE_PROGRESS_EVERY_STEPS": "4",
                "OCRBOOTH_LOG_LEVEL": "WARNING",  # the trainer subprocess logs through the same settings
                "OCRBOOTH_FINETUNE_WORKDIR": str(data_dir / "jobs"),
                # The demo's tiny Stable Diffusion is a local directory, refused by default.
                "OCRBOOTH_FINETUNE_ALLOW_LOCAL_BASE_MODELS": "true",
                "HF_HUB_OFFLINE": "1",
                "OCRBOOTH_OCR_ENGINE": os.environ.get("OCRBOOTH_OCR_ENGINE", "auto"),
                # Strict enough that the demo shows a review flag on the lower-confidence pages.
                "OCRBOOTH_OCR_REVIEW_THRESHOLD": "0.95",
                "OCRBOOTH_METRICS_PORT": "0",
                "OCRBOOTH_GROUP_ID": "ocrbooth-demo",
                # A short session makes the first group join quick on Tansu (it waits half a session).
                "OCRBOOTH_KAFKA_SESSION_TIMEOUT_MS": "6000",
                "OCRBOOTH_KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
            }
        )
        return asyncio.run(_demo(stack, Path(".ocrbooth/demo-results").resolve()))
    finally:
        stack.stop()
        if not keep:
            shutil.rmtree(data_dir, ignore_errors=True)
