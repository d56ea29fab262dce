"""The daemon as a real `ocrbooth run` process: killed, restarted, drained, in a group of two."""

from __future__ import annotations

import json
import random
import signal
from collections import Counter
from pathlib import Path

from tests.support.daemon import DaemonProcess, metric_value, request_event
from tests.support.kafka import committed_offsets, consume_all, high_watermarks, produce, wait_until
from tests.support.stack import TopicNames


def _handled(proc: DaemonProcess) -> float:
    try:
        return metric_value(proc.metrics(), "ocrbooth_handled_messages_total")
    except AssertionError:
        return 0.0


async def test_sigkill_and_restart_loses_nothing_and_bounds_duplicates(
    bootstrap: str, topics: TopicNames, daemon_env: dict[str, str], group_id: str, tmp_path: Path
) -> None:
    """SIGKILL at a random moment during 2,000 events, then a restart: every request has an output and
    duplicates never exceed max_in_flight."""
    n, max_in_flight = 2000, 32
    rng = random.Random()
    kill_after = rng.randint(200, 1500)
    ends = await produce(
        bootstrap,
        topics.ocr_requests,
        ((f"doc-{i}".encode(), request_event(i, **{"echo.delay_ms": str(rng.randint(1, 8))})) for i in range(n)),
    )
    env = {**daemon_env, "OCRBOOTH_MAX_IN_FLIGHT": str(max_in_flight)}
    first = DaemonProcess(env, tmp_path / "first.log").start()
    try:
        await first.wait_ready()
        await wait_until(lambda: _handled(first) >= kill_after, 120, interval_s=0.02, message=f"{kill_after} handled")
    finally:
        first.kill()
    assert first.proc is not None
    assert first.proc.returncode == -signal.SIGKILL

    second = DaemonProcess(env, tmp_path / "second.log", args=["--until-idle"]).start()
    try:
        assert await second.wait_exit(180) == 0, second.log_tail()
    finally:
        second.kill()

    results = await consume_all(bootstrap, topics.ocr_results, count=None, timeout_s=30)
    per_request = Counter(json.loads(r.value)["request_id"] for r in results)
    assert set(per_request) == {f"req-{i}" for i in range(n)}, f"killed after {kill_after}"
    duplicates = len(results) - n
    assert 0 <= duplicates <= max_in_flight, f"{duplicates} duplicates (killed after {kill_after})"
    assert await committed_offsets(bootstrap, group_id, topics.ocr_requests) == ends
    assert await high_watermarks(bootstrap, topics.ocr_requests) == ends


async def test_two_daemons_one_drains_on_sigterm_and_nothing_is_lost(
    bootstrap: str, topics: TopicNames, daemon_env: dict[str, str], tmp_path: Path
) -> None:
    """Two daemons in one group; SIGTERM to one mid-stream: it drains and exits 0, the other takes over,
    and every request gets an output."""
    n = 2000
    await produce(
        bootstrap,
        topics.ocr_requests,
        ((f"doc-{i}".encode(), request_event(i, **{"echo.delay_ms": "10"})) for i in range(n)),
    )
    env = {**daemon_env, "OCRBOOTH_MAX_IN_FLIGHT": "32", "OCRBOOTH_DRAIN_TIMEOUT_S": "15"}
    a = DaemonProcess(env, tmp_path / "a.log").start()
    b = DaemonProcess(env, tmp_path / "b.log").start()
    try:
        await a.wait_ready()
        await b.wait_ready()
        await wait_until(lambda: _handled(a) >= 100 and _handled(b) >= 100, 120, message="both daemons working")
        a.send(signal.SIGTERM)
        assert await a.wait_exit(30) == 0, a.log_tail()
        summary = [r for r in a.log_records() if r.get("msg") == "ocrbooth stopped"]
        assert len(summary) == 1, a.log_tail()
        assert summary[0]["exit_code"] == 0, a.log_tail()
        assert _handled(b) < n, "b finished everything before a stopped; the test proved nothing"

        results = await consume_all(
            bootstrap,
            topics.ocr_results,
            until=lambda recs: len({json.loads(r.value)["request_id"] for r in recs}) >= n,
            timeout_s=180,
        )
        assert {json.loads(r.value)["request_id"] for r in results} == {f"req-{i}" for i in range(n)}
        b.send(signal.SIGTERM)
        assert await b.wait_exit(30) == 0, b.log_tail()
    finally:
        a.kill()
        b.kill()


async def test_second_signal_exits_at_once(
    bootstrap: str, topics: TopicNames, daemon_env: dict[str, str], tmp_path: Path
) -> None:
    """SIGTERM starts a drain that waits for slow work; a second SIGTERM exits immediately."""
    await produce(bootstrap, topics.ocr_requests, [(b"slow", request_event(0, **{"echo.delay_ms": "60000"}))])
    proc = DaemonProcess({**daemon_env, "OCRBOOTH_DRAIN_TIMEOUT_S": "50"}, tmp_path / "d.log").start()
    try:
        await proc.wait_ready()
        await wait_until(
            lambda: metric_value(proc.metrics(), "ocrbooth_in_flight_messages") >= 1, 60, message="slow work in flight"
        )
        proc.send(signal.SIGTERM)
        await wait_until(
            lambda: any(r.get("msg") == "stopping: received SIGTERM" for r in proc.log_records()),
            10,
            message="drain started",
        )
        assert proc.proc is not None
        assert proc.proc.poll() is None, "exited before the drain deadline"
        proc.send(signal.SIGTERM)
        assert await proc.wait_exit(5) == 128 + signal.SIGTERM
    finally:
        proc.kill()
