"""Bulk histogram observations and collector tuning: the event path's shortcuts must not change what is exported."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from ocrbooth.daemon.gctune import tune_gc
from ocrbooth.metrics import observe_many

BUCKETS = (0.01, 0.1, 1.0, 10.0)


def _exposition(observations: list[tuple[float, int]], *, bulk: bool) -> bytes:
    registry = CollectorRegistry()
    histogram = Histogram("latency_seconds", "test", ["topic"], buckets=BUCKETS, registry=registry)
    child = histogram.labels("t")
    for amount, count in observations:
        if bulk:
            observe_many(child, amount, count)
        else:
            for _ in range(count):
                child.observe(amount)
    # _created differs between the two registries; everything else must match.
    return b"\n".join(line for line in generate_latest(registry).splitlines() if b"_created" not in line)


@pytest.mark.parametrize(
    "observations",
    [
        [(0.005, 3)],
        [(0.05, 1), (0.5, 7), (5.0, 2)],
        [(0.1, 4)],  # exactly on a bucket bound: counted in that bucket, as observe does
        [(50.0, 5)],  # above every bound: only +Inf, count and sum
        [(0.2, 0), (0.3, 2)],  # a count of zero changes nothing
    ],
)
def test_observe_many_equals_repeated_observe(observations: list[tuple[float, int]]) -> None:
    assert _exposition(observations, bulk=True) == _exposition(observations, bulk=False)


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restored_gc")
def test_tune_gc_sets_threshold_and_freezes() -> None:
    gc.unfreeze()
    _, gen1, gen2 = gc.get_threshold()
    tune_gc(gen0_threshold=12_345, freeze=True)
    assert gc.get_threshold() == (12_345, gen1, gen2)
    assert gc.get_freeze_count() > 0


@pytest.mark.usefixtures("restored_gc")
def test_tune_gc_zero_keeps_interpreter_thresholds() -> None:
    gc.unfreeze()
    before = gc.get_threshold()
    tune_gc(gen0_threshold=0, freeze=False)
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_readme_lists_every_metric() -> None:
    """The README's metrics table names every metric family the daemon exports (and nothing else)."""
    import re
    from pathlib import Path

    from ocrbooth.metrics import Metrics

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    listed = set(re.findall(r"^\| `(ocrbooth_[a-z0-9_]+)` \|", readme, flags=re.MULTILINE))
    exported = set()
    for family in Metrics().registry.collect():
        suffix = {"counter": "_total", "info": "_info"}.get(family.type, "")
        exported.add(family.name + suffix)
    assert listed == exported
