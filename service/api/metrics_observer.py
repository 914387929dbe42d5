"""Bridges the engine's plain stats and events to the Prometheus `Metrics` object."""

from __future__ import annotations

import asyncio

from service.engine.served_version import ServedVersion, VersionObserver
from service.metrics.prometheus_metrics import Metrics
from service.metrics.stats import StepStats

# How long an unloaded version keeps its series before they are dropped. Prometheus must scrape
# the final counts at least once after the last event, or increase() over that window loses
# them; five minutes is several scrapes at any usual interval (the stack scrapes every 5 s).
FORGET_AFTER_SECONDS = 300.0


class MetricsObserver(VersionObserver):
    def __init__(self, metrics: Metrics, *, forget_after_s: float = FORGET_AFTER_SECONDS) -> None:
        self.metrics = metrics
        self._forget_after_s = forget_after_s
        self._forgetting: dict[tuple[str, str], asyncio.TimerHandle] = {}

    def on_step(self, stats: StepStats) -> None:
        self.metrics.observe_step(stats)

    def on_token_times(
        self, model: str, version: str, firsts: list[float], gaps: list[float]
    ) -> None:
        if firsts:
            self.metrics.observe_times_to_first_token(model, version, firsts)
        if gaps:
            self.metrics.observe_inter_tokens(model, version, gaps)

    def on_request(self, model: str, version: str, seconds: float, count: int = 1) -> None:
        self.metrics.observe_request_latency(model, version, seconds, count)

    def on_session_event(self, event: str, model: str, version: str) -> None:
        self.metrics.session_event(event, model, version)

    def on_takeover(self, model: str, version: str, seconds: float) -> None:
        self.metrics.observe_takeover(model, version, seconds)

    def on_loaded(self, served: ServedVersion) -> None:
        version = str(served.version)
        pending = self._forgetting.pop((served.name, version), None)
        if pending is not None:  # loaded again before its series were dropped: keep them
            pending.cancel()
        self.metrics.observe_model_load(served.name, version, served.model.load_seconds)
        self.metrics.set_model_info(
            served.name, version, served.fingerprint, served.config.cell, True
        )

    def on_unloaded(self, served: ServedVersion) -> None:
        """Drop the info series now, and every other series of the version a while later.

        Without the second step each version ever loaded would keep its series until restart:
        a long-running server that rolls out a new version a day grows without bound.
        """
        key = (served.name, str(served.version))
        self.metrics.set_model_info(*key, served.fingerprint, served.config.cell, False)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a synchronous caller): keep the series
            return
        pending = self._forgetting.pop(key, None)
        if pending is not None:
            pending.cancel()
        self._forgetting[key] = loop.call_later(self._forget_after_s, self._forget, key)

    def close(self) -> None:
        """Cancel pending forgets: the server is stopping and its registry goes with it."""
        for pending in self._forgetting.values():
            pending.cancel()
        self._forgetting.clear()

    def _forget(self, key: tuple[str, str]) -> None:
        self._forgetting.pop(key, None)
        self.metrics.forget_version(*key)
