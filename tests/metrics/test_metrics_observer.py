"""`MetricsObserver`: an unloaded version's series are dropped after a delay, unless it is loaded
again first; the server's stop cancels what is pending."""

from __future__ import annotations

from types import SimpleNamespace
from typing import cast

from prometheus_client.parser import text_string_to_metric_families

from service.api.metrics_observer import MetricsObserver
from service.engine.served_version import ServedVersion
from service.metrics import Metrics, StepStats
from tests.polling import until


def _version(name: str, version: int) -> ServedVersion:
    """A stand-in with only what the observer reads: no model, pool or scheduler."""
    lv = SimpleNamespace(
        name=name, version=version, fingerprint=f"fp-{name}-{version}",
        model=SimpleNamespace(load_seconds=0.05), config=SimpleNamespace(cell="gru"),
    )  # fmt: skip
    return cast(ServedVersion, lv)


def _label_sets(metrics: Metrics) -> set[tuple[str, str, str]]:
    """(sample name, model, version) of every sample that carries a model label."""
    text = metrics.render().decode()
    return {
        (s.name, s.labels["model"], s.labels["version"])
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if "model" in s.labels
    }


def _has_version(metrics: Metrics, name: str, version: str) -> set[str]:
    return {s for s, m, v in _label_sets(metrics) if (m, v) == (name, version)}


def _load_and_step(observer: MetricsObserver, lv: ServedVersion) -> None:
    observer.on_loaded(lv)
    observer.on_step(
        StepStats(model=lv.name, version=str(lv.version), rows=2, tokens_in=3, tokens_generated=1)
    )
    observer.on_session_event("created", lv.name, str(lv.version))


async def _wait_until_gone(metrics: Metrics, name: str, version: str) -> None:
    await until(
        lambda: not _has_version(metrics, name, version),
        10,
        f"{name}:{version} series to be dropped",
    )


async def test_unloaded_version_keeps_its_series_for_a_while_then_drops_them() -> None:
    metrics = Metrics(process_collectors=False)
    observer = MetricsObserver(metrics, forget_after_s=0.02)
    lv = _version("text", 1)
    _load_and_step(observer, lv)

    observer.on_unloaded(lv)

    # At once: the info series goes (nothing is loaded), the counts stay for the last scrape.
    names = _has_version(metrics, "text", "1")
    assert "seqserve_model_info" not in names
    assert {"seqserve_tokens_in_total", "seqserve_session_events_total"} <= names
    await _wait_until_gone(metrics, "text", "1")


async def test_loading_again_cancels_the_drop() -> None:
    metrics = Metrics(process_collectors=False)
    observer = MetricsObserver(metrics, forget_after_s=0.02)
    text1, other = _version("text", 1), _version("other", 1)
    _load_and_step(observer, text1)
    observer.on_unloaded(text1)
    observer.on_loaded(text1)

    # A later drop as the barrier: once it has happened, text:1's would have too.
    _load_and_step(observer, other)
    observer.on_unloaded(other)
    await _wait_until_gone(metrics, "other", "1")

    names = _has_version(metrics, "text", "1")
    assert {"seqserve_model_info", "seqserve_tokens_in_total"} <= names


async def test_close_cancels_pending_drops() -> None:
    metrics = Metrics(process_collectors=False)
    observer = MetricsObserver(metrics, forget_after_s=0.02)
    text1, other = _version("text", 1), _version("other", 1)
    _load_and_step(observer, text1)
    observer.on_unloaded(text1)

    observer.close()

    _load_and_step(observer, other)
    observer.on_unloaded(other)
    await _wait_until_gone(metrics, "other", "1")
    assert "seqserve_tokens_in_total" in _has_version(metrics, "text", "1")


def test_without_an_event_loop_series_are_kept() -> None:
    metrics = Metrics(process_collectors=False)
    observer = MetricsObserver(metrics, forget_after_s=0.0)
    lv = _version("text", 1)
    _load_and_step(observer, lv)

    observer.on_unloaded(lv)

    names = _has_version(metrics, "text", "1")
    assert "seqserve_model_info" not in names and "seqserve_tokens_in_total" in names
