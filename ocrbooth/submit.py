"""Client side: `ocrbooth submit` (documents) and `ocrbooth finetune` (a DreamBooth job), over Kafka and S3."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from ocrbooth import constants
from ocrbooth.daemon.config import Settings
from ocrbooth.daemon.storage import S3Storage
from ocrbooth.schemas import DocumentRequest, FinetuneEvent, FinetuneRequest, OcrOptions, OcrResult, UriSource


@dataclass
class Submission:
    """One document on its way through the daemon."""

    name: str
    request: DocumentRequest
    result: OcrResult | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class _Progress:
    """A one-line progress bar on a terminal, plain lines elsewhere."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total, self.done, self.stream = total, 0, stream
        self.tty = stream.isatty()

    def update(self, name: str, status: str) -> None:
        self.done += 1
        if self.tty:
            width = 30
            filled = int(width * self.done / self.total)
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {name[:40]:<40}")
            if self.done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(f"[{self.done}/{self.total}] {name}: {status}\n")
        self.stream.flush()


async def _follow_from_end(consumer: AIOKafkaConsumer, topic: str, timeout_s: float = 30.0) -> None:
    """Assign every partition of `topic` at its end, *before* the request is published, so no answer can
    slip past. (On brokers whose ListOffsets answers low, this only re-reads older answers, which the
    request-id filters skip.)"""
    partitions = consumer.partitions_for_topic(topic) or set()
    deadline = time.monotonic() + timeout_s
    while not partitions and time.monotonic() < deadline:
        await consumer.topics()
        partitions = consumer.partitions_for_topic(topic) or set()
        if not partitions:
            await asyncio.sleep(0.2)
    tps = [TopicPartition(topic, p) for p in sorted(partitions)]
    consumer.assign(tps)
    await consumer.seek_to_end(*tps)
    for tp in tps:
        await consumer.position(tp)


async def submit(
    settings: Settings,
    files: list[tuple[str, bytes]],
    *,
    out_dir: Path | None = None,
    timeout_s: float = 600.0,
    options: OcrOptions | None = None,
    progress: TextIO | None = sys.stderr,
) -> list[Submission]:
    """Upload `files` (name, bytes), publish one request each, and wait for every result (or the timeout)."""
    storage = S3Storage(settings.s3)
    batch = uuid.uuid4().hex[:12]
    subs: list[Submission] = []
    for index, (name, data) in enumerate(files):
        safe = Path(name).name or f"document-{index}"
        uri = await storage.put(f"{constants.S3_PREFIX_UPLOADS}{batch}/{index:04d}-{safe}", data)
        request = DocumentRequest(
            request_id=f"{batch}-{index:04d}",
            document_id=f"{Path(safe).stem}-{batch}-{index:04d}",
            source=UriSource(uri=uri),
            options=options or OcrOptions(),
            metadata={"filename": safe, "submitted_by": "ocrbooth submit"},
        )
        subs.append(Submission(safe, request))
    by_id = {s.request.request_id: s for s in subs}

    kafka = settings.kafka.client_options()
    consumer = AIOKafkaConsumer(**kafka, group_id=None, enable_auto_commit=False, auto_offset_reset="latest")
    producer = AIOKafkaProducer(**kafka, acks="all", enable_idempotence=settings.kafka.enable_idempotence)
    await consumer.start()
    await producer.start()
    try:
        await _follow_from_end(consumer, settings.topics.ocr_results)
        for sub in subs:
            await producer.send_and_wait(
                settings.topics.ocr_requests,
                sub.request.model_dump_json().encode(),
                key=sub.request.document_id.encode(),
            )
        bar = _Progress(len(subs), progress) if progress is not None else None
        pending = set(by_id)
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            batch_records = await consumer.getmany(timeout_ms=500)
            for records in batch_records.values():
                for record in records:
                    try:
                        result = OcrResult.model_validate_json(record.value)
                    except ValueError:
                        continue
                    if result.request_id not in pending:
                        continue
                    answered = by_id[result.request_id]
                    pending.discard(result.request_id)
                    if result.result_uri:
                        full = OcrResult.model_validate_json(await storage.get(result.result_uri))
                        result = full.model_copy(update={"result_uri": result.result_uri})
                    answered.result = result
                    if bar is not None:
                        code = result.error.code if result.error else ""
                        bar.update(answered.name, f"{result.status} {code}".strip())
    finally:
        await producer.stop()
        await consumer.stop()
    if out_dir is not None:
        write_results(subs, out_dir)
    return subs


def write_results(subs: list[Submission], out_dir: Path) -> None:
    """`NAME.md` (the pages' text) and `NAME.json` (the whole result) for each answered document."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for sub in subs:
        if sub.result is None:
            continue
        stem = Path(sub.name).stem
        (out_dir / f"{stem}.json").write_text(sub.result.model_dump_json(indent=2) + "\n")
        if sub.result.status == "succeeded":
            text = "\n\n".join(f"<!-- page {p.page_number} -->\n{p.text}" for p in sub.result.pages)
            (out_dir / f"{stem}.md").write_text(text + "\n")


def summarize(subs: list[Submission], stream: TextIO = sys.stdout) -> int:
    """Print one line per document; return the exit code (0 all succeeded, 1 some failed, 3 some missing)."""
    code = 0
    for sub in subs:
        r = sub.result
        if r is None:
            stream.write(f"{sub.name}: no result before the timeout\n")
            code = 3
        elif r.status == "failed":
            assert r.error is not None
            stream.write(f"{sub.name}: FAILED {r.error.code}: {r.error.message}\n")
            code = max(code, 1)
        else:
            conf = f"{r.confidence:.3f}" if r.confidence is not None else "n/a"
            review = f" REVIEW ({', '.join(r.review_reasons)})" if r.needs_review else ""
            stream.write(f"{sub.name}: {len(r.pages)} page(s), confidence {conf}, engine {r.engine}{review}\n")
    return code


def excerpt(result: OcrResult, chars: int = 160) -> str:
    """The first characters of the text, on one line."""
    text = " ".join(" ".join(p.text.split()) for p in result.pages)
    return json.dumps(text[:chars] + ("…" if len(text) > chars else ""), ensure_ascii=False)


async def submit_finetune(
    settings: Settings,
    images: list[tuple[str, bytes]],
    *,
    instance_prompt: str,
    class_prompt: str,
    base_model: str,
    overrides: dict[str, Any] | None = None,
    job_id: str | None = None,
    timeout_s: float = 24 * 3600,
    progress: TextIO | None = sys.stderr,
) -> list[FinetuneEvent]:
    """Upload subject photos, publish a FinetuneRequest, and follow its events until the job ends."""
    storage = S3Storage(settings.s3)
    job = job_id or f"job-{uuid.uuid4().hex[:12]}"
    prefix = f"{constants.S3_PREFIX_UPLOADS}{job}/"
    for index, (name, data) in enumerate(images):
        await storage.put(f"{prefix}{index:03d}-{Path(name).name}", data)
    request = FinetuneRequest(
        job_id=job,
        base_model=base_model,
        instance_images=[storage.uri(prefix)],
        instance_prompt=instance_prompt,
        class_prompt=class_prompt,
        **(overrides or {}),
    )
    kafka = settings.kafka.client_options()
    consumer = AIOKafkaConsumer(**kafka, group_id=None, enable_auto_commit=False, auto_offset_reset="latest")
    producer = AIOKafkaProducer(**kafka, acks="all", enable_idempotence=settings.kafka.enable_idempotence)
    events: list[FinetuneEvent] = []
    await consumer.start()
    await producer.start()
    try:
        await _follow_from_end(consumer, settings.topics.finetune_events)
        await producer.send_and_wait(
            settings.topics.finetune_requests, request.model_dump_json().encode(), key=job.encode()
        )
        if progress is not None:
            progress.write(f"submitted {job}\n")
        deadline = time.monotonic() + timeout_s
        terminal = {"completed", "failed", "cancelled"}
        while time.monotonic() < deadline:
            done = False
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    if record.key != job.encode():
                        continue
                    try:
                        event = FinetuneEvent.model_validate_json(record.value)
                    except ValueError:
                        continue
                    events.append(event)
                    if progress is not None:
                        progress.write(_describe(event) + "\n")
                        progress.flush()
                    done = done or event.event in terminal
            if done:
                break
    finally:
        await producer.stop()
        await consumer.stop()
    return events


def _describe(event: FinetuneEvent) -> str:
    if event.event == "progress" and event.step is not None and event.max_steps:
        width = 30
        filled = int(width * event.step / event.max_steps)
        loss = f" loss {event.loss:.4f}" if event.loss is not None else ""
        return f"  [{'#' * filled}{'.' * (width - filled)}] step {event.step}/{event.max_steps}{loss}"
    if event.event == "failed" and event.error is not None:
        return f"  failed: {event.error.code}: {event.error.message}"
    detail = {
        "class_images": f"{event.generated}/{event.total} class images{' (cached)' if event.cache_hit else ''}",
        "started": f"attempt {event.attempt}"
        + (f", resumed from step {event.resumed_from_step}" if event.resumed_from_step else ""),
        "checkpoint": f"step {event.step} -> {event.uri}",
        "samples": ", ".join(event.uris or []),
        "completed": ", ".join(f"{k}={v}" for k, v in (event.artifacts or {}).items()),
    }.get(event.event, "")
    return f"  {event.event}" + (f": {detail}" if detail else "")
