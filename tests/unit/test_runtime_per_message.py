"""bench/runtime_per_message.py reaches into the daemon's parts to measure its per-message path without a
broker; run it once, small, so a change to those parts cannot leave the README's figures unreproducible."""

from __future__ import annotations

import math

import pytest

from bench import runtime_per_message
from ocrbooth.daemon import eventloop


@pytest.mark.usefixtures("clean_env", "restore_logging")
def test_the_per_message_benchmark_runs_every_message_to_success(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gc.freeze", lambda: None)  # keep the test process's collector as it was
    monkeypatch.setattr("gc.set_threshold", lambda *args: None)
    for name, value in {**runtime_per_message.DAEMON_ENV, "OCRBOOTH_MAX_IN_FLIGHT": "40"}.items():
        monkeypatch.setenv(name, value)  # the benchmark sets these: put back after the test
    options = runtime_per_message.parser().parse_args(
        ["--batch", "40", "--batches", "2", "--warmup", "1", "--repeat", "2", "--loop", "asyncio"]
    )
    figures = eventloop.run(runtime_per_message.main(options), "asyncio")  # asserts all 200 succeeded
    assert len(figures) == 2
    assert all(math.isfinite(f) and f > 0 for f in figures)
