"""Bulk histogram observations, loop-thread metrics and collector tuning: the event path's shortcuts must not change
what is exported."""

from __future__ import annotations

import gc
import re
from collections.abc import Callable, Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from ocrbooth.daemon.gctune import tune_gc
from ocrbooth.metrics import LoopCounter, LoopHistogram, Metrics, observe_many

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


def _exposition(registry: CollectorRegistry, generate: Callable[[CollectorRegistry], bytes]) -> str:
    """The exposition with every `_created` timestamp (the series' creation time) replaced by a placeholder."""
    return re.sub(r"(_created(?:\{[^}]*\})?) \S+", r"\1 CREATED", generate(registry).decode())


@pytest.mark.parametrize("generate", [generate_latest, generate_openmetrics], ids=["text", "openmetrics"])
def test_loop_metrics_export_exactly_what_prometheus_client_exports(
    generate: Callable[[CollectorRegistry], bytes],
) -> None:
    """The loop-thread counter and histogram expose the same families, samples, label sets, bucket bounds, values
    and order as prometheus_client's Counter and Histogram given the same updates: series created at zero, bounds
    hit exactly, values above every bound, zero, label values that are not strings."""
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    buckets = (0.001, 0.01, 0.1, 1, 2.5, 60, 3600)
    counters = (
        Counter("x_handled_messages_total", "Messages, by outcome.", ["topic", "outcome"], registry=theirs),
        LoopCounter("x_handled_messages_total", "Messages, by outcome.", ["topic", "outcome"], registry=ours),
    )
    histograms = (
        Histogram("x_latency_seconds", "Latency.", ["topic"], buckets=buckets, registry=theirs),
        LoopHistogram("x_latency_seconds", "Latency.", ["topic"], buckets=buckets, registry=ours),
    )
    for counter in counters:
        counter.labels("a", "succeeded")  # exported at zero before any update
        counter.labels("a", "failed").inc()
        counter.labels("b", 7).inc(2.5)
        counter.labels("a", "failed").inc(0)
    for histogram in histograms:
        histogram.labels("idle")
        child = histogram.labels("a")
        for amount in (0.0, 0.0005, 0.001, 0.0011, 0.1, 2.5, 59.9, 3600, 3600.5, 1e9):
            child.observe(amount)
        observe_many(histogram.labels(42), 0.02, 3)
    assert _exposition(ours, generate) == _exposition(theirs, generate)


def test_loop_metrics_refuse_what_prometheus_client_refuses() -> None:
    """A wrong number of label values, a negative increment and unsorted buckets raise ValueError, as there."""
    registry = CollectorRegistry()
    counter = LoopCounter("c_total", "c", ["topic"], registry=registry)
    histogram = LoopHistogram("h_seconds", "h", ["topic"], buckets=(1, 2), registry=registry)
    with pytest.raises(ValueError, match="label count"):
        counter.labels("a", "b")
    with pytest.raises(ValueError, match="label count"):
        histogram.labels()
    with pytest.raises(ValueError, match="non-negative"):
        counter.labels("a").inc(-1)
    with pytest.raises(ValueError, match="sorted"):
        LoopHistogram("u_seconds", "u", [], buckets=(2, 1), registry=registry)
    with pytest.raises(ValueError, match="Duplicated"):
        LoopCounter("c_total", "again", ["topic"], registry=registry)  # the registry sees its names


def test_the_per_message_metrics_are_the_loop_metrics_and_keep_their_names() -> None:
    """The four series updated for every message are loop-thread metrics, under their documented names and labels;
    the rest stays prometheus_client's."""
    metrics = Metrics(CollectorRegistry())
    assert isinstance(metrics.handled, LoopCounter)
    assert isinstance(metrics.produced, LoopCounter)
    assert isinstance(metrics.handle_seconds, LoopHistogram)
    assert isinstance(metrics.publish_seconds, LoopHistogram)
    assert (metrics.handled.name, metrics.handled.labelnames) == ("ocrbooth_handled_messages", ("topic", "outcome"))
    assert (metrics.produced.name, metrics.produced.labelnames) == ("ocrbooth_produced_messages", ("topic", "outcome"))
    assert metrics.handle_seconds.labelnames == metrics.publish_seconds.labelnames == ("topic",)
    metrics.init_topics(["in"], ["out"])
    registry = metrics.registry
    assert registry.get_sample_value("ocrbooth_handled_messages_total", {"topic": "in", "outcome": "requeued"}) == 0
    assert registry.get_sample_value("ocrbooth_produced_messages_total", {"topic": "out", "outcome": "acked"}) == 0
    assert registry.get_sample_value("ocrbooth_handle_duration_seconds_count", {"topic": "in"}) == 0
    assert registry.get_sample_value("ocrbooth_publish_duration_seconds_bucket", {"topic": "out", "le": "+Inf"}) == 0


def test_observing_several_values_at_once_equals_observing_them_one_by_one() -> None:
    """`observe_each` (the latencies of messages acknowledged together) gives the buckets and, to the last bit,
    the sum of `observe` per value in the same order; NaN lands in no bucket."""
    registry = CollectorRegistry()
    histogram = LoopHistogram("e_seconds", "e", ["topic"], buckets=(0.001, 0.01, 0.1, 1), registry=registry)
    values = [0.1, 0.2, 0.3, 1e-9, 0.01, 0.0105, 7.0, float("nan"), 0.001, 1 / 3]
    one, together = histogram.labels("a"), histogram.labels("b")
    for value in values:
        one.observe(value)
    together.observe_each(values)
    assert together.counts == one.counts
    assert repr(together.sum) == repr(one.sum)
    finite = [v for v in values if v == v]
    together.observe_each(finite)
    for value in finite:
        one.observe(value)
    assert together.counts == one.counts
    assert repr(together.sum) == repr(one.sum)
