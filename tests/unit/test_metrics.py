"""Bulk histogram observations and collector tuning: the event path's shortcuts must not change what is exported."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Histogram

from ocrbooth.daemon.gctune import tune_gc
from ocrbooth.metrics import observe_many

BUCKETS = (0.01, 0.1, 1.0, 10.0)


@pytest.mark.parametrize(
    ("observations", "cumulative"),
    [
        ([(0.005, 3)], [3, 3, 3, 3, 3]),
        ([(0.05, 1), (0.5, 7), (5.0, 2)], [0, 1, 8, 10, 10]),
        ([(0.1, 4)], [0, 4, 4, 4, 4]),  # exactly on a bucket bound: counted in that bucket (le is inclusive)
        ([(50.0, 5)], [0, 0, 0, 0, 5]),  # above every bound: only +Inf
        ([(0.2, 0), (0.3, 2)], [0, 0, 2, 2, 2]),  # a count of zero changes nothing
    ],
)
def test_observe_many_exports_count_sum_and_cumulative_buckets(
    observations: list[tuple[float, int]], cumulative: list[int]
) -> None:
    """`count` observations of one amount land in the exported buckets, _count and _sum as that many observes."""
    registry = CollectorRegistry()
    histogram = Histogram("latency_seconds", "test", ["topic"], buckets=BUCKETS, registry=registry)
    for amount, count in observations:
        observe_many(histogram.labels("t"), amount, count)
    buckets = [
        registry.get_sample_value("latency_seconds_bucket", {"topic": "t", "le": le})
        for le in ("0.01", "0.1", "1.0", "10.0", "+Inf")
    ]
    assert buckets == cumulative
    assert registry.get_sample_value("latency_seconds_count", {"topic": "t"}) == cumulative[-1]
    total = registry.get_sample_value("latency_seconds_sum", {"topic": "t"})
    assert total == pytest.approx(sum(amount * count for amount, count in observations))


@pytest.fixture
def restored_gc() -> Iterator[None]:
    """Put the collector's thresholds back and unfreeze after the test."""
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restored_gc")
def test_tune_gc_sets_threshold_and_freezes() -> None:
    """A positive gen0 threshold replaces only generation 0's, and freeze moves startup objects out of the GC."""
    gc.unfreeze()
    _, gen1, gen2 = gc.get_threshold()
    tune_gc(gen0_threshold=12_345, freeze=True)
    assert gc.get_threshold() == (12_345, gen1, gen2)
    assert gc.get_freeze_count() > 0


@pytest.mark.usefixtures("restored_gc")
def test_tune_gc_zero_keeps_interpreter_thresholds() -> None:
    """A threshold of 0 leaves the interpreter's thresholds alone, and freeze=False freezes nothing."""
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
