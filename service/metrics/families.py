"""Every Prometheus metric family seqserve exports: names, help, labels and buckets, on the
server's own `CollectorRegistry` (never the process-global one, so two servers in one test
process do not collide and nothing leaks in from imported libraries). `Metrics`
(`prometheus_metrics.py`) records facts into them."""

from __future__ import annotations

import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from service.metrics.batch_histogram import BatchHistogram
from service.metrics.bounds import (
    BATCH_ROWS_BUCKETS,
    DAMAGED_RECORD_KINDS,
    GC_GENERATIONS,
    LATENCY_BUCKETS,
    MODEL_LOAD_BUCKETS,
    REFUSAL_REASONS,
    SESSION_TIERS,
    TIERS,
    WRITE_FAILURE_KINDS,
)

MV = ("model", "version")


class MetricFamilies:
    """The registry and its families, every bounded series created at zero."""

    def __init__(self, *, process_collectors: bool = True) -> None:
        """`process_collectors`: also export the standard process_*, python_* series (CPU,
        RSS, GC) on this registry. Tests that compare whole expositions turn them off."""
        # No `*_created` series: in the text format Prometheus stores each as one more plain
        # series per counter / histogram child, and nothing here reads them. Process-wide.
        prometheus_client.disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        if process_collectors:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)

        self._rpc_duration = Histogram(
            "seqserve_rpc_duration_seconds",
            "Call duration, receipt to final status, by method, gRPC status code and protocol "
            "(grpc, or http: the HTTP/JSON API's routes count as the methods they call).",
            ("method", "code", "protocol"), buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self._refusals = Counter(
            "seqserve_refusals",
            "Calls refused with RESOURCE_EXHAUSTED (also counted under that code above), by "
            "their ErrorInfo reason: the server out of capacity (SESSION_LIMIT, QUEUE_FULL, "
            "MEMORY_EXHAUSTED) or one principal over its own quota (QUOTA_EXCEEDED).",
            ("reason",), registry=r,
        )  # fmt: skip
        self._stream_items = Counter(
            "seqserve_stream_items",
            "Items read from Stream messages (each a feed or a generation of one session; "
            "a Stream call is one RPC above however many items it carries).",
            registry=r,
        )
        self._stream_item_errors = Counter(
            "seqserve_stream_item_errors",
            "Stream items answered with an error in-band (the stream went on), by gRPC status "
            "code and, for RESOURCE_EXHAUSTED, the ErrorInfo reason as in seqserve_refusals "
            '(empty for other codes).',
            ("code", "reason"), registry=r,
        )  # fmt: skip
        self._batch_rows = BatchHistogram(
            "seqserve_batch_rows",
            "Rows (sessions) in one batched model step.",
            MV, BATCH_ROWS_BUCKETS, r,
        )  # fmt: skip
        self._step_phase = BatchHistogram(
            "seqserve_step_phase_seconds",
            "Compute time of one batched step, by phase (gather, forward, scatter, sample).",
            (*MV, "phase"), LATENCY_BUCKETS, r,
        )  # fmt: skip
        self._takeover = Histogram(
            "seqserve_takeover_seconds",
            "Taking a session over from the shared state tier: claim, read, version load.",
            MV, buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self._step = BatchHistogram(
            "seqserve_step_duration_seconds",
            "Wall time of one batched step as the scheduler sees it, thread hop included.",
            MV, LATENCY_BUCKETS, r,
        )  # fmt: skip
        self._queue_wait = BatchHistogram(
            "seqserve_queue_wait_seconds",
            "Time a fed chunk waited in the step queue before its step started.",
            MV, LATENCY_BUCKETS, r,
        )  # fmt: skip
        self._step_latency = BatchHistogram(
            "seqserve_step_latency_seconds",
            "Server latency of one step request: request received to reply ready.",
            MV, LATENCY_BUCKETS, r,
        )  # fmt: skip
        self._time_to_first_token = BatchHistogram(
            "seqserve_time_to_first_token_seconds",
            "Generation start to the first sampled token.",
            MV, LATENCY_BUCKETS, r,
        )  # fmt: skip
        self._inter_token = BatchHistogram(
            "seqserve_inter_token_latency_seconds",
            "Gap between consecutive generated tokens of one generation.",
            MV, LATENCY_BUCKETS, r,
        )  # fmt: skip
        self._tokens_in = Counter(
            "seqserve_tokens_in", "Inputs (tokens or frames) consumed from clients.", MV,
            registry=r,
        )  # fmt: skip
        self._tokens_generated = Counter(
            "seqserve_tokens_generated", "Tokens sampled by generations.", MV, registry=r
        )
        self._step_cpu = Counter(
            "seqserve_step_cpu_seconds",
            "CPU time of batched steps, on the thread that ran each (gather, forward, scatter, "
            "sampling and predictions; not the time other threads ran meanwhile).",
            MV, registry=r,
        )  # fmt: skip
        self._session_events = Counter(
            "seqserve_session_events",
            "Session lifecycle events: created, closed, expired, evicted, restored, forked, "
            "taken_over, moved.",
            ("event", *MV), registry=r,
        )  # fmt: skip
        self._queue_depth = Gauge(
            "seqserve_queue_depth", "Steps waiting in a version's step queue.", MV, registry=r
        )
        self._sessions = Gauge(
            "seqserve_sessions",
            "Live sessions by tier (memory, spilled, replaying: journal replay pending).",
            ("tier",),
            registry=r,
        )
        self._state_bytes = Gauge(
            "seqserve_state_bytes",
            "Bytes of session state by tier: pool slots in use (memory), spill files (spilled).",
            ("tier",), registry=r,
        )  # fmt: skip
        self._write_failures = Counter(
            "seqserve_state_write_failures",
            "Writes of session state the disk refused (full, read-only, failing): `journal` "
            "(a step refused with UNAVAILABLE), `end` (a session's end record), `checkpoint` (a "
            "session's state record: an idle or periodic checkpoint, an eviction, a shutdown's "
            "write, a fork's first, its directory's fsync included; also one over the spill "
            "tier's byte cap).",
            ("kind",), registry=r,
        )  # fmt: skip
        self._damaged_records = Counter(
            "seqserve_state_damaged_records",
            "Records of session state found damaged: `journal` (at start-up: a record that "
            "fails its checksum, or bytes whole records follow; not the newest segment's torn "
            "last record, which a crash leaves; a line of the journal's `ended` file failing "
            "its checksum; with a shared tier, a record of a session's "
            "journal there, found at its takeover, once a session), `checkpoint` (a session's "
            "spill record whose header or state fails its checks, once a session: rebuilt from "
            "the journal where it holds the session's whole history, else the session is "
            "refused with DATA_LOSS).",
            ("kind",), registry=r,
        )  # fmt: skip
        self._state_writes = Counter(
            "seqserve_state_writes",
            "Session state records the state tier took (refused ones are not counted): "
            "checkpoints (idle, every N steps, at shutdown), evictions, checkpoints after a "
            "replay.",
            registry=r,
        )
        self._state_write_seconds = Counter(
            "seqserve_state_write_seconds",
            "Wall time of those writes, encoding included, on the thread that wrote them (the "
            "event loop while serving): divided by their count, what one costs.",
            registry=r,
        )
        self._pool_capacity = Gauge(
            "seqserve_state_pool_capacity_bytes",
            "Byte budget of the in-memory state pool, for the memory tier's fill ratio.",
            registry=r,
        )
        self._gc_pause = Histogram(
            "seqserve_gc_pause_seconds",
            "Python cyclic-GC collections, each the time its thread stood still, by generation "
            "(0 and 1: young collections; 2: a thaw of the frozen heap, a model load's, or a "
            "full collection Python started itself).",
            ("generation",), buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self._gc_thawed_garbage = Counter(
            "seqserve_gc_thawed_garbage_objects",
            "Unreachable objects the periodic thaw of the frozen heap found: reference cycles "
            "that died after being frozen, held until that thaw.",
            registry=r,
        )
        self._model_load = Histogram(
            "seqserve_model_load_duration_seconds",
            "Time to verify and load one model version.",
            MV, buckets=MODEL_LOAD_BUCKETS, registry=r,
        )  # fmt: skip
        self._model_info = Gauge(
            "seqserve_model_info",
            "1 for each loaded model version; labels carry its fingerprint and cell.",
            (*MV, "fingerprint", "cell"), registry=r,
        )  # fmt: skip

        # A fresh scrape shows every bounded series at zero, so rate() and the pool ratio
        # have a baseline before the first event.
        for tier in SESSION_TIERS:
            self._sessions.labels(tier).set(0)
        for tier in TIERS:
            self._state_bytes.labels(tier).set(0)
        for generation in GC_GENERATIONS:
            self._gc_pause.labels(generation)
        for kind in WRITE_FAILURE_KINDS:  # the runbook's first failure must show in increase()
            self._write_failures.labels(kind)
        for kind in DAMAGED_RECORD_KINDS:
            self._damaged_records.labels(kind)
        for reason in REFUSAL_REASONS:  # the error-ratio alert subtracts the quota ones
            self._refusals.labels(reason)
