"""Chaos: the broker restarted twice, and a proxy that resets and stalls the daemon's broker connections.

Both run against a broker of their own (tests/support/broker.py), so that no other test sees the faults.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ocrbooth.dev.embedded import EmbeddedStack
from tests.chaos.common import SHORT_SESSION, answered_ids, echo_stream, exited, handled, tally
from tests.chaos.figures import Figures
from tests.support.broker import PrivateBroker
from tests.support.daemon import DaemonProcess
from tests.support.kafka import committed_offsets, consume_all, produce, wait_until
from tests.support.stack import TopicNames
from tests.support.tcpproxy import TcpProxy


@pytest.fixture
def own_topics() -> TopicNames:
    """Topic names for the private broker."""
    return TopicNames.unique()


@pytest.fixture
def broker(stack: EmbeddedStack, tmp_path: Path) -> Iterator[PrivateBroker]:
    """A broker no other test uses, its log in S3; not started (a proxy may have to come first)."""
    own = PrivateBroker(stack, tmp_path / "broker")
    try:
        yield own
    finally:
        own.stop()


def _env(broker: PrivateBroker, topics: TopicNames, group_id: str, **extra: str) -> dict[str, str]:
    return {**broker.env(), **topics.env(), **SHORT_SESSION, "OCRBOOTH_GROUP_ID": group_id, **extra}


RESTART_N = 1000
RESTART_IN_FLIGHT = 8
# Each event sleeps 100-200 ms, so the daemon handles at most 8 / 0.1 s = 80 events a second however fast the
# runtime gets. The daemon keeps handling what it has fetched while the broker is down, and Tansu's graceful stop
# takes about 5 s: at most ~400 events go by during the first restart, so both restarts land mid-stream.
RESTART_DELAY_MS = (100, 200)
RESTART_AFTER = ((150, False), (500, True))  # (events handled, SIGKILL) before each restart
RESTART_WALL_BOUND_S = 150
# A restart can cost the results in flight twice: resent by the producer, and redelivered on reassignment.
RESTART_DUPLICATE_BOUND = 2 * 2 * RESTART_IN_FLIGHT


@pytest.mark.timeout(RESTART_WALL_BOUND_S + 60)
async def test_two_broker_restarts_lose_nothing(
    broker: PrivateBroker,
    own_topics: TopicNames,
    group_id: str,
    tmp_path: Path,
    chaos_report: Callable[[Figures], None],
) -> None:
    """Tansu (log in S3) stopped and started on the same port twice, once gracefully and once with SIGKILL,
    while the daemon works through 1,000 events: it reconnects by itself and every request is answered."""
    started = time.monotonic()
    await asyncio.to_thread(broker.start)
    await asyncio.to_thread(broker.create_topics, own_topics.partition_counts(4))
    bootstrap = broker.bootstrap_servers
    ends = await produce(bootstrap, own_topics.ocr_requests, echo_stream(RESTART_N, seed=3, delay_ms=RESTART_DELAY_MS))
    env = _env(broker, own_topics, group_id, OCRBOOTH_MAX_IN_FLIGHT=str(RESTART_IN_FLIGHT))
    proc = DaemonProcess(env, tmp_path / "daemon.log").start()
    try:
        await proc.wait_ready()
        for restart, (after, kill) in enumerate(RESTART_AFTER):
            await wait_until(lambda a=after: handled(proc) >= a, 90, interval_s=0.05, message=f"{after} handled")
            assert handled(proc) < RESTART_N, f"the stream was done before restart {restart}"
            await asyncio.to_thread(broker.restart, kill=kill)
            assert not exited(proc), f"the daemon exited when the broker restarted:\n{proc.log_tail()}"
        await answered_ids(bootstrap, own_topics.ocr_results, RESTART_N, timeout_s=120)
        assert not exited(proc), proc.log_tail()
        proc.send(signal.SIGTERM)
        assert await proc.wait_exit(40) == 0, proc.log_tail()
    finally:
        proc.kill()
    results = await consume_all(bootstrap, own_topics.ocr_results, timeout_s=60)
    counted = tally((f"req-{i}" for i in range(RESTART_N)), results)
    chaos_report(
        Figures.of_tally(
            "broker_restart",
            counted,
            sent=RESTART_N,
            duplicate_bound=RESTART_DUPLICATE_BOUND,
            started=started,
            wall_bound_s=RESTART_WALL_BOUND_S,
        )
    )
    assert broker.restarts == 2
    assert counted.lost == 0, f"lost {counted.lost}: {counted.missing}"
    assert counted.failed == 0
    assert counted.duplicated <= RESTART_DUPLICATE_BOUND
    assert await committed_offsets(bootstrap, group_id, own_topics.ocr_requests) == ends


PROXY_N = 1200
PROXY_IN_FLIGHT = 16
FAULTS = 10  # 6 resets and 4 stalls, one every FAULT_EVERY_S seconds
FAULT_EVERY_S = 2.5
PROXY_WALL_BOUND_S = 150
# A reset or a stall can cost the results in flight twice (producer retry, redelivery after a rebalance).
PROXY_DUPLICATE_BOUND = FAULTS * 2 * PROXY_IN_FLIGHT


@pytest.mark.timeout(PROXY_WALL_BOUND_S + 60)
async def test_proxy_resetting_and_stalling_broker_connections_loses_nothing(
    broker: PrivateBroker,
    own_topics: TopicNames,
    group_id: str,
    tmp_path: Path,
    chaos_report: Callable[[Figures], None],
) -> None:
    """Every byte between the daemon and the broker goes through a proxy that resets all connections six
    times and stalls them four times (2-5 s) while 1,200 events are processed: every request is answered."""
    started = time.monotonic()
    rng = random.Random(5)
    proxy = TcpProxy(broker.port)
    await proxy.start()
    broker.advertised_port = proxy.port  # clients reach the broker only through the proxy
    try:
        await asyncio.to_thread(broker.start)
        await asyncio.to_thread(broker.create_topics, own_topics.partition_counts(4))
        bootstrap = broker.bootstrap_servers
        # Produced before the faults: a producer without idempotence would duplicate inputs on a reset.
        ends = await produce(bootstrap, own_topics.ocr_requests, echo_stream(PROXY_N, seed=5, delay_ms=(200, 400)))
        env = _env(broker, own_topics, group_id, OCRBOOTH_MAX_IN_FLIGHT=str(PROXY_IN_FLIGHT))
        proc = DaemonProcess(env, tmp_path / "daemon.log").start()
        try:
            await proc.wait_ready()
            faults = ["reset"] * 6 + ["stall"] * 4
            rng.shuffle(faults)
            for fault in faults:
                await asyncio.sleep(FAULT_EVERY_S)
                if fault == "reset":
                    proxy.reset_all()
                else:
                    proxy.stall(rng.uniform(2, 5))
                    await wait_until(lambda: not proxy.stalled, 10, message="stall over")
                assert not exited(proc), f"the daemon exited after a {fault}:\n{proc.log_tail()}"
            assert handled(proc) < PROXY_N, "the stream was done before the faults ended; slow it down"
            await answered_ids(bootstrap, own_topics.ocr_results, PROXY_N, timeout_s=120)
            assert not exited(proc), proc.log_tail()
            proc.send(signal.SIGTERM)
            assert await proc.wait_exit(40) == 0, proc.log_tail()
        finally:
            proc.kill()
        results = await consume_all(bootstrap, own_topics.ocr_results, timeout_s=60)
        committed = await committed_offsets(bootstrap, group_id, own_topics.ocr_requests)
    finally:
        await proxy.close()
    counted = tally((f"req-{i}" for i in range(PROXY_N)), results)
    chaos_report(
        Figures.of_tally(
            "broker_proxy",
            counted,
            sent=PROXY_N,
            duplicate_bound=PROXY_DUPLICATE_BOUND,
            started=started,
            wall_bound_s=PROXY_WALL_BOUND_S,
        )
    )
    assert proxy.resets > 0, "no connection was reset; the test proved nothing"
    assert counted.lost == 0, f"lost {counted.lost}: {counted.missing}"
    assert counted.failed == 0
    assert counted.duplicated <= PROXY_DUPLICATE_BOUND
    assert committed == ends
