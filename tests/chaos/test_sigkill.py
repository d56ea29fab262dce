"""Chaos: the daemon SIGKILLed ten times during one stream, restarted each time as Kubernetes would."""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.chaos.common import SHORT_SESSION, dead_lettered, echo_stream, handled, request_ids, tally
from tests.chaos.figures import Figures, codes_of
from tests.support.daemon import DaemonProcess
from tests.support.kafka import committed_offsets, consume_all, high_watermarks, produce, wait_until
from tests.support.stack import TopicNames

N = 2000
KILLS = 10
MAX_IN_FLIGHT = 32
WALL_BOUND_S = 180


@pytest.mark.timeout(WALL_BOUND_S + 60)
async def test_ten_sigkills_during_a_stream_lose_nothing(
    bootstrap: str,
    topics: TopicNames,
    daemon_env: dict[str, str],
    group_id: str,
    tmp_path: Path,
    chaos_report: Callable[[Figures], None],
) -> None:
    """2,000 events, the daemon SIGKILLed 10 times mid-stream and restarted: every request answered, at
    most max_in_flight duplicates per kill, and the group's offsets end at the end of the topic."""
    started = time.monotonic()
    rng = random.Random(9)
    ends = await produce(bootstrap, topics.ocr_requests, echo_stream(N, seed=9, delay_ms=(1, 6)))
    env = {**daemon_env, **SHORT_SESSION, "OCRBOOTH_MAX_IN_FLIGHT": str(MAX_IN_FLIGHT)}
    for life in range(KILLS):
        proc = DaemonProcess(env, tmp_path / f"life-{life}.log").start()
        try:
            await proc.wait_ready()
            # Each life handles a few dozen events, so ten lives cover well under the whole stream.
            target = rng.randint(30, 90)
            await wait_until(lambda p=proc, t=target: handled(p) >= t, 60, interval_s=0.02, message=f"{target} handled")
        finally:
            proc.kill()
        assert proc.proc is not None
        assert proc.proc.returncode == -signal.SIGKILL, f"life {life} ended by itself:\n{proc.log_tail()}"

    # Nothing may be finished yet, or the kills proved nothing.
    midway = await consume_all(bootstrap, topics.ocr_results, timeout_s=30)
    assert len(set(request_ids(midway))) < N, "the stream was done before the last kill; lengthen it"

    last = DaemonProcess(env, tmp_path / "last.log", args=["--until-idle"]).start()
    try:
        assert await last.wait_exit(180) == 0, last.log_tail()
    finally:
        last.kill()
    results = await consume_all(bootstrap, topics.ocr_results, timeout_s=60)
    letters = await dead_lettered(bootstrap, topics.dlq)
    counted = tally((f"req-{i}" for i in range(N)), results)
    chaos_report(
        Figures.of_tally(
            "sigkill",
            counted,
            sent=N,
            duplicate_bound=KILLS * MAX_IN_FLIGHT,
            started=started,
            wall_bound_s=WALL_BOUND_S,
            dead_lettered=codes_of(letters.values()),
        )
    )
    assert not letters, f"valid requests dead-lettered: {dict(list(letters.items())[:10])}"
    assert counted.lost == 0, f"lost {counted.lost}: {counted.missing}"
    assert counted.failed == 0
    assert counted.duplicated <= KILLS * MAX_IN_FLIGHT
    assert await committed_offsets(bootstrap, group_id, topics.ocr_requests) == ends
    assert await high_watermarks(bootstrap, topics.ocr_requests) == ends
    assert time.monotonic() - started <= WALL_BOUND_S
