"""The one class that records seqserve's facts as Prometheus series, and serves them.

The engine, session store and API layer report plain facts (`StepStats`, an RPC's code and
duration, a session event); `Metrics` turns them into series of the families `families.py`
defines, on the server's own registry. Names carry the `seqserve_` prefix and base units (seconds,
bytes). Labels are bounded — method, code, model, version, tier, event, phase, reason — and never
a session id: a session label would create a series per user and take Prometheus down.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import prometheus_client
from prometheus_client import (
    Counter,
    Gauge,
)

from service.metrics.batch_histogram import HistogramSeries
from service.metrics.bounds import (
    GRPC_CODES,
    PHASES,
    PROTOCOLS,
    REFUSAL_REASONS,
    SESSION_EVENTS,
    SESSION_TIERS,
    check_tier,
)
from service.metrics.families import MetricFamilies
from service.metrics.http_endpoint import MetricsEndpoint
from service.metrics.stats import StepStats


@dataclass(slots=True)
class _VersionSeries:
    """Children for one (model, version), resolved once: `labels()` per observation is the
    dominant cost on the hot path otherwise."""

    batch_rows: HistogramSeries
    phase: dict[str, HistogramSeries]
    step: HistogramSeries
    queue_wait: HistogramSeries
    step_latency: HistogramSeries
    time_to_first_token: HistogramSeries
    inter_token: HistogramSeries
    tokens_in: Counter
    tokens_generated: Counter
    step_cpu: Counter
    session_events: dict[str, Counter]
    queue_depth: Gauge


class Metrics(MetricFamilies):
    """Records seqserve's facts as Prometheus series; serves or renders the exposition."""

    def __init__(self, *, process_collectors: bool = True) -> None:
        """`process_collectors`: also export the standard process_*, python_* series (CPU,
        RSS, GC) on this registry. Tests that compare whole expositions turn them off."""
        super().__init__(process_collectors=process_collectors)
        self._write_failures_seen: dict[str, int] = {}
        self._damaged_records_seen: dict[str, int] = {}
        self._state_writes_seen = 0
        self._state_write_seconds_seen = 0.0
        self._versions: dict[tuple[str, str], _VersionSeries] = {}
        self._versions_lock = threading.Lock()
        self._info_labels: dict[tuple[str, str], tuple[str, str]] = {}  # -> (fingerprint, cell)
        self._endpoint = MetricsEndpoint(self.registry)

    # ---- requests and steps ------------------------------------------------------------

    def observe_rpc(
        self, method: str, code: str, seconds: float, protocol: str = "grpc", reason: str = ""
    ) -> None:
        """One finished call. `method` is the short RPC name, `code` a gRPC status name,
        `protocol` `grpc` or `http`, `reason` the ErrorInfo reason a failed call carried.

        A RESOURCE_EXHAUSTED call is also counted by its reason: the code alone cannot tell
        a server out of capacity from one client over its own quota, and only the first is
        a server failure (the error-ratio alert subtracts the second)."""
        if code not in GRPC_CODES:
            raise ValueError(f"not a gRPC status code name: {code!r}")
        if protocol not in PROTOCOLS:
            raise ValueError(f"not a protocol: {protocol!r}")
        self._rpc_duration.labels(method, code, protocol).observe(seconds)
        if code == "RESOURCE_EXHAUSTED":
            self._refusals.labels(_refusal_reason(reason)).inc()

    def observe_stream_items(self, count: int) -> None:
        """`count` items read from a Stream message."""
        self._stream_items.inc(count)

    def observe_stream_item_errors(self, code: str, reason: str, count: int) -> None:
        """`count` Stream items answered in-band with the status `code` (a gRPC status name)
        and ErrorInfo `reason`: kept only for RESOURCE_EXHAUSTED, bounded as for calls."""
        if code not in GRPC_CODES:
            raise ValueError(f"not a gRPC status code name: {code!r}")
        reason = _refusal_reason(reason) if code == "RESOURCE_EXHAUSTED" else ""
        self._stream_item_errors.labels(code, reason).inc(count)

    def observe_step(self, stats: StepStats) -> None:
        """One batched step of one model version."""
        s = self._series(stats.model, stats.version)
        s.batch_rows.observe(stats.rows)
        s.phase["gather"].observe(stats.gather_seconds)
        s.phase["forward"].observe(stats.forward_seconds)
        s.phase["scatter"].observe(stats.scatter_seconds)
        s.phase["sample"].observe(stats.sample_seconds)
        s.step.observe(stats.total_seconds)
        s.step_cpu.inc(stats.cpu_seconds)
        if stats.queue_wait_seconds:
            s.queue_wait.observe_many(stats.queue_wait_seconds)
        if stats.tokens_in:
            s.tokens_in.inc(stats.tokens_in)
        if stats.tokens_generated:
            s.tokens_generated.inc(stats.tokens_generated)

    def observe_request_latency(
        self, model: str, version: str, seconds: float, count: int = 1
    ) -> None:
        """`count` step requests, each received → reply ready in `seconds`."""
        self._series(model, version).step_latency.observe(seconds, count)

    def observe_times_to_first_token(
        self, model: str, version: str, seconds: Iterable[float]
    ) -> None:
        """The first tokens of every generation that started in one step, in one call."""
        self._series(model, version).time_to_first_token.observe_many(seconds)

    def observe_inter_tokens(self, model: str, version: str, seconds: Iterable[float]) -> None:
        """The gaps of every generation that advanced in one step, in one call."""
        self._series(model, version).inter_token.observe_many(seconds)

    def set_queue_depth(self, model: str, version: str, depth: int) -> None:
        self._series(model, version).queue_depth.set(depth)

    # ---- sessions and state ------------------------------------------------------------

    def session_event(self, event: str, model: str, version: str) -> None:
        """Count a lifecycle event; `event` is one of `SESSION_EVENTS`."""
        counter = self._series(model, version).session_events.get(event)
        if counter is None:
            raise ValueError(f"unknown session event {event!r}; expected one of {SESSION_EVENTS}")
        counter.inc()

    def observe_takeover(self, model: str, version: str, seconds: float) -> None:
        self._takeover.labels(model, version).observe(seconds)

    def set_sessions(self, tier: str, count: int) -> None:
        self._sessions.labels(check_tier(tier, SESSION_TIERS)).set(count)

    def set_state_bytes(self, tier: str, nbytes: int) -> None:
        self._state_bytes.labels(check_tier(tier)).set(nbytes)

    def set_state_write_failures(self, kind: str, total: int) -> None:
        """Bring the counter up to `total` failed writes of `kind` (the engine counts them)."""
        seen = self._write_failures_seen.get(kind, 0)
        if total > seen:
            self._write_failures.labels(kind).inc(total - seen)
            self._write_failures_seen[kind] = total

    def set_damaged_records(self, kind: str, total: int) -> None:
        """Bring the counter up to `total` damaged records of `kind` (the engine counts them)."""
        seen = self._damaged_records_seen.get(kind, 0)
        if total > seen:
            self._damaged_records.labels(kind).inc(total - seen)
            self._damaged_records_seen[kind] = total

    def set_state_writes(self, total: int, seconds: float) -> None:
        """Bring the write counters up to the engine's totals (`total` records, `seconds`)."""
        if total > self._state_writes_seen:
            self._state_writes.inc(total - self._state_writes_seen)
            self._state_writes_seen = total
        if seconds > self._state_write_seconds_seen:
            self._state_write_seconds.inc(seconds - self._state_write_seconds_seen)
            self._state_write_seconds_seen = seconds

    def set_pool_capacity_bytes(self, nbytes: int) -> None:
        self._pool_capacity.set(nbytes)

    # ---- the process -------------------------------------------------------------------

    def observe_gc_pauses(self, pauses: Iterable[tuple[int, float]]) -> None:
        """Collections timed by `HeapFreezer`: (generation, seconds) each."""
        for generation, seconds in pauses:
            self._gc_pause.labels(str(generation)).observe(seconds)

    def count_thawed_garbage(self, objects: int) -> None:
        self._gc_thawed_garbage.inc(objects)

    # ---- models ------------------------------------------------------------------------

    def observe_model_load(self, model: str, version: str, seconds: float) -> None:
        self._model_load.labels(model, version).observe(seconds)

    def set_model_info(
        self, model: str, version: str, fingerprint: str, cell: str, loaded: bool
    ) -> None:
        """Mark a version loaded (info series = 1) or unloaded (info series removed).

        Loading also creates the version's series at zero, so its counters have a baseline
        for rate() before the first step.
        """
        key = (model, version)
        with self._versions_lock:
            previous = self._info_labels.pop(key, None)
            if previous is not None:
                self._model_info.remove(model, version, *previous)
            if loaded:
                self._model_info.labels(model, version, fingerprint, cell).set(1)
                self._info_labels[key] = (fingerprint, cell)
        if loaded:
            self._series(model, version)
        elif (series := self._versions.get(key)) is not None:
            # An unloaded version queues nothing; its last depth would otherwise stay frozen.
            series.queue_depth.set(0)

    def forget_version(self, model: str, version: str) -> None:
        """Drop every series of a version that is gone for good (its last session ended).

        Optional: without it each version ever loaded keeps its series until restart. Call it
        at least one scrape interval after the version's final events, or they go unseen.
        """
        self.set_model_info(model, version, "", "", loaded=False)
        with self._versions_lock:
            if self._versions.pop((model, version), None) is None:
                return
        labels = (model, version)
        for family in (self._batch_rows, self._step, self._step_cpu, self._tokens_in,
                       self._tokens_generated,
                       self._queue_depth, self._model_load, self._queue_wait, self._step_latency,
                       self._time_to_first_token, self._inter_token):  # fmt: skip
            family.remove(*labels)
        for phase in PHASES:
            self._step_phase.remove(*labels, phase)
        for event in SESSION_EVENTS:
            self._session_events.remove(event, *labels)
        with contextlib.suppress(KeyError):  # made on the first takeover only
            self._takeover.remove(*labels)

    # ---- exposition --------------------------------------------------------------------

    def render(self) -> bytes:
        """The registry in the Prometheus text exposition format."""
        return prometheus_client.generate_latest(self.registry)

    def start_http_server(
        self, host: str, port: int, ready: Callable[[], bool] = lambda: True, **tls: Any
    ) -> int:
        """Serve `/metrics`, `/healthz` (live) and `/readyz` (200 while `ready()`, else 503) on
        a daemon thread, 404 elsewhere; returns the bound port (`port=0` picks one).
        `tls`: certfile, keyfile, client_cafile (see `MetricsEndpoint.start`)."""
        return self._endpoint.start(host, port, ready=ready, **tls)

    def stop(self) -> None:
        """Stop the HTTP server, if running, and release its port. Safe to call twice."""
        self._endpoint.stop()

    # ---- internals ---------------------------------------------------------------------

    def _series(self, model: str, version: str) -> _VersionSeries:
        key = (model, version)
        series = self._versions.get(key)  # lock-free fast path: a dict read is atomic
        if series is not None:
            return series
        with self._versions_lock:
            series = self._versions.get(key)
            if series is None:
                series = self._versions[key] = _VersionSeries(
                    batch_rows=self._batch_rows.labels(model, version),
                    phase={p: self._step_phase.labels(model, version, p) for p in PHASES},
                    step=self._step.labels(model, version),
                    queue_wait=self._queue_wait.labels(model, version),
                    step_latency=self._step_latency.labels(model, version),
                    time_to_first_token=self._time_to_first_token.labels(model, version),
                    inter_token=self._inter_token.labels(model, version),
                    tokens_in=self._tokens_in.labels(model, version),
                    tokens_generated=self._tokens_generated.labels(model, version),
                    step_cpu=self._step_cpu.labels(model, version),
                    session_events={
                        e: self._session_events.labels(e, model, version) for e in SESSION_EVENTS
                    },
                    queue_depth=self._queue_depth.labels(model, version),
                )
        return series


def _refusal_reason(reason: str) -> str:
    """A RESOURCE_EXHAUSTED error's `reason` label: its ErrorInfo reason, bounded (OTHER for
    any the table does not name)."""
    return reason if reason in REFUSAL_REASONS else "OTHER"
