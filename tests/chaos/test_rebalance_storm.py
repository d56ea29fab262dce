"""Chaos: a rebalance storm. Three replicas share a stream while members are killed, stopped and added."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from tests.chaos.common import SHORT_SESSION, dead_lettered, echo_stream, settled, tally
from tests.chaos.figures import Figures, codes_of
from tests.support.daemon import DaemonProcess
from tests.support.kafka import committed_offsets, consume_all
from tests.support.stack import TopicNames

N = 1500
REPLICAS = 3
STORM_S = 40
CHANGES = 10  # membership changes during the storm: one every STORM_S / CHANGES seconds
MAX_IN_FLIGHT = 8  # after a kill, each message that was in flight is handled alone: keep them few
WALL_BOUND_S = 180
# Each change revokes partitions from every member; each can have max_in_flight results still publishing.
DUPLICATE_BOUND = CHANGES * (REPLICAS + 1) * MAX_IN_FLIGHT


@pytest.mark.timeout(WALL_BOUND_S + 60)
async def test_rebalance_storm_with_three_replicas_loses_nothing(
    bootstrap: str,
    topics: TopicNames,
    daemon_env: dict[str, str],
    group_id: str,
    tmp_path: Path,
    chaos_report: Callable[[Figures], None],
) -> None:
    """1,500 events produced over 40 s while three replicas are SIGKILLed, SIGTERMed and joined by a fourth,
    ten changes in all: every request answered, and the group's offsets end at the end of the topic."""
    started = time.monotonic()
    rng = random.Random(2)
    env = {**daemon_env, **SHORT_SESSION, "OCRBOOTH_MAX_IN_FLIGHT": str(MAX_IN_FLIGHT)}
    lives = 0

    def spawn() -> DaemonProcess:
        nonlocal lives
        lives += 1
        return DaemonProcess(env, tmp_path / f"member-{lives}.log").start()

    members = [spawn() for _ in range(REPLICAS)]
    stream = echo_stream(N, seed=2, delay_ms=(40, 200))  # work in flight at every change
    ends: dict[int, int] = {}

    async def producer() -> None:
        # A steady stream for the whole storm: a small batch every quarter second.
        batch = N // (STORM_S * 4)
        client = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False, acks="all")
        await client.start()
        try:
            for i in range(0, N, batch):
                sends = [await client.send(topics.ocr_requests, value=v, key=k) for k, v in stream[i : i + batch]]
                for meta in await asyncio.gather(*sends):
                    ends[meta.partition] = max(ends.get(meta.partition, 0), meta.offset + 1)
                await asyncio.sleep(0.25)
        finally:
            await client.stop()

    actions: list[str] = []
    leaving: list[DaemonProcess] = []
    try:
        for member in members:
            await member.wait_ready()
        feeding = asyncio.create_task(producer())
        for _ in range(CHANGES):
            await asyncio.sleep(STORM_S / CHANGES)
            action = rng.choice(["kill", "term", "join"] if len(members) <= REPLICAS else ["kill", "term"])
            actions.append(action)
            if action == "join":
                members.append(spawn())
                continue
            victim = members.pop(rng.randrange(len(members)))
            if action == "kill":
                victim.kill()
            else:
                victim.send(signal.SIGTERM)  # drains while the storm goes on; its exit code is checked below
                leaving.append(victim)
            members.append(spawn())  # Kubernetes replaces it
        await feeding
        # The storm is over: the members left finish the stream, then leave cleanly.
        await settled(bootstrap, topics.ocr_results, topics.dlq, N, WALL_BOUND_S - (time.monotonic() - started))
        for member in members:
            member.send(signal.SIGTERM)
        for member in members + leaving:
            assert await member.wait_exit(40) == 0, member.log_tail()
            # A member stopped while the group rebalances shuts down without a traceback (issue 9, point 5).
            assert "Traceback" not in member.log_path.read_text(errors="replace"), member.log_tail(80)
    finally:
        for member in members + leaving:
            member.kill()

    results = await consume_all(bootstrap, topics.ocr_results, timeout_s=60)
    letters = await dead_lettered(bootstrap, topics.dlq)
    counted = tally((f"req-{i}" for i in range(N)), results)
    chaos_report(
        Figures.of_tally(
            "rebalance_storm",
            counted,
            sent=N,
            duplicate_bound=DUPLICATE_BOUND,
            started=started,
            wall_bound_s=WALL_BOUND_S,
            dead_lettered=codes_of(letters.values()),
        )
    )
    assert not letters, f"valid requests dead-lettered (actions {actions}): {dict(list(letters.items())[:10])}"
    assert counted.lost == 0, f"lost {counted.lost}: {counted.missing} (actions {actions})"
    assert counted.failed == 0
    assert counted.duplicated <= DUPLICATE_BOUND, f"actions {actions}"
    assert await committed_offsets(bootstrap, group_id, topics.ocr_requests) == ends
    assert lives >= REPLICAS + CHANGES - actions.count("join")
