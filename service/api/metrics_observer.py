"""Bridges the engine's plain stats and events to the Prometheus `Metrics` object."""

from __future__ import annotations

from service.engine.model_versions import LoadedVersion, VersionObserver
from service.metrics.prometheus_metrics import Metrics
from service.metrics.stats import StepStats


class MetricsObserver(VersionObserver):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def on_step(self, stats: StepStats) -> None:
        self.metrics.observe_step(stats)

    def on_token_times(
        self, model: str, version: str, ttft: float | None, gap: float | None
    ) -> None:
        if ttft is not None:
            self.metrics.observe_time_to_first_token(model, version, ttft)
        if gap is not None:
            self.metrics.observe_inter_token(model, version, gap)

    def on_request(self, model: str, version: str, seconds: float) -> None:
        self.metrics.observe_request_latency(model, version, seconds)

    def on_session_event(self, event: str, model: str, version: str) -> None:
        self.metrics.session_event(event, model, version)

    def on_loaded(self, lv: LoadedVersion) -> None:
        version = str(lv.version)
        self.metrics.observe_model_load(lv.name, version, lv.loaded.load_seconds)
        self.metrics.set_model_info(lv.name, version, lv.fingerprint, lv.config.cell, True)

    def on_unloaded(self, lv: LoadedVersion) -> None:
        self.metrics.set_model_info(lv.name, str(lv.version), lv.fingerprint, lv.config.cell, False)
