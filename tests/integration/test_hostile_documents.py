"""Hostile and edge-case documents through a real daemon process: each gets its code within a bounded time
and memory; render workers that die are replaced, and they die with the daemon.

The daemon runs as `ocrbooth run` (a subprocess), so its memory and its workers' can be read from /proc: per
input, the peak RSS (VmHWM, reset through clear_refs before the input) of the daemon and of every render
worker, sampled every 20 ms (a worker killed at its deadline keeps its last sample).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from ocrbooth.dev.embedded import EmbeddedStack
from ocrbooth.testing import samples
from tests.support import hostile
from tests.support.daemon import DaemonProcess, metric_value
from tests.support.documents import numbered_pages_pdf
from tests.support.kafka import partitions_of, wait_until
from tests.support.stack import TopicNames

MIB = 1024**2
RENDER_TIMEOUT_S = 3.0
WORKER_CAP_BYTES = 1024 * MIB
PAGE_MEMORY_BYTES = 16 * MIB
MAX_INLINE_BYTES = 2 * MIB
MAX_SOURCE_BYTES = 3 * MIB
MAX_PAGES = 500
MAX_IMAGE_PIXELS = 1_000_000  # the smallest the settings allow: edges stay cheap to build
RENDER_LONGEST_PX = 640  # 640 x 453 px pages: under the pixel limit, ~0.85 MB each
ANSWER_BOUND_S = RENDER_TIMEOUT_S + 12  # the deadline, a worker restart and Kafka, on a loaded 2-core machine
LONG_ANSWER_BOUND_S = 120.0  # the 500-page document
# Daemon memory beyond its resting RSS that is not page pixels: the request (up to 2 MiB inline, as base64 and
# decoded), Kafka fetch buffers, one transient copy per render worker of a page being received, results.
DAEMON_OVERHEAD_BYTES = 160 * MIB

SUITE_ENV = {
    "OCRBOOTH_HANDLERS": "tests.support.scripted_ocr:ScriptedOcrHandler",
    "OCRBOOTH_OCR_ENGINE": "tesseract",
    "OCRBOOTH_OCR_RENDER_WORKERS": "2",
    "OCRBOOTH_OCR_RENDER_TIMEOUT_S": str(RENDER_TIMEOUT_S),
    "OCRBOOTH_OCR_RENDER_WORKER_MAX_BYTES": str(WORKER_CAP_BYTES),
    "OCRBOOTH_OCR_MAX_PAGE_MEMORY_BYTES": str(PAGE_MEMORY_BYTES),
    "OCRBOOTH_OCR_RENDER_LONGEST_PX": str(RENDER_LONGEST_PX),
    "OCRBOOTH_OCR_MAX_IMAGE_PIXELS": str(MAX_IMAGE_PIXELS),
    "OCRBOOTH_OCR_MAX_PAGES": str(MAX_PAGES),
    "OCRBOOTH_OCR_MAX_INLINE_BYTES": str(MAX_INLINE_BYTES),
    "OCRBOOTH_OCR_MAX_SOURCE_BYTES": str(MAX_SOURCE_BYTES),
    "OCRBOOTH_TEST_ENGINE_DELAY_MS": "2",  # an engine slower than rendering, so pages would pile up
}


# ---- the daemon's processes, from /proc ---------------------------------------------------------------


def _status_kib(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "R"
    except FileNotFoundError:
        return False


def render_workers(daemon_pid: int) -> list[int]:
    """Pids of the daemon's render worker processes (its children running render_worker)."""
    children: list[int] = []
    with contextlib.suppress(FileNotFoundError):
        for task in os.listdir(f"/proc/{daemon_pid}/task"):
            with contextlib.suppress(FileNotFoundError), open(f"/proc/{daemon_pid}/task/{task}/children") as f:
                children.extend(int(p) for p in f.read().split())
    workers = []
    for pid in children:
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"ocrbooth.models.ocr.render_worker" in f.read():
                workers.append(pid)
    return sorted(workers)


class PeakSampler:
    """Peak RSS of the daemon and of its render workers since the last `reset`, sampled in a thread."""

    def __init__(self, daemon_pid: int) -> None:
        self.daemon_pid = daemon_pid
        self.daemon_peak = 0
        self.worker_peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-sampler", daemon=True)

    def reset(self) -> None:
        with self._lock:
            for pid in [self.daemon_pid, *render_workers(self.daemon_pid)]:
                with contextlib.suppress(OSError), open(f"/proc/{pid}/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS
            self.daemon_peak = self.worker_peak = 0
        self._sample()

    def _sample(self) -> None:
        daemon = _status_kib(self.daemon_pid, "VmHWM")
        workers = max((_status_kib(p, "VmHWM") for p in render_workers(self.daemon_pid)), default=0)
        with self._lock:
            self.daemon_peak = max(self.daemon_peak, daemon)
            self.worker_peak = max(self.worker_peak, workers)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._sample()

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)


# ---- talking to the daemon ----------------------------------------------------------------------------


class Exchange:
    """Send one request, wait for its result: a producer and a consumer of the results topic, kept open."""

    def __init__(self, bootstrap: str, topics: TopicNames) -> None:
        self.topics = topics
        self.producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, enable_idempotence=False, acks="all", max_request_size=16 * MIB
        )
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, auto_offset_reset="earliest"
        )
        self.results: dict[str, dict[str, object]] = {}

    async def __aenter__(self) -> Exchange:
        await self.producer.start()
        await self.consumer.start()
        tps = await partitions_of(self.consumer, self.topics.ocr_results)
        self.consumer.assign(tps)
        for tp in tps:
            self.consumer.seek(tp, 0)
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.producer.stop()
        await self.consumer.stop()

    async def send(self, request_id: str, source: dict[str, str], **extra: object) -> None:
        value = json.dumps({"request_id": request_id, "document_id": f"doc-{request_id}", "source": source, **extra})
        await self.producer.send_and_wait(self.topics.ocr_requests, value.encode(), key=request_id.encode())

    async def result(self, request_id: str, timeout_s: float) -> dict[str, object]:
        deadline = time.monotonic() + timeout_s
        while request_id not in self.results:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no result for {request_id} within {timeout_s}s"
            batch = await self.consumer.getmany(timeout_ms=int(min(remaining, 0.2) * 1000) + 1)
            for records in batch.values():
                for record in records:
                    value = json.loads(record.value)
                    self.results[value["request_id"]] = value
        return self.results[request_id]


def inline(data: bytes) -> dict[str, str]:
    return {"data_base64": base64.b64encode(data).decode()}


@contextlib.asynccontextmanager
async def daemon_process(env: dict[str, str], log_path: Path) -> AsyncIterator[DaemonProcess]:
    proc = DaemonProcess(env, log_path).start()
    try:
        await proc.wait_ready(120)
        yield proc
    finally:
        proc.kill()


# ---- the suite ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    document: bytes
    code: str | None  # None: must succeed
    via: str = "inline"  # inline, s3, or raw (document is the data_base64 text itself)
    extra: tuple[tuple[str, object], ...] = ()
    codes: tuple[str, ...] = ()  # other acceptable codes (the fan-out bombs: deadline or memory cap first)
    bound_s: float = ANSWER_BOUND_S


def cases() -> Iterator[Case]:
    jpeg = hostile.image_bytes("JPEG", 600, 400, quality=90)
    png = hostile.image_bytes("PNG", 600, 400)
    text = samples.text_pdf(["The quick brown fox jumps over the lazy dog."], fontsize=36)  # legible at 640 px
    tesseract = (("options", {"engine": "tesseract"}),)
    yield Case("good-text-pdf-tesseract", text, None, extra=tesseract)
    yield Case("good-jpeg", jpeg, None)
    yield Case("good-png", png, None)
    yield Case("good-webp", hostile.image_bytes("WEBP", 600, 400), None)
    yield Case("good-tiff-3-frames", hostile.tiff_frames(3), None)
    yield Case("javascript-and-launch-actions", hostile.javascript_pdf(), None)
    # page count
    yield Case("pages-at-limit-500", samples.many_pages_pdf(MAX_PAGES), None, via="s3", bound_s=LONG_ANSWER_BOUND_S)
    yield Case("pages-over-limit-501", samples.many_pages_pdf(MAX_PAGES + 1), "too_many_pages", via="s3")
    yield Case("selection-of-2-from-600", samples.many_pages_pdf(600), None, via="s3", extra=(("pages", [1, 600]),))
    yield Case("page-out-of-range", numbered_pages_pdf(3), "page_out_of_range", extra=(("pages", [2, 5]),))
    # pixels, from headers, for every way an image arrives
    yield Case("png-at-pixel-limit", hostile.image_bytes("PNG", 1000, 1000), None)
    yield Case("png-over-pixel-limit", hostile.image_bytes("PNG", 1001, 1000), "image_too_large")
    yield Case("jpeg-at-pixel-limit", hostile.image_bytes("JPEG", 1000, 1000), None)
    yield Case("jpeg-over-pixel-limit", hostile.image_bytes("JPEG", 1000, 1001), "image_too_large")
    yield Case("tiff-over-pixel-limit", hostile.tiff_frames(1, 1001, 1000), "image_too_large")
    yield Case("webp-over-pixel-limit", hostile.image_bytes("WEBP", 1001, 1000), "image_too_large")
    yield Case("pdf-image-at-pixel-limit", hostile.xobject_image_pdf(1000, 1000), None)
    yield Case("pdf-image-over-pixel-limit", hostile.xobject_image_pdf(1001, 1000), "image_too_large")
    yield Case("pdf-inline-image-at-pixel-limit", hostile.inline_image_pdf(1000, 1000), None)
    yield Case("pdf-inline-image-over-pixel-limit", hostile.inline_image_pdf(1001, 1000), "image_too_large")
    bomb = hostile.gray_png_bomb(30000)
    yield Case("png-30000x30000-0.9MB-inline", bomb, "image_too_large")
    yield Case("png-30000x30000-0.9MB-s3", bomb, "image_too_large", via="s3")
    yield Case("png-1bit-30000x30000", samples.huge_png(30000), "image_too_large")
    yield Case("jpeg-header-30000x30000", hostile.jpeg_bomb_header(), "image_too_large")
    yield Case("pdf-inline-image-30000x30000", hostile.inline_image_pdf(30000, 30000), "image_too_large")
    yield Case("pdf-image-30000x30000", samples.huge_image_pdf(30000), "image_too_large", via="s3")
    # bytes
    yield Case("inline-at-byte-limit", hostile.padded_png(MAX_INLINE_BYTES), None)
    yield Case("inline-over-byte-limit", hostile.padded_png(MAX_INLINE_BYTES + 1), "source_too_large")
    yield Case("s3-at-byte-limit", hostile.padded_png(MAX_SOURCE_BYTES), None, via="s3")
    yield Case("s3-over-byte-limit", hostile.padded_png(MAX_SOURCE_BYTES + 1), "source_too_large", via="s3")
    # broken files
    yield Case("empty-s3-object", b"", "unsupported_format", via="s3")
    yield Case("not-a-document", b"MZ\x90\x00" + os.urandom(2000), "unsupported_format")
    yield Case("invalid-base64", b"not base64!", "invalid_source", via="raw")
    yield Case("encrypted-pdf", samples.encrypted_pdf(), "encrypted_document")
    yield Case("truncated-pdf", samples.truncated_pdf(), "corrupt_document")
    yield Case("truncated-png-half", png[: len(png) // 2], "corrupt_document")
    yield Case("truncated-png-no-iend", png[:-12], None)  # every pixel is there; PNG readers accept it
    yield Case("truncated-jpeg-half", jpeg[: len(jpeg) // 2], "corrupt_document")
    yield Case("truncated-jpeg-90pct", jpeg[: len(jpeg) * 9 // 10], "corrupt_document")
    yield Case("truncated-jpeg-no-eoi", jpeg[:-2], "corrupt_document")
    yield Case("pdf-with-truncated-jpeg", hostile.pdf_with_image(jpeg[: len(jpeg) // 2]), "corrupt_document")
    yield Case("pdf-with-truncated-flate-image", hostile.truncated_flate_image_pdf(), "corrupt_document")
    # unbounded work: stopped by the render deadline or the worker's memory cap
    fanout = ("render_timeout", "render_out_of_memory")
    yield Case("xobject-fanout-depth-25", hostile.fanout_pdf(25), fanout[0], codes=fanout)
    yield Case(
        "xobject-fanout-page-2-of-3", hostile.fanout_pdf(25, pages_before=1, pages_after=1), fanout[0], codes=fanout
    )
    yield Case("content-stream-flate-bomb-1GB", hostile.content_bomb_pdf(1024 * MIB), fanout[0], via="s3", codes=fanout)
    yield Case("pattern-with-30000x30000-inline-image", hostile.pattern_inline_image_pdf(), "render_out_of_memory")
    # and the daemon still serves after all of the above
    yield Case("good-after-everything", text, None, extra=tesseract)


async def test_hostile_documents_get_their_codes_within_time_and_memory_bounds(
    stack: EmbeddedStack, topics: TopicNames, daemon_env: dict[str, str], s3_prefix: str, tmp_path: Path
) -> None:
    """Over 40 hostile and limit-edge documents, one after the other: each gets its code (or succeeds) within
    the render deadline plus a margin; no render worker exceeds its memory cap; the daemon stays within its
    page-memory budget plus a fixed overhead (the 500-page document included: hoarded, its pages alone would
    take 500 x 0.85 MB); and the last, ordinary document still succeeds."""
    suite = list(cases())
    assert len(suite) >= 40
    s3 = stack.s3_client()
    for case in suite:
        if case.via == "s3":
            s3.put_object(Bucket=stack.bucket, Key=f"{s3_prefix}{case.name}", Body=case.document)
    env = {**daemon_env, **SUITE_ENV}
    rows: list[str] = []
    async with daemon_process(env, tmp_path / "daemon.log") as daemon, Exchange(stack.bootstrap_servers, topics) as x:
        assert daemon.proc is not None
        pid = daemon.proc.pid
        with PeakSampler(pid) as sampler:
            await x.send("warm-up", inline(hostile.image_bytes("PNG", 300, 200)))
            assert (await x.result("warm-up", 60))["status"] == "succeeded"
            resting = _status_kib(pid, "VmRSS")
            daemon_bound = resting + PAGE_MEMORY_BYTES + DAEMON_OVERHEAD_BYTES
            failures = []
            for case in suite:
                sampler.reset()
                source = (
                    {"uri": f"s3://{stack.bucket}/{s3_prefix}{case.name}"}
                    if case.via == "s3"
                    else {"data_base64": case.document.decode()}
                    if case.via == "raw"
                    else inline(case.document)
                )
                started = time.monotonic()
                await x.send(case.name, source, **dict(case.extra))
                result = await x.result(case.name, case.bound_s + 30)
                seconds = time.monotonic() - started
                await asyncio.sleep(0.05)  # let the sampler see the end of the work
                error = result.get("error")
                code = error["code"] if isinstance(error, dict) else None
                row = (
                    f"{case.name:40} {code or 'succeeded':22} {seconds:6.2f} s  "
                    f"daemon {sampler.daemon_peak / MIB:6.0f} MiB  worker {sampler.worker_peak / MIB:6.0f} MiB"
                )
                rows.append(row)
                print(row)
                if not (code == case.code or code in case.codes):
                    failures.append(f"{case.name}: expected {case.code}, got {result.get('error') or 'success'}")
                if seconds > case.bound_s:
                    failures.append(f"{case.name}: answered in {seconds:.1f}s, over {case.bound_s}s")
                if sampler.worker_peak > WORKER_CAP_BYTES:
                    failures.append(f"{case.name}: a worker peaked at {sampler.worker_peak} B, over the cap")
                if sampler.daemon_peak > daemon_bound:
                    failures.append(f"{case.name}: the daemon peaked at {sampler.daemon_peak} B, over {daemon_bound}")
                if case.name == "pages-at-limit-500":
                    pages = result.get("pages")
                    assert isinstance(pages, list)
                    assert [p["page_number"] for p in pages] == list(range(1, MAX_PAGES + 1))
                    assert {p["text"] for p in pages} == {"452x640"}  # A4 at 640 px
            # Workers killed by the last bombs are being replaced: the pool must be back to full strength.
            await wait_until(
                lambda: metric_value(daemon.metrics(), "ocrbooth_ocr_render_workers") == 2,
                timeout_s=60,
                message="the render pool did not get back to 2 workers",
            )
            metrics = daemon.metrics()
    print("\n" + "\n".join(rows))
    print(f"daemon resting RSS {resting / MIB:.0f} MiB, bound {daemon_bound / MIB:.0f} MiB")
    assert not failures, "\n".join(failures) + "\n\n" + "\n".join(rows)
    good = x.results["good-after-everything"]
    assert good["engine"] == "tesseract"
    assert "brown fox" in json.dumps(good).lower()
    assert metric_value(metrics, "ocrbooth_ocr_render_failures_total", reason="timeout") >= 2
    assert metric_value(metrics, "ocrbooth_ocr_render_failures_total", reason="out_of_memory") >= 1
    assert metric_value(metrics, "ocrbooth_ocr_render_workers") == 2


async def test_a_render_worker_killed_mid_document_is_replaced_and_work_goes_on(
    stack: EmbeddedStack, topics: TopicNames, daemon_env: dict[str, str], tmp_path: Path
) -> None:
    """SIGKILL of a render worker while it renders a page: that page is retried on a fresh worker (or the
    document fails with a render code), the pool is back to full strength, and the next 10 documents succeed."""
    env = {
        **daemon_env,
        **SUITE_ENV,
        "OCRBOOTH_OCR_RENDER_LONGEST_PX": "1000",
        "OCRBOOTH_OCR_MAX_IMAGE_PIXELS": "2000000",
    }
    async with daemon_process(env, tmp_path / "daemon.log") as daemon, Exchange(stack.bootstrap_servers, topics) as x:
        assert daemon.proc is not None
        pid = daemon.proc.pid
        before = render_workers(pid)
        assert len(before) == 2
        await x.send("long", inline(numbered_pages_pdf(40)))
        busy = await wait_until(
            lambda: next((w for w in render_workers(pid) if _running(w)), None), 60, 0.002, "no worker got busy"
        )
        os.kill(busy, signal.SIGKILL)
        result = await x.result("long", 120)
        assert result["status"] == "succeeded" or result["error"]["code"] in ("render_crashed", "render_out_of_memory")  # type: ignore[index]
        for i in range(10):
            await x.send(f"next-{i}", inline(hostile.image_bytes("PNG", 300, 200)))
        for i in range(10):
            assert (await x.result(f"next-{i}", 60))["status"] == "succeeded"
        await wait_until(
            lambda: metric_value(daemon.metrics(), "ocrbooth_ocr_render_workers") == 2,
            30,
            message="pool not back to 2 started workers",
        )
        assert len(render_workers(pid)) == 2
        assert busy not in render_workers(pid)
        metrics = daemon.metrics()
    assert metric_value(metrics, "ocrbooth_ocr_render_failures_total", reason="crashed") >= 1


async def test_render_workers_die_with_a_killed_daemon(
    stack: EmbeddedStack, topics: TopicNames, daemon_env: dict[str, str], tmp_path: Path
) -> None:
    """SIGKILL of the daemon while one worker renders a fan-out bomb and the other idles: both workers are
    gone within seconds (no orphans)."""
    env = {**daemon_env, **SUITE_ENV, "OCRBOOTH_OCR_RENDER_TIMEOUT_S": "60"}
    async with daemon_process(env, tmp_path / "daemon.log") as daemon, Exchange(stack.bootstrap_servers, topics) as x:
        assert daemon.proc is not None
        pid = daemon.proc.pid
        workers = render_workers(pid)
        assert len(workers) == 2
        await x.send("bomb", inline(hostile.fanout_pdf(25)))
        await wait_until(lambda: any(_running(w) for w in workers), 60, 0.01, "no worker got busy")
        daemon.proc.kill()
        daemon.proc.wait(10)
        await wait_until(lambda: not any(_alive(w) for w in workers), 15, message=f"orphaned workers: {workers}")
