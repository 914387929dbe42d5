"""`BatchHistogram`: bucket placement, batch vs single observes, exposition, thread safety."""

from __future__ import annotations

import threading

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from service.metrics.batch_histogram import BatchHistogram


def _buckets(registry: CollectorRegistry, name: str, **labels: str) -> dict[str, float]:
    return {
        s.labels["le"]: s.value
        for family in registry.collect()
        for s in family.samples
        if s.name == f"{name}_bucket" and labels.items() <= s.labels.items()
    }


def test_matches_the_library_histogram() -> None:
    values = [0.0, 0.001, 0.0015, 0.002, 0.0025, 0.5, 3.0, 42.0]
    bounds = (0.001, 0.002, 0.5, 10.0)
    ours_registry, theirs_registry = CollectorRegistry(), CollectorRegistry()
    ours = BatchHistogram("h_seconds", "doc", ("model",), bounds, ours_registry)
    theirs = Histogram("h_seconds", "doc", ("model",), buckets=bounds, registry=theirs_registry)

    ours.labels("a").observe_many(values[:4])
    for v in values[4:]:
        ours.labels("a").observe(v)
    for v in values:
        theirs.labels("a").observe(v)

    assert _buckets(ours_registry, "h_seconds") == _buckets(theirs_registry, "h_seconds")
    assert _buckets(ours_registry, "h_seconds") == {
        "0.001": 2,  # le is inclusive: 0.001 counts here
        "0.002": 4,
        "0.5": 6,
        "10.0": 7,
        "+Inf": 8,
    }
    ours_sum = [
        s.value for f in ours_registry.collect() for s in f.samples if s.name.endswith("_sum")
    ]
    assert ours_sum == [pytest.approx(sum(values))]


def test_exposes_count_and_sum_per_label_set() -> None:
    registry = CollectorRegistry()
    hist = BatchHistogram("h_seconds", "doc", ("model", "version"), (0.1, 1.0), registry)
    hist.labels("a", "1").observe_many([0.05, 0.5])
    hist.labels("b", "1")  # created at zero

    text = generate_latest(registry).decode()

    assert 'h_seconds_count{model="a",version="1"} 2.0' in text
    assert 'h_seconds_sum{model="a",version="1"} 0.55' in text
    assert 'h_seconds_count{model="b",version="1"} 0.0' in text


def test_remove_drops_the_series() -> None:
    registry = CollectorRegistry()
    hist = BatchHistogram("h_seconds", "doc", ("model",), (1.0,), registry)
    hist.labels("a").observe(0.5)
    hist.remove("a")
    hist.remove("never-there")

    assert _buckets(registry, "h_seconds") == {}


def test_rejects_bad_buckets_and_label_counts() -> None:
    registry = CollectorRegistry()
    with pytest.raises(ValueError, match="strictly increasing"):
        BatchHistogram("h_seconds", "doc", ("m",), (1.0, 0.5), registry)
    hist = BatchHistogram("h_seconds", "doc", ("m",), (1.0,), registry)
    with pytest.raises(ValueError, match="expected labels"):
        hist.labels("a", "b")


def test_duplicate_name_rejected_by_registry() -> None:
    registry = CollectorRegistry()
    BatchHistogram("h_seconds", "doc", ("m",), (1.0,), registry)
    with pytest.raises(ValueError, match="Duplicated"):
        BatchHistogram("h_seconds", "doc", ("m",), (1.0,), registry)


def test_concurrent_batches_lose_nothing() -> None:
    registry = CollectorRegistry()
    hist = BatchHistogram("h_seconds", "doc", ("m",), (0.5,), registry)
    series = hist.labels("a")

    def work() -> None:
        for _ in range(500):
            series.observe_many([0.1, 0.9])
            generate_latest(registry)  # scrapes race with observes

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert _buckets(registry, "h_seconds") == {"0.5": 2000, "+Inf": 4000}
