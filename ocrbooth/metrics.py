"""Prometheus metrics: one container that receives its registry (tests use a fresh registry each)."""

from __future__ import annotations

import math
import os
import time
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from typing import Generic, Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from ocrbooth import __version__
from ocrbooth.constants import METRIC_PREFIX as P

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)


HANDLED_OUTCOMES = ("succeeded", "failed_result", "dead_lettered", "requeued")
FINETUNE_OUTCOMES = ("completed", "failed", "cancelled", "requeued")


class Metrics:
    """Every metric the daemon exports. Labels never carry per-document values."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.build = Info(f"{P}_build", "Version of the running daemon.", registry=r)
        self.build.info({"version": __version__})
        self.consumed = Counter(
            f"{P}_consumed_messages_total", "Messages fetched from input topics.", ["topic"], registry=r
        )
        # Updated for every message: loop-thread metrics (below), exported exactly as prometheus_client's.
        self.handled = LoopCounter(
            f"{P}_handled_messages_total",
            "Input messages finished, by outcome (succeeded, failed_result, dead_lettered, requeued).",
            ["topic", "outcome"],
            registry=r,
        )
        self.produced = LoopCounter(
            f"{P}_produced_messages_total",
            "Output messages sent, by outcome (acked, error).",
            ["topic", "outcome"],
            registry=r,
        )
        self.dead_letters = Counter(
            f"{P}_dead_letters_total", "Messages dead-lettered, by error code.", ["source_topic", "code"], registry=r
        )
        self.dead_letters_dropped = Counter(
            f"{P}_dead_letters_dropped_total",
            "Dead letters the broker refused even in their smallest form (logged instead; the DLQ topic is broken).",
            registry=r,
        )
        self.crash_loops = Counter(
            f"{P}_crash_loop_messages_total",
            "Messages dead-lettered as crash_loop: the daemon died max_process_deaths times while handling them.",
            ["topic"],
            registry=r,
        )
        self.dependency_up = Gauge(
            f"{P}_dependency_up",
            "1 while a dependency (s3, kafka) answers, 0 during an outage (no new work is taken meanwhile).",
            ["dependency"],
            registry=r,
        )
        self.loop_restarts = Counter(
            f"{P}_loop_restarts_total",
            "Daemon loops (fetch, commit, broadcast) restarted after an unexpected error.",
            ["loop"],
            registry=r,
        )
        self.handler_retries = Counter(
            f"{P}_handler_retries_total", "Retries after retryable handler failures.", ["topic"], registry=r
        )
        self.offloaded = Counter(
            f"{P}_offloaded_messages_total", "Outputs too large for Kafka written to S3.", ["topic"], registry=r
        )
        self.handle_seconds = LoopHistogram(
            f"{P}_handle_duration_seconds",
            "Time from accepting a message to its outputs being acknowledged.",
            ["topic"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.publish_seconds = LoopHistogram(
            f"{P}_publish_duration_seconds",
            "Time from send to broker acknowledgement of one output message.",
            ["topic"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(f"{P}_in_flight_messages", "Messages being handled now.", registry=r)
        self.uncommitted = Gauge(
            f"{P}_uncommitted_messages", "Messages accepted and not yet covered by a commit.", registry=r
        )
        self.paused_partitions = Gauge(
            f"{P}_paused_partitions", "Assigned partitions paused because work is at capacity.", registry=r
        )
        self.assigned_partitions = Gauge(f"{P}_assigned_partitions", "Partitions assigned to this member.", registry=r)
        self.consumer_lag = Gauge(
            f"{P}_consumer_lag_messages",
            "High watermark minus the committed position, per assigned partition.",
            ["topic", "partition"],
            registry=r,
        )
        self.commits = Counter(f"{P}_commits_total", "Successful offset commits.", registry=r)
        self.commit_failures = Counter(f"{P}_commit_failures_total", "Offset commits that failed.", registry=r)
        self.rebalances = Counter(
            f"{P}_rebalances_total", "Partition assignments received from the group coordinator.", registry=r
        )
        self.ready = Gauge(f"{P}_ready", "1 when the daemon is assigned and its handlers are ready.", registry=r)

        # OCR pipeline
        self.ocr_documents = Counter(
            f"{P}_ocr_documents_total", "Documents finished, by engine and status.", ["engine", "status"], registry=r
        )
        self.ocr_pages = Counter(
            f"{P}_ocr_pages_total",
            "Pages recognised, by engine and finish reason.",
            ["engine", "finish_reason"],
            registry=r,
        )
        self.ocr_reviews = Counter(f"{P}_ocr_review_flags_total", "Documents flagged for human review.", registry=r)
        self.ocr_page_confidence = Histogram(
            f"{P}_ocr_page_confidence_ratio",
            "Page confidence (geometric mean of token probabilities).",
            buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 1.0),
            registry=r,
        )
        self.ocr_stage_seconds = Histogram(
            f"{P}_ocr_stage_duration_seconds",
            "Per-document time by stage (queued, render, inference, total).",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ocr_batch_pages = Histogram(
            f"{P}_ocr_batch_pages",
            "Pages an engine step worked on (lightonocr: pages decoding together; tesseract: 1).",
            ["engine"],
            buckets=(1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256, 512),
            registry=r,
        )
        self.ocr_batch_seconds = Histogram(
            f"{P}_ocr_batch_duration_seconds",
            "Wall time of one engine step (lightonocr: a chunk of decode steps plus admissions; tesseract: a page).",
            ["engine"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ocr_batch_splits = Counter(
            f"{P}_ocr_batch_splits_total",
            "Prefill batches retried page by page after a failure (e.g. out of memory).",
            ["engine"],
            registry=r,
        )
        self.ocr_render_workers = Gauge(
            f"{P}_ocr_render_workers",
            "Render worker processes started and alive (below ocr.render_workers while replacements start).",
            registry=r,
        )
        self.ocr_render_failures = Counter(
            f"{P}_ocr_render_failures_total",
            "Render workers lost or tasks failed, by reason (timeout, out_of_memory, crashed, start_failed).",
            ["reason"],
            registry=r,
        )
        self.ocr_page_memory = Gauge(
            f"{P}_ocr_page_memory_bytes",
            "Bytes of rendered pages held in the daemon, waiting for or in recognition (ocr.max_page_memory_bytes).",
            registry=r,
        )
        self.ocr_engine_busy = Counter(
            f"{P}_ocr_engine_busy_seconds_total",
            "Seconds the engine (the GPU, for lightonocr) spent in steps; rate() is the busy fraction.",
            ["engine"],
            registry=r,
        )

        # Fine-tune jobs (no per-job labels: job ids are unbounded)
        self.finetune_jobs = Counter(
            f"{P}_finetune_jobs_total",
            "Fine-tune jobs that ended here, by outcome (completed, failed, cancelled, requeued).",
            ["outcome"],
            registry=r,
        )
        self.finetune_running = Gauge(f"{P}_finetune_running_jobs", "Trainer subprocesses running now.", registry=r)
        self.finetune_steps = Counter(
            f"{P}_finetune_steps_total", "Optimizer steps reported by trainers (progress events).", registry=r
        )
        self.finetune_steps_per_second = Gauge(
            f"{P}_finetune_steps_per_second", "Training speed in the latest progress event.", registry=r
        )
        self.finetune_loss = Gauge(f"{P}_finetune_loss", "Training loss in the latest progress event.", registry=r)
        self.finetune_checkpoints = Counter(
            f"{P}_finetune_checkpoints_total", "Checkpoints uploaded and marked complete.", registry=r
        )
        self.finetune_checkpoint_upload_seconds = Histogram(
            f"{P}_finetune_checkpoint_upload_duration_seconds",
            "Time a trainer took to upload one checkpoint to S3 and mark it complete.",
            buckets=(0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200),
            registry=r,
        )
        self.finetune_checkpoint_failures = Counter(
            f"{P}_finetune_checkpoint_upload_failures_total",
            "Checkpoint uploads that failed (the trainer then exits and is restarted from the previous one).",
            registry=r,
        )
        self.finetune_last_progress = Gauge(
            f"{P}_finetune_last_progress_timestamp_seconds",
            "Unix time a trainer here last launched or reported progress (class images, start, steps, checkpoint).",
            registry=r,
        )
        self.finetune_protocol_errors = Counter(
            f"{P}_finetune_protocol_errors_total",
            "Trainer stdout lines that are not a protocol event (logged and skipped).",
            registry=r,
        )
        self.finetune_trainer_restarts = Counter(
            f"{P}_finetune_trainer_restarts_total", "Trainer subprocesses restarted after a crash.", registry=r
        )

    def init_topics(self, inputs: Iterable[str], outputs: Iterable[str]) -> None:
        """Export the series of every known topic at 0 from startup: `rate()` then reads 0 rather than nothing,
        and dashboards and alerts see every metric before its first event. (Dead letters stay lazy: their
        `code` label has too many values to enumerate.)"""
        for topic in inputs:
            self.consumed.labels(topic)
            self.crash_loops.labels(topic)
            self.handler_retries.labels(topic)
            self.handle_seconds.labels(topic)
            for outcome in HANDLED_OUTCOMES:
                self.handled.labels(topic, outcome)
        for topic in outputs:
            self.produced.labels(topic, "acked")
            self.produced.labels(topic, "error")
            self.publish_seconds.labels(topic)
            self.offloaded.labels(topic)

    def init_engine(self, engine: str) -> None:
        """The per-engine OCR series at 0, once the engine is loaded."""
        for status in ("succeeded", "failed"):
            self.ocr_documents.labels(engine, status)
        self.ocr_batch_pages.labels(engine)
        self.ocr_batch_seconds.labels(engine)
        self.ocr_batch_splits.labels(engine)
        self.ocr_engine_busy.labels(engine)

    def init_render(self, reasons: Iterable[str]) -> None:
        """The render-failure series at 0 for every reason, once the render pool exists."""
        for reason in reasons:
            self.ocr_render_failures.labels(reason)

    def init_finetune(self) -> None:
        for outcome in FINETUNE_OUTCOMES:
            self.finetune_jobs.labels(outcome)

    def observe_ocr_batch(self, engine: str, stats: BatchStatsLike) -> None:
        """Record one executed batch (called from the engine's worker thread; prometheus_client is thread-safe)."""
        self.ocr_batch_pages.labels(engine).observe(stats.pages)
        self.ocr_batch_seconds.labels(engine).observe(stats.seconds)
        self.ocr_engine_busy.labels(engine).inc(stats.seconds)
        if stats.splits:
            self.ocr_batch_splits.labels(engine).inc(stats.splits)


class Observer(Protocol):
    """A histogram, or one of its labelled children, as `observe_many` uses it."""

    def observe(self, amount: float) -> None: ...


def observe_many(histogram: Observer, amount: float, count: int) -> None:
    """`count` observations of the same `amount` (a batch whose messages share one latency). `histogram` is an
    unlabelled histogram or a child from `.labels()`.

    prometheus_client has no bulk observe, so this loops over the public `observe` (about 1.5 µs each on the
    CI machine): exact under any prometheus-client version, where writing its private fields was not."""
    for _ in range(count):
        histogram.observe(amount)


class BatchStatsLike(Protocol):
    @property
    def pages(self) -> int: ...
    @property
    def seconds(self) -> float: ...
    @property
    def splits(self) -> int: ...


# ---- loop-thread metrics ------------------------------------------------------------------------------------
#
# prometheus_client's Counter.inc() and Histogram.observe() take a lock per value and run several Python calls
# (observe also walks the buckets in Python): 0.45 and 0.9-2 us. The daemon updates four series per message, so
# those cost it about 4 us of CPU per message (a tenth of its per-message runtime in bench/runtime_overhead.py).
# prometheus_client has no cheaper form (no bulk observe, no lock-free child), so the four per-message metrics are
# custom collectors (its public custom-collector API) that export exactly the samples its Counter and Histogram
# export (`_total`/`_bucket`, `_count`, `_sum`, `_created`; tests/unit/test_metrics.py compares the exposition
# byte for byte). They take no lock: they are updated and collected on the event loop's thread only (the daemon's
# /metrics handler runs on the loop, daemon/health.py). Everything else stays prometheus_client's.

ChildT = TypeVar("ChildT")

_USE_CREATED = os.environ.get("PROMETHEUS_DISABLE_CREATED_SERIES", "False").lower() not in ("true", "1", "t")
"""Export `_created` series, as prometheus_client decides it (the same environment variable)."""


class LoopCounterChild:
    """One labelled series of a LoopCounter."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1) -> None:
        """Add `amount` (non-negative, as prometheus_client requires)."""
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount


class LoopHistogramChild:
    """One labelled series of a LoopHistogram: the count per bucket (not cumulative) and the sum."""

    __slots__ = ("_bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        """Count `amount` in the first bucket whose bound is >= it (`le` is inclusive), as prometheus_client does;
        NaN lands in no bucket and only poisons the sum, as there."""
        self.sum += amount
        if amount == amount:
            self.counts[bisect_left(self._bounds, amount)] += 1

    def observe_each(self, amounts: Iterable[float]) -> None:
        """`observe` each of `amounts`, in order (the same sum to the last bit), in one call."""
        bounds, counts, total = self._bounds, self.counts, self.sum
        for amount in amounts:
            total += amount
            if amount == amount:
                counts[bisect_left(bounds, amount)] += 1
        self.sum = total


class _LoopMetric(Generic[ChildT]):
    """What LoopCounter and LoopHistogram share: label handling (prometheus_client's rules) and registration."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], ChildT] = {}
        registry.register(self)

    def _new_child(self) -> ChildT:
        raise NotImplementedError

    def describe(self) -> list[Metric]:
        raise NotImplementedError

    def collect(self) -> list[Metric]:
        raise NotImplementedError

    def labels(self, *values: object) -> ChildT:
        """The series for these label values (converted with str, as prometheus_client does), created at zero on
        first use. Callers on the per-message path keep the child rather than calling this per message."""
        if len(values) != len(self.labelnames):
            raise ValueError("Incorrect label count")
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._new_child()
        return child


class LoopCounter(_LoopMetric[LoopCounterChild]):
    """A labelled counter updated and collected on the event loop's thread only; exported as prometheus_client's
    Counter of the same name would be."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry) -> None:
        super().__init__(name.removesuffix("_total"), documentation, labelnames, registry)

    def _new_child(self) -> LoopCounterChild:
        return LoopCounterChild()

    def describe(self) -> list[Metric]:
        return [CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> list[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, child in list(self._children.items()):
            family.add_metric(key, child.value, child.created if _USE_CREATED else None)
        return [family]


class LoopHistogram(_LoopMetric[LoopHistogramChild]):
    """A labelled histogram updated and collected on the event loop's thread only; exported as prometheus_client's
    Histogram of the same name and buckets would be."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        bounds = [float(b) for b in buckets]
        if bounds != sorted(bounds):
            raise ValueError("Buckets not in sorted order")
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        self.bounds = tuple(bounds)
        self._le = tuple(floatToGoString(b) for b in bounds)  # type: ignore[no-untyped-call]
        super().__init__(name, documentation, labelnames, registry)

    def _new_child(self) -> LoopHistogramChild:
        return LoopHistogramChild(self.bounds)

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> list[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, child in list(self._children.items()):
            cumulative = 0.0
            buckets = []
            for le, count in zip(self._le, child.counts, strict=True):
                cumulative += count
                buckets.append((le, cumulative))
            family.add_metric(key, buckets, child.sum)
            if _USE_CREATED:
                family.samples.append(
                    Sample(f"{self.name}_created", dict(zip(self.labelnames, key, strict=True)), child.created)
                )
        return [family]
