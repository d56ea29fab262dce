"""Client side: `ocrbooth submit` (documents) and `ocrbooth finetune` (a DreamBooth job), over Kafka and S3."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaError

from ocrbooth import constants
from ocrbooth.config import KafkaSettings, S3Settings, Settings
from ocrbooth.errors import RetryableError
from ocrbooth.schemas import DocumentRequest, FinetuneEvent, FinetuneRequest, OcrOptions, OcrResult, UriSource
from ocrbooth.storage import S3Storage, s3_client

# How long the up-front reachability checks may take per attempt: a person at a terminal should hear about a
# wrong address in seconds, not after boto's retries and aiokafka's 40 s request timeout.
PROBE_TIMEOUT_S = 1.5
_PROBE_ATTEMPTS = 2
_PROBE_PAUSE_S = 0.3


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


def _s3_problem(s3: S3Settings, timeout_s: float) -> str | None:
    """Why the bucket cannot be used, or None. Access denied is left to the real calls: an uploader may be
    allowed to write objects without being allowed to look at the bucket."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    endpoint = s3.endpoint_url or "AWS S3"
    quick = s3.model_copy(
        update={
            "connect_timeout_s": min(s3.connect_timeout_s, timeout_s),
            "read_timeout_s": min(s3.read_timeout_s, timeout_s),
        }
    )
    # One boto request per round (botocore's max_attempts counts retries): its standard mode backs off for up
    # to seconds between attempts.
    client = s3_client(quick, max_attempts=0)
    problem: str | None = None
    try:
        for attempt in range(_PROBE_ATTEMPTS):
            if attempt:
                time.sleep(_PROBE_PAUSE_S)
            try:
                client.head_bucket(Bucket=s3.bucket)
                return None
            except NoCredentialsError:
                return (
                    f"no AWS credentials for S3 at {endpoint}; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
                    " (`ocrbooth dev` prints them) or AWS_PROFILE"
                )
            except (ConnectTimeoutError, ReadTimeoutError):
                problem = (
                    f"S3 at {endpoint} did not answer within {timeout_s:g}s; start `ocrbooth dev` or set"
                    " OCRBOOTH_S3_ENDPOINT_URL to a reachable endpoint"
                )
            except EndpointConnectionError:
                problem = f"cannot connect to S3 at {endpoint}; start `ocrbooth dev` or set OCRBOOTH_S3_ENDPOINT_URL"
            except ClientError as exc:
                status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
                if status == 404:
                    return f"bucket {s3.bucket!r} does not exist at {endpoint}; create it or set OCRBOOTH_S3_BUCKET"
                return None  # it answered; access rules are for the real calls to report
            except BotoCoreError as exc:
                return f"S3 at {endpoint}: {exc}; check OCRBOOTH_S3_ENDPOINT_URL and the AWS_* variables"
    finally:
        client.close()
    return problem


@contextlib.contextmanager
def _aiokafka_quiet() -> Iterator[None]:
    # aiokafka logs each failed connection at ERROR; the probe reports the outcome itself, in one line.
    logger = logging.getLogger("aiokafka")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


async def _kafka_problem(kafka: KafkaSettings, timeout_s: float) -> str | None:
    """Why the brokers cannot be used, or None."""
    servers = kafka.bootstrap_servers
    last: Exception | None = None
    for attempt in range(_PROBE_ATTEMPTS):
        if attempt:
            await asyncio.sleep(_PROBE_PAUSE_S)
        client = AIOKafkaClient(**{**kafka.client_options(), "request_timeout_ms": int(timeout_s * 1000)})
        try:
            with _aiokafka_quiet():
                await client.bootstrap()
            return None
        except (KafkaError, OSError, TimeoutError) as exc:
            last = exc
        finally:
            await client.close()
    detail = f" ({last})" if last is not None and "bootstrap" not in str(last) else ""
    return (
        f"no Kafka broker answered at {servers} within {timeout_s:g}s{detail}; start `ocrbooth dev` or set"
        " OCRBOOTH_KAFKA_BOOTSTRAP_SERVERS to a reachable broker"
    )


async def check_services(settings: Settings, *, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Fail within a few seconds when S3 or Kafka cannot be used, naming each endpoint and what to do, before
    anything is uploaded or published. Raises RetryableError."""
    problems = await asyncio.gather(
        asyncio.to_thread(_s3_problem, settings.s3, timeout_s), _kafka_problem(settings.kafka, timeout_s)
    )
    found = [p for p in problems if p]
    if found:
        raise RetryableError("; ".join(found), code="service_unavailable")


def check_s3(settings: Settings, *, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """The S3 half of `check_services`, for commands that need no broker."""
    problem = _s3_problem(settings.s3, timeout_s)
    if problem:
        raise RetryableError(problem, code="storage_unavailable")


@contextlib.asynccontextmanager
async def _kafka_errors(kafka: KafkaSettings) -> AsyncIterator[None]:
    """aiokafka's errors (the broker went away after the check) as one RetryableError naming the broker."""
    try:
        yield
    except KafkaError as exc:
        raise RetryableError(
            f"Kafka at {kafka.bootstrap_servers} failed: {exc}; check that the broker is up",
            code="broker_unavailable",
        ) from exc


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
    """Upload `files` (name, bytes), publish one request each, and wait for every result (or the timeout).
    Raises RetryableError at once, before any upload, when S3 or Kafka cannot be reached."""
    await check_services(settings)
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

    kafka = settings.kafka.client_options()
    consumer = AIOKafkaConsumer(**kafka, group_id=None, enable_auto_commit=False, auto_offset_reset="latest")
    producer = AIOKafkaProducer(**kafka, acks="all", enable_idempotence=settings.kafka.enable_idempotence)
    async with _kafka_errors(settings.kafka):
        try:
            await consumer.start()
            await producer.start()
            await _collect_results(consumer, producer, settings, storage, subs, progress, timeout_s)
        finally:
            await producer.stop()
            await consumer.stop()
    if out_dir is not None:
        write_results(subs, out_dir)
    return subs


async def _collect_results(
    consumer: AIOKafkaConsumer,
    producer: AIOKafkaProducer,
    settings: Settings,
    storage: S3Storage,
    subs: list[Submission],
    progress: TextIO | None,
    timeout_s: float,
) -> None:
    """Publish every request once the answers are being followed; gather answers until all came or time ran out."""
    by_id = {s.request.request_id: s for s in subs}
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


def finetune_request(
    settings: Settings,
    *,
    job_id: str,
    instance_prompt: str,
    class_prompt: str,
    base_model: str,
    overrides: dict[str, Any] | None = None,
) -> FinetuneRequest:
    """The request `submit_finetune` publishes, built without any I/O, so a bad field fails before anything is
    uploaded (pydantic's ValidationError names each one)."""
    return FinetuneRequest(
        job_id=job_id,
        base_model=base_model,
        instance_images=[f"s3://{settings.s3.bucket}/{_upload_prefix(job_id)}"],
        instance_prompt=instance_prompt,
        class_prompt=class_prompt,
        **(overrides or {}),
    )


def _upload_prefix(job_id: str) -> str:
    return f"{constants.S3_PREFIX_UPLOADS}{job_id}/"


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
    """Upload subject photos, publish a FinetuneRequest, and follow its events until the job ends. Raises
    ValidationError for a bad field and RetryableError when S3 or Kafka cannot be reached, both before any
    upload."""
    job = job_id or f"job-{uuid.uuid4().hex[:12]}"
    request = finetune_request(
        settings,
        job_id=job,
        instance_prompt=instance_prompt,
        class_prompt=class_prompt,
        base_model=base_model,
        overrides=overrides,
    )
    await check_services(settings)
    storage = S3Storage(settings.s3)
    prefix = _upload_prefix(job)
    for index, (name, data) in enumerate(images):
        await storage.put(f"{prefix}{index:03d}-{Path(name).name}", data)
    kafka = settings.kafka.client_options()
    consumer = AIOKafkaConsumer(**kafka, group_id=None, enable_auto_commit=False, auto_offset_reset="latest")
    producer = AIOKafkaProducer(**kafka, acks="all", enable_idempotence=settings.kafka.enable_idempotence)
    async with _kafka_errors(settings.kafka):
        try:
            await consumer.start()
            await producer.start()
            return await _follow_job(consumer, producer, settings, request, progress, timeout_s)
        finally:
            await producer.stop()
            await consumer.stop()


async def _follow_job(
    consumer: AIOKafkaConsumer,
    producer: AIOKafkaProducer,
    settings: Settings,
    request: FinetuneRequest,
    progress: TextIO | None,
    timeout_s: float,
) -> list[FinetuneEvent]:
    """Publish the request once its events are being followed; gather events until a terminal one or the
    timeout."""
    job = request.job_id
    events: list[FinetuneEvent] = []
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
