"""`ocr`: DocumentRequest in, OcrResult (+ ReviewFlag) out.

fetch (S3 or inline) → count pages (render pool) → render pages just ahead of the engine (render pool,
within the page-memory budget) → engine worker (pages of all in-flight documents decode together) → assemble
pages in order → review decision → outputs. Rendering of later pages overlaps with OCR of earlier ones. A
page's pixels are released as soon as it is recognised; the result keeps only its size, blank flag and the
engine's output.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import logging
import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

from ocrbooth.config import OcrSettings, Settings
from ocrbooth.errors import ConfigError, FatalError, OcrboothError, PoisonError
from ocrbooth.handlers.base import Handler, HandlerRuntime
from ocrbooth.messages import MessageContext, OutputEvent
from ocrbooth.models.ocr.engine import OcrEngine, PageInput, PageOutput, PageWorker, StepStats
from ocrbooth.models.ocr.page_memory import PageMemory
from ocrbooth.models.ocr.render import RenderLimits, inspect_file, page_bytes_bound, render_file_page
from ocrbooth.models.ocr.render_pool import FAILURE_REASONS, RenderPool
from ocrbooth.models.ocr.tables import extract_tables
from ocrbooth.models.ocr.tesseract import TesseractEngine, validate_languages
from ocrbooth.schemas import (
    DocumentRequest,
    ErrorInfo,
    OcrResult,
    PageResult,
    ReviewFlag,
    Span,
    Table,
    Timings,
    UriSource,
)
from ocrbooth.storage import parse_s3_uri

if TYPE_CHECKING:
    from ocrbooth.models.ocr.lightonocr import EngineConfig

log = logging.getLogger(__name__)


# ---- engines ---------------------------------------------------------------------------------------------


def _cuda_available() -> tuple[bool, str]:
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, f"CUDA device {torch.cuda.get_device_name(0)}"


def lightonocr_config(cfg: OcrSettings) -> EngineConfig:
    """The LightOnOCR engine's capacity and pacing from the operator's OCR settings (imports torch)."""
    from ocrbooth.models.ocr.lightonocr import EngineConfig

    return EngineConfig(
        max_slots=cfg.engine_max_slots,
        gpu_memory_fraction=cfg.gpu_memory_fraction,
        kv_cache_tokens=cfg.kv_cache_tokens,
        max_prefill_tokens=cfg.max_prefill_tokens,
        steps_per_sync=cfg.decode_steps_per_sync,
        max_new_tokens=cfg.max_new_tokens_cap,
        preprocess_threads=cfg.preprocess_threads,
        prefill_overlap=cfg.prefill_overlap,
        fused_norms=cfg.fused_norms,
        compile_layers=cfg.compile_layers,
        kv_cache_dtype=cfg.kv_cache_dtype,
    )


def load_engines(cfg: OcrSettings) -> tuple[str, dict[str, OcrEngine]]:
    """Load the engines this daemon can serve; return (default engine name, engines by name).

    `auto` picks lightonocr when CUDA is present and the model loads, else tesseract, and logs why. An
    explicitly chosen engine that cannot load is a startup error. Tesseract is added as a second engine
    whenever it is installed, so requests may ask for it by name.
    """
    engines: dict[str, OcrEngine] = {}
    tesseract_error: str | None = None
    try:
        tess = TesseractEngine(default_languages=tuple(cfg.default_languages), max_workers=cfg.tesseract_threads)
        tess.load()
        engines["tesseract"] = tess
    except ConfigError as exc:
        tesseract_error = str(exc)

    if cfg.engine in ("auto", "lightonocr"):
        cuda, why = _cuda_available()
        if cfg.engine == "lightonocr" or cuda:
            try:
                from ocrbooth.models.ocr.lightonocr import LightOnOcrEngine

                engine = LightOnOcrEngine(cfg.model, device=cfg.device, config=lightonocr_config(cfg))
                engine.load()
                engines["lightonocr"] = cast(OcrEngine, engine)  # its `model` is always a str
                log.info("OCR engine: lightonocr (%s; model %s)", why, cfg.model)
                return "lightonocr", engines
            except (ConfigError, ImportError, OSError) as exc:
                if cfg.engine == "lightonocr":
                    raise ConfigError(
                        f"ocr.engine=lightonocr but the model {cfg.model!r} cannot be loaded: {exc}"
                    ) from exc
                why = f"{why}, but the model {cfg.model!r} did not load: {exc}"
        if "tesseract" not in engines:
            raise ConfigError(f"no OCR engine available: lightonocr skipped ({why}); tesseract: {tesseract_error}")
        log.info("OCR engine: tesseract (lightonocr not used: %s)", why)
        return "tesseract", engines
    if "tesseract" not in engines:
        raise ConfigError(f"ocr.engine=tesseract but tesseract is unusable: {tesseract_error}")
    log.info("OCR engine: tesseract (chosen by ocr.engine)")
    return "tesseract", engines


@dataclass(frozen=True, slots=True)
class _Page:
    """What a recognised page leaves behind: its pixels are gone by then."""

    page_number: int
    width_px: int
    height_px: int
    blank: bool
    output: PageOutput


class OcrHandler(Handler[DocumentRequest]):
    """Recognises documents; every failure becomes a failed OcrResult with a specific error code."""

    name = "ocr"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.cfg = settings.ocr
        self.default_engine = ""
        self.workers: dict[str, PageWorker] = {}
        self.pool: RenderPool | None = None
        self.pages: PageMemory | None = None
        self._runtime: HandlerRuntime | None = None
        self._tmp = Path(tempfile.gettempdir())

    def input_topics(self) -> Mapping[str, type[DocumentRequest]]:
        return {self.settings.topics.ocr_requests: DocumentRequest}

    async def start(self, runtime: HandlerRuntime) -> None:
        self._runtime = runtime
        self.default_engine, engines = await asyncio.to_thread(self.create_engines)
        for name, engine in engines.items():
            on_step = functools.partial(self._on_batch, name)
            worker = engine.worker(span_threshold=self.cfg.span_threshold, on_step=on_step)
            worker.start()
            self.workers[name] = worker
            runtime.metrics.init_engine(name)  # "busy fraction" reads 0, not nothing, while idle
        metrics = runtime.metrics
        metrics.init_render(FAILURE_REASONS)
        self.pages = PageMemory(self.cfg.max_page_memory_bytes, on_change=metrics.ocr_page_memory.set)
        self.pool = RenderPool(
            "render",
            self.cfg.render_workers,
            task_timeout_s=self.cfg.render_timeout_s,
            max_worker_bytes=self.cfg.render_worker_max_bytes,
            preload=("ocrbooth.models.ocr.render",),
            on_failure=lambda reason: metrics.ocr_render_failures.labels(reason).inc(),
            on_workers=metrics.ocr_render_workers.set,
        )
        await self.pool.start()

    def create_engines(self) -> tuple[str, dict[str, OcrEngine]]:
        """(default engine name, engines by name) this handler serves; runs in a thread at start. A seam for
        handlers that serve other engines (tests use a scripted one)."""
        return load_engines(self.cfg)

    async def stop(self) -> None:
        for worker in self.workers.values():
            await asyncio.to_thread(worker.stop)
        if self.pool is not None:
            await self.pool.close()
            self.pool = None

    def ready(self) -> bool:
        """Engines loaded and render workers startable (a pool whose workers keep failing to start is not)."""
        return bool(self.workers) and self.pool is not None and self.pool.ready

    def busy(self) -> bool:
        """The page-memory budget is spent: pause intake until recognised pages give some back."""
        return self.pages is not None and self.pages.exhausted

    def _on_batch(self, engine: str, stats: StepStats) -> None:
        if self._runtime is not None:
            self._runtime.metrics.observe_ocr_batch(engine, stats)

    # ---- handling ---------------------------------------------------------------------------------

    async def handle(self, event: DocumentRequest, ctx: MessageContext) -> Sequence[OutputEvent]:
        started = time.monotonic()
        # The record timestamp is the producer's wall clock; queued time is measured against ours.
        arrived = ctx.timestamp_ms / 1000 if ctx.timestamp_ms else None
        started_wall = time.time()
        engine_name, languages, max_new_tokens, review_threshold = self._options(event)
        data = await self._fetch(event)
        path = self._tmp / f"ocrbooth-{os.getpid()}-{ctx.topic}-{ctx.partition}-{ctx.offset}.doc"
        await asyncio.to_thread(path.write_bytes, data)
        del data  # workers read the file; the daemon need not hold a document for as long as it renders
        try:
            pages, render_s, infer_s = await self._recognise(path, event, engine_name, languages, max_new_tokens)
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        total_ms = (time.monotonic() - started) * 1000
        timings = Timings(
            queued=max(0.0, (started_wall - arrived) * 1000) if arrived else 0.0,
            render=render_s * 1000,
            inference=infer_s * 1000,
            total=total_ms,
        )
        result, flag = self._assemble(event, engine_name, pages, review_threshold, timings)
        self._record(result)
        topics = self.settings.topics
        outputs = [OutputEvent(topics.ocr_results, event.document_id, result)]
        if flag is not None:
            outputs.append(OutputEvent(topics.ocr_review, event.document_id, flag))
        return outputs

    def failure_outputs(self, event: DocumentRequest, ctx: MessageContext, error: ErrorInfo) -> Sequence[OutputEvent]:
        requested = event.options.engine if event.options and event.options.engine != "auto" else None
        result = OcrResult.failure(event, error, requested or self.default_engine or None)
        if self._runtime is not None:
            self._runtime.metrics.ocr_documents.labels(result.engine or "", "failed").inc()
        return [OutputEvent(self.settings.topics.ocr_results, event.document_id, result)]

    def _record(self, result: OcrResult) -> None:
        if self._runtime is None:
            return
        m = self._runtime.metrics
        m.ocr_documents.labels(result.engine or "", result.status).inc()
        if result.needs_review:
            m.ocr_reviews.inc()
        for page in result.pages:
            m.ocr_pages.labels(result.engine or "", page.finish_reason).inc()
            if page.confidence is not None:
                m.ocr_page_confidence.observe(page.confidence)
        m.ocr_stage_seconds.labels("render").observe(result.timings_ms.render / 1000)
        m.ocr_stage_seconds.labels("inference").observe(result.timings_ms.inference / 1000)
        m.ocr_stage_seconds.labels("queued").observe(result.timings_ms.queued / 1000)
        m.ocr_stage_seconds.labels("total").observe(result.timings_ms.total / 1000)

    def _options(self, event: DocumentRequest) -> tuple[str, tuple[str, ...], int, float]:
        opts = event.options
        requested = opts.engine if opts and opts.engine else "auto"
        engine: str = self.default_engine if requested == "auto" else requested
        if engine not in self.workers:
            raise PoisonError(
                f"engine {engine!r} is not available on this daemon (available: {', '.join(self.workers)})",
                code="engine_unavailable",
            )
        languages = validate_languages(tuple(opts.languages) if opts and opts.languages else ())
        max_new = opts.max_new_tokens if opts and opts.max_new_tokens else self.cfg.max_new_tokens
        if max_new > self.cfg.max_new_tokens_cap:
            raise PoisonError(
                f"max_new_tokens {max_new} is over the cap {self.cfg.max_new_tokens_cap}", code="invalid_options"
            )
        threshold = opts.review_threshold if opts and opts.review_threshold is not None else self.cfg.review_threshold
        return engine, languages, max_new, threshold

    async def _fetch(self, event: DocumentRequest) -> bytes:
        source = event.source
        if isinstance(source, UriSource):
            bucket, _ = parse_s3_uri(source.uri)
            if bucket not in self.settings.s3.readable_buckets():
                raise PoisonError(f"bucket {bucket!r} is not in OCRBOOTH_S3_ALLOWED_BUCKETS", code="source_not_allowed")
            assert self._runtime is not None
            return await self._runtime.storage.get(source.uri, max_bytes=self.cfg.max_source_bytes)
        encoded = source.data_base64
        too_large = PoisonError(
            f"inline document is over {self.cfg.max_inline_bytes} bytes; upload it to S3", code="source_too_large"
        )
        if len(encoded) > 4 * math.ceil(self.cfg.max_inline_bytes / 3):  # before decoding anything
            raise too_large
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise PoisonError(f"data_base64 is not valid base64: {exc}", code="invalid_source") from None
        if len(data) > self.cfg.max_inline_bytes:  # exact: padding makes the length check above approximate
            raise too_large
        return data

    async def _recognise(
        self,
        path: Path,
        event: DocumentRequest,
        engine_name: str,
        languages: tuple[str, ...],
        max_new_tokens: int,
    ) -> tuple[list[_Page], float, float]:
        """Pages in order, plus seconds spent rendering and waiting for OCR (summed over pages).

        `render_ahead_pages` lanes each take the next page number, hold its worst-case pixel bytes from the
        page-memory budget, render it, hand it to the engine and give the bytes back once it is recognised;
        so a document of any length holds at most that many pages at once. The first failure stops the
        lanes from taking more pages and fails the document with the lowest failed page's error."""
        pool, budget = self.pool, self.pages
        if pool is None or budget is None:
            raise FatalError("the OCR handler is not started")
        fmt, count = await pool.run(inspect_file, str(path))
        wanted = sorted(set(event.pages)) if event.pages else list(range(1, count + 1))
        if len(wanted) > self.cfg.max_pages:
            raise PoisonError(
                f"{len(wanted)} pages requested, over the limit of {self.cfg.max_pages}", code="too_many_pages"
            )
        missing = [p for p in wanted if p > count]
        if missing:
            raise PoisonError(
                f"page(s) {missing[:10]} requested but the document has {count}", code="page_out_of_range"
            )
        limits = RenderLimits(
            self.cfg.render_longest_px, self.cfg.max_dpi, self.cfg.max_pages, self.cfg.max_image_pixels
        )
        estimate = page_bytes_bound(limits)
        worker = self.workers[engine_name]
        todo = iter(wanted)
        done: dict[int, _Page] = {}
        failures: list[tuple[int, OcrboothError | Exception]] = []
        spent = {"render": 0.0, "infer": 0.0}

        async def one(page_number: int) -> None:
            await budget.acquire(estimate)
            held = estimate
            try:
                t0 = time.monotonic()
                pixels = await pool.run(render_file_page, str(path), fmt, page_number, limits)
                t1 = time.monotonic()
                budget.release(held - pixels.nbytes)  # the estimate assumed a square page
                held = pixels.nbytes
                output = await worker.submit(PageInput(pixels.image(), languages, max_new_tokens))
                spent["render"] += t1 - t0
                spent["infer"] += time.monotonic() - t1
                done[page_number] = _Page(page_number, pixels.width_px, pixels.height_px, pixels.blank, output)
            finally:
                budget.release(held)

        async def lane() -> None:
            for page_number in todo:
                if failures:
                    return
                try:
                    await one(page_number)
                except PoisonError as exc:
                    failures.append((page_number, PoisonError(f"page {page_number}: {exc}", code=exc.code)))
                except Exception as exc:  # handed to the caller below, as gather would
                    failures.append((page_number, exc))

        await asyncio.gather(*(lane() for _ in range(min(self.cfg.render_ahead_pages, len(wanted)))))
        if failures:
            raise min(failures, key=lambda f: f[0])[1]
        return [done[n] for n in wanted], spent["render"], spent["infer"]

    def _assemble(
        self,
        event: DocumentRequest,
        engine_name: str,
        pages: list[_Page],
        review_threshold: float,
        timings: Timings,
    ) -> tuple[OcrResult, ReviewFlag | None]:
        failed = [p for p in pages if p.output.error_code]
        if failed:
            first = failed[0]
            raise PoisonError(
                f"page {first.page_number} failed: {first.output.error_message}",
                code=first.output.error_code or "ocr_failed",
            )
        results: list[PageResult] = []
        reasons: set[str] = set()
        review_pages: list[int] = []
        weighted: list[tuple[float, int]] = []
        for page in pages:
            out = page.output
            page_reasons = []
            if out.confidence is not None and out.confidence < review_threshold:
                page_reasons.append("low_confidence")
            if out.finish_reason in ("length", "repetition"):
                page_reasons.append(out.finish_reason)
            if not out.text.strip() and not page.blank:
                page_reasons.append("empty_output")
            if page_reasons:
                reasons.update(page_reasons)
                review_pages.append(page.page_number)
            if out.confidence is not None:
                weighted.append((out.confidence, max(1, out.token_count)))
            results.append(
                PageResult(
                    page_number=page.page_number,
                    width_px=page.width_px,
                    height_px=page.height_px,
                    text=out.text,
                    confidence=out.confidence,
                    min_token_confidence=out.min_token_confidence,
                    low_confidence_spans=[
                        Span(start=s.start, end=s.end, confidence=s.confidence) for s in out.low_confidence_spans
                    ],
                    tables=[Table(rows=rows) for rows in extract_tables(out.text)],
                    languages=list(out.languages) or None,
                    rotation_deg=out.rotation_deg,
                    finish_reason=out.finish_reason,
                )
            )
        # Document confidence: the geometric mean over every token of every page.
        confidence = (
            math.exp(sum(n * math.log(max(c, 1e-12)) for c, n in weighted) / sum(n for _, n in weighted))
            if weighted
            else None
        )
        engine = self.workers[engine_name].engine
        result = OcrResult(
            request_id=event.request_id,
            document_id=event.document_id,
            status="succeeded",
            engine=engine.name,
            model=engine.model,
            pages=results,
            confidence=confidence,
            needs_review=bool(reasons),
            review_reasons=sorted(reasons),
            timings_ms=timings,
            metadata=event.metadata,
        )
        flag = None
        if reasons:
            flag = ReviewFlag(
                request_id=event.request_id,
                document_id=event.document_id,
                pages=review_pages,
                reasons=sorted(reasons),
                confidence=confidence,
            )
        return result, flag
