"""Chaos: a planted message that kills the daemon every time it is processed is dead-lettered as
`crash_loop` after `max_process_deaths` deaths, and the rest of its partition is processed."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.chaos.common import SHORT_SESSION, echo_stream, tally
from tests.chaos.figures import Figures, codes_of
from tests.chaos.killer import LOG_ENV, MARKER
from tests.support.daemon import DaemonProcess, request_event
from tests.support.kafka import committed_offsets, consume_all, produce
from tests.support.stack import TopicNames

PER_PARTITION = 40
KILLER_AT = 12  # offset of the planted message in partition 0
MAX_DEATHS = 3
MAX_IN_FLIGHT = 8
WALL_BOUND_S = 150


@pytest.fixture
def topic_partitions() -> int:
    """Two partitions: the killer's, and one that must keep flowing regardless."""
    return 2


@pytest.mark.timeout(WALL_BOUND_S + 60)
async def test_planted_killer_is_dead_lettered_as_crash_loop_after_max_deaths(
    bootstrap: str,
    topics: TopicNames,
    daemon_env: dict[str, str],
    group_id: str,
    tmp_path: Path,
    chaos_report: Callable[[Figures], None],
) -> None:
    """A message whose handler calls os._exit(1): after 3 deaths (each followed by a restart) it is
    dead-lettered with code crash_loop without running a 4th time, and every other message is answered."""
    started = time.monotonic()
    n = 2 * PER_PARTITION
    stream = echo_stream(n, seed=7, delay_ms=(1, 20))
    killer_id = f"req-{KILLER_AT}"
    # Requests 0..39 on partition 0 (the killer among them), 40..79 on partition 1.
    part0 = [
        (key, request_event(i, **{MARKER: "1"}) if i == KILLER_AT else value)
        for i, (key, value) in enumerate(stream[:PER_PARTITION])
    ]
    ends = await produce(bootstrap, topics.ocr_requests, part0, partition=0)
    ends |= await produce(bootstrap, topics.ocr_requests, stream[PER_PARTITION:], partition=1)
    kills = tmp_path / "kills.txt"
    env = {
        **daemon_env,
        **SHORT_SESSION,
        "OCRBOOTH_HANDLERS": "tests.chaos.killer:KillerHandler",
        "OCRBOOTH_MAX_PROCESS_DEATHS": str(MAX_DEATHS),
        "OCRBOOTH_MAX_IN_FLIGHT": str(MAX_IN_FLIGHT),
        LOG_ENV: str(kills),
    }
    exits: list[int] = []
    # Restarted after every death, as Kubernetes would; one spare life beyond the bound shows a loop.
    for life in range(MAX_DEATHS + 2):
        proc = DaemonProcess(env, tmp_path / f"life-{life}.log", args=["--until-idle"]).start()
        try:
            code = await proc.wait_exit(90)
        finally:
            proc.kill()
        exits.append(code)
        if code != 1:
            break
    deaths = exits.count(1)
    runs_of_killer = len(kills.read_text().splitlines()) if kills.exists() else 0

    results = await consume_all(bootstrap, topics.ocr_results, timeout_s=30)
    letters = [json.loads(r.value) for r in await consume_all(bootstrap, topics.dlq, timeout_s=30)]
    counted = tally((f"req-{i}" for i in range(n) if i != KILLER_AT), results)
    killer_letters = [d for d in letters if (d["partition"], d["offset"]) == (0, KILLER_AT)]
    answered = counted.answered + (1 if killer_letters else 0)
    chaos_report(
        Figures(
            scenario="crash_loop",
            sent=n,
            answered=answered,
            lost=n - answered,
            duplicated=counted.duplicated,
            duplicate_bound=MAX_DEATHS * MAX_IN_FLIGHT,
            failed=counted.failed,
            wall_s=time.monotonic() - started,
            wall_bound_s=WALL_BOUND_S,
            dead_lettered=codes_of(d["error"]["code"] for d in letters),
        )
    )
    assert exits == [1] * MAX_DEATHS + [0], f"exit codes of successive lives: {exits}\n{proc.log_tail()}"
    assert deaths == runs_of_killer == MAX_DEATHS, "the killer ran again after the last allowed death"
    assert [(d["source_topic"], d["partition"], d["offset"], d["error"]["code"]) for d in letters] == [
        (topics.ocr_requests, 0, KILLER_AT, "crash_loop")
    ]
    assert killer_id not in {json.loads(r.value)["request_id"] for r in results}
    assert counted.lost == 0, f"lost {counted.lost}: {counted.missing}"
    assert counted.failed == 0
    assert counted.duplicated <= MAX_DEATHS * MAX_IN_FLIGHT
    assert await committed_offsets(bootstrap, group_id, topics.ocr_requests) == ends
