"""The daemon's own CPU per message, without a broker: a diagnostic beside `runtime_overhead.py`.

The per-message path of `Daemon` with the `echo` handler (fetch accept -> task -> decode and validate -> handle
-> encode and append -> acknowledgement -> offsets -> commit) over a fake producer, consumer client and crash-
loop store, batches of `--batch` records over 4 partitions. It reaches into the daemon's parts to swap the
network out (private attributes), so it measures exactly the runtime's code and nothing of aiokafka's or the
broker's; `tests/unit/test_runtime_per_message.py` runs it once so it keeps working.

    PYTHONPATH=. .venv/bin/python bench/runtime_per_message.py            # µs of CPU per message
    PYTHONPATH=. .venv/bin/python bench/runtime_per_message.py --wire msgspec  # the same, models on msgspec
    PYTHONPATH=. valgrind --tool=callgrind --instr-atstart=no .venv/bin/python bench/runtime_per_message.py \
        --callgrind --repeat 1                                           # instruction counts, which repeat

The README's "Benchmarks" quotes its figures for issue #13 (28 µs a message on the 2-core CI machine).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import time
from typing import Any

from aiokafka import TopicPartition
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.structs import ConsumerRecord
from prometheus_client import CollectorRegistry

from bench.runtime_overhead import DAEMON_ENV, request_value
from ocrbooth.config import load_settings
from ocrbooth.daemon import eventloop
from ocrbooth.daemon.app import Daemon
from ocrbooth.daemon.produce_batches import ProduceBatches
from ocrbooth.errors import PoisonError

PARTS = 4


class FakeProducer:
    def __init__(self) -> None:
        self.pending: list[asyncio.Future[Any]] = []
        self.sent = 0

    async def send(self, topic: str, value: bytes, key: bytes | None = None, headers: Any = None) -> Any:
        self.sent += 1
        f = asyncio.get_running_loop().create_future()
        self.pending.append(f)
        return f

    def create_batch(self) -> BatchBuilder:
        return BatchBuilder(512 * 1024, 0)  # aiokafka's own builder: its appends are the daemon's work now

    async def partitions_for(self, topic: str) -> set[int]:
        return set(range(PARTS))

    async def send_batch(self, batch: BatchBuilder, topic: str, *, partition: int) -> Any:
        self.sent += batch.record_count()
        f = asyncio.get_running_loop().create_future()
        self.pending.append(f)
        return f

    def answer(self) -> None:
        p, self.pending = self.pending, []
        for f in p:
            f.set_result(None)


class FakeClient:
    def __init__(self, tps: list[TopicPartition]) -> None:
        self._a = set(tps)
        self.committed: dict[TopicPartition, int] = {}

    def assignment(self) -> set[TopicPartition]:
        return self._a

    def seek(self, tp: TopicPartition, offset: int) -> None:
        raise AssertionError("seek")

    def pause(self, *tps: Any) -> None: ...
    def resume(self, *tps: Any) -> None: ...

    async def commit(self, plan: dict[TopicPartition, int]) -> None:
        self.committed.update(plan)

    def highwater(self, tp: TopicPartition) -> int:
        return 0


class FakeStore:
    bucket = "b"

    def uri(self, key: str, bucket: str | None = None) -> str:
        return f"s3://b/{key}"

    async def put(self, key: str, data: bytes, *, content_type: str = "") -> str:
        return key

    async def get(self, uri: str, *, max_bytes: int | None = None) -> bytes:
        raise PoisonError("nope", code="source_not_found")


async def main(args: argparse.Namespace) -> list[float]:
    """µs of CPU per message, one figure per repeat (none under --callgrind)."""
    for k in [k for k in os.environ if k.startswith("OCRBOOTH_")]:
        del os.environ[k]
    os.environ.update(DAEMON_ENV)
    os.environ["OCRBOOTH_MAX_IN_FLIGHT"] = str(args.batch)
    settings = load_settings()
    daemon = Daemon(settings, registry=CollectorRegistry())
    topic = settings.topics.ocr_requests
    tps = [TopicPartition(topic, p) for p in range(PARTS)]
    producer = FakeProducer()
    daemon.publisher._producer = producer  # type: ignore[assignment]
    batches = daemon.publisher._batches = ProduceBatches(producer)
    consumer = daemon.consumer
    client = FakeClient(tps)
    consumer._client = consumer.budgets.client = consumer.committer.client = consumer.listener.client = client  # type: ignore[assignment]
    consumer.tracker.assign(tps)
    guard = consumer.guard
    assert guard is not None
    guard._store = FakeStore()
    for tp in tps:
        await guard.load(tp, None, position=0)
    daemon.metrics.init_topics([topic], [settings.topics.ocr_results])
    values = [request_value(i) for i in range(args.batch)]
    offsets = [0] * PARTS
    inflight = consumer.inflight

    async def one_batch() -> None:
        per = args.batch // PARTS
        batch = {}
        for p, tp in enumerate(tps):
            recs = []
            for i in range(per):
                o = offsets[p]
                offsets[p] += 1
                recs.append(
                    ConsumerRecord(
                        topic, p, o, 0, 0, f"doc-{i:08d}".encode(), values[p * per + i], None, len(values[0]), 8, []
                    )
                )
            batch[tp] = recs
        for tp, recs in batch.items():
            consumer._accept(client, tp, recs)  # type: ignore[arg-type]
        while inflight.tasks:  # noqa: ASYNC110  # hand the loop to the message tasks until all are with the producer
            await asyncio.sleep(0)
        await batches.flush()  # this turn's produce batches are submitted
        producer.answer()
        while len(inflight):  # noqa: ASYNC110  # until every acknowledged message is finished
            await asyncio.sleep(0)
        await consumer.committer.commit()

    gc.collect()
    gc.set_threshold(100_000, 10, 10)
    gc.freeze()
    for _ in range(args.warmup):
        await one_batch()
    results = []
    if args.callgrind:
        import subprocess

        # blocking on purpose: instrumentation must be on before the next batch starts
        subprocess.run(["callgrind_control", "-i", "on", str(os.getpid())], check=True, capture_output=True)  # noqa: ASYNC221
        for _ in range(args.batches):
            await one_batch()
        subprocess.run(["callgrind_control", "-i", "off", str(os.getpid())], check=True, capture_output=True)  # noqa: ASYNC221
        return []
    for _ in range(args.repeat):
        c0, w0 = time.process_time(), time.perf_counter()
        for _ in range(args.batches):
            await one_batch()
        c1, w1 = time.process_time(), time.perf_counter()
        n = args.batches * args.batch
        results.append(((c1 - c0) / n * 1e6, (w1 - w0) / n * 1e6))
    assert inflight.counts["succeeded"] == (args.warmup + args.batches * args.repeat) * args.batch, inflight.counts
    cpu = sorted(r[0] for r in results)
    print(f"us/msg CPU: min {cpu[0]:.2f} median {cpu[len(cpu) // 2]:.2f}  all " + " ".join(f"{c:.1f}" for c in cpu))
    return cpu


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2000)
    p.add_argument("--batches", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--loop", default="uvloop")
    p.add_argument("--callgrind", action="store_true", help="run under callgrind --instr-atstart=no")
    p.add_argument(
        "--wire",
        choices=("pydantic", "msgspec"),
        default="pydantic",
        help="the echo path's wire models: the contract's pydantic ones, or bench/msgspec_wire.py's mirrors",
    )
    return p


if __name__ == "__main__":
    options = parser().parse_args()
    if options.wire == "msgspec":
        from bench import msgspec_wire

        msgspec_wire.install()
    eventloop.run(main(options), options.loop)
