"""`Metrics`: what each method records, the exposition's shape, `promtool check metrics`, and
the HTTP endpoint."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from service.errors import REASONS
from service.metrics import Metrics, StepStats
from service.metrics.bounds import (
    CAPACITY_REASONS,
    LATENCY_BUCKETS,
    PHASES,
    QUOTA_REASON,
    REFUSAL_REASONS,
    SESSION_EVENTS,
    WRITE_FAILURE_KINDS,
)

BOUNDED_LABELS = {
    "method", "code", "protocol", "model", "version", "tier", "event", "phase", "generation", "le",
    "kind", "reason",
}  # fmt: skip
FAMILIES = {
    "seqserve_rpc_duration_seconds": "histogram",
    "seqserve_refusals": "counter",
    "seqserve_stream_items": "counter",
    "seqserve_stream_item_errors": "counter",
    "seqserve_batch_rows": "histogram",
    "seqserve_step_phase_seconds": "histogram",
    "seqserve_step_duration_seconds": "histogram",
    "seqserve_takeover_seconds": "histogram",
    "seqserve_queue_wait_seconds": "histogram",
    "seqserve_step_latency_seconds": "histogram",
    "seqserve_time_to_first_token_seconds": "histogram",
    "seqserve_inter_token_latency_seconds": "histogram",
    "seqserve_tokens_in": "counter",
    "seqserve_tokens_generated": "counter",
    "seqserve_step_cpu_seconds": "counter",
    "seqserve_session_events": "counter",
    "seqserve_queue_depth": "gauge",
    "seqserve_sessions": "gauge",
    "seqserve_state_bytes": "gauge",
    "seqserve_state_pool_capacity_bytes": "gauge",
    "seqserve_state_write_failures": "counter",
    "seqserve_state_damaged_records": "counter",
    "seqserve_state_writes": "counter",
    "seqserve_state_write_seconds": "counter",
    "seqserve_gc_pause_seconds": "histogram",
    "seqserve_gc_thawed_garbage_objects": "counter",
    "seqserve_model_load_duration_seconds": "histogram",
    "seqserve_model_info": "gauge",
}


def _step(**overrides: object) -> StepStats:
    fields: dict[str, object] = dict(
        model="text",
        version="1",
        rows=3,
        tokens_in=7,
        tokens_generated=2,
        queue_wait_seconds=[0.0003, 0.002],
        gather_seconds=0.00001,
        forward_seconds=0.0002,
        scatter_seconds=0.00002,
        sample_seconds=0.00005,
        total_seconds=0.0004,
        cpu_seconds=0.0003,
    )
    fields.update(overrides)
    return StepStats(**fields)  # type: ignore[arg-type]


def _samples(metrics: Metrics) -> list[Sample]:
    text = metrics.render().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def _value(metrics: Metrics, name: str, **labels: str) -> float | None:
    """The one sample called `name` whose labels include `labels`; None if absent."""
    found = [
        s.value for s in _samples(metrics) if s.name == name and labels.items() <= s.labels.items()
    ]
    assert len(found) <= 1, f"{name} {labels} is ambiguous: {found}"
    return found[0] if found else None


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(process_collectors=False)


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("`promtool` not found on PATH; install it with .ci/install-system-deps.sh")
    return path


def test_fresh_scrape_shows_every_family(metrics: Metrics) -> None:
    families = {f.name: f.type for f in text_string_to_metric_families(metrics.render().decode())}

    assert families == FAMILIES
    assert _value(metrics, "seqserve_sessions", tier="memory") == 0
    assert _value(metrics, "seqserve_sessions", tier="spilled") == 0
    assert _value(metrics, "seqserve_state_bytes", tier="spilled") == 0
    assert _value(metrics, "seqserve_state_pool_capacity_bytes") == 0


def test_process_collectors_are_optional_and_on_our_registry() -> None:
    names = {f.name for f in text_string_to_metric_families(Metrics().render().decode())}

    assert "process_cpu_seconds" in names
    assert set(FAMILIES) <= names


def test_registry_is_private() -> None:
    first, second = Metrics(process_collectors=False), Metrics(process_collectors=False)
    first.observe_rpc("Step", "OK", 0.01)

    assert _value(second, "seqserve_rpc_duration_seconds_count", method="Step") is None
    assert not [m for m in REGISTRY.collect() if m.name.startswith("seqserve_")]


def test_observe_step_moves_every_step_series(metrics: Metrics) -> None:
    metrics.observe_step(_step())
    metrics.observe_step(_step(rows=64, tokens_in=0, tokens_generated=64, queue_wait_seconds=[]))
    mv = {"model": "text", "version": "1"}

    assert _value(metrics, "seqserve_batch_rows_count", **mv) == 2
    assert _value(metrics, "seqserve_batch_rows_sum", **mv) == 67
    assert _value(metrics, "seqserve_batch_rows_bucket", le="4.0", **mv) == 1
    assert _value(metrics, "seqserve_batch_rows_bucket", le="64.0", **mv) == 2
    assert _value(metrics, "seqserve_tokens_in_total", **mv) == 7
    assert _value(metrics, "seqserve_tokens_generated_total", **mv) == 66
    assert _value(metrics, "seqserve_step_duration_seconds_count", **mv) == 2
    assert _value(metrics, "seqserve_step_duration_seconds_sum", **mv) == pytest.approx(0.0008)
    assert _value(metrics, "seqserve_step_cpu_seconds_total", **mv) == pytest.approx(0.0006)
    for phase, seconds in (
        ("gather", 1e-5),
        ("forward", 2e-4),
        ("scatter", 2e-5),
        ("sample", 5e-5),
    ):
        assert _value(metrics, "seqserve_step_phase_seconds_count", phase=phase, **mv) == 2
        assert _value(
            metrics, "seqserve_step_phase_seconds_sum", phase=phase, **mv
        ) == pytest.approx(2 * seconds)
    # Queue wait: one observation per fed row; 0.3 ms lands in le=0.0005, not le=0.00025.
    assert _value(metrics, "seqserve_queue_wait_seconds_count", **mv) == 2
    assert _value(metrics, "seqserve_queue_wait_seconds_sum", **mv) == pytest.approx(0.0023)
    assert _value(metrics, "seqserve_queue_wait_seconds_bucket", le="0.00025", **mv) == 0
    assert _value(metrics, "seqserve_queue_wait_seconds_bucket", le="0.0005", **mv) == 1
    assert _value(metrics, "seqserve_queue_wait_seconds_bucket", le="+Inf", **mv) == 2


def test_latency_buckets_span_50us_to_10s(metrics: Metrics) -> None:
    metrics.observe_inter_tokens("text", "1", [0.001])
    les = [
        s.labels["le"]
        for s in _samples(metrics)
        if s.name == "seqserve_inter_token_latency_seconds_bucket"
    ]

    assert LATENCY_BUCKETS[0] == 0.00005 and LATENCY_BUCKETS[-1] == 10.0
    assert les[0] == "5e-05" and les[-2:] == ["10.0", "+Inf"]


def test_per_request_latencies(metrics: Metrics) -> None:
    metrics.observe_request_latency("text", "1", 0.002)
    metrics.observe_request_latency("text", "1", 0.001)
    metrics.observe_request_latency("text", "1", 0.0005, count=4)  # a message's four feeds
    metrics.observe_times_to_first_token("text", "2", [0.05])
    metrics.observe_inter_tokens("text", "1", [0.004])
    metrics.observe_inter_tokens("text", "1", [0.004, 0.006])

    assert _value(metrics, "seqserve_step_latency_seconds_count", version="1") == 6
    assert _value(metrics, "seqserve_step_latency_seconds_sum", version="1") == pytest.approx(0.005)
    assert _value(metrics, "seqserve_step_latency_seconds_bucket", le="0.0005", version="1") == 4
    assert _value(metrics, "seqserve_time_to_first_token_seconds_count", version="2") == 1
    assert _value(metrics, "seqserve_time_to_first_token_seconds_count", version="1") == 0
    assert _value(metrics, "seqserve_inter_token_latency_seconds_count", version="1") == 3
    assert (
        _value(metrics, "seqserve_inter_token_latency_seconds_bucket", le="0.005", version="1") == 2
    )


def test_observe_rpc_by_method_and_code(metrics: Metrics) -> None:
    metrics.observe_rpc("Step", "OK", 0.001)
    metrics.observe_rpc("Step", "OK", 0.002)
    metrics.observe_rpc("Step", "INVALID_ARGUMENT", 0.0001)

    assert _value(metrics, "seqserve_rpc_duration_seconds_count", method="Step", code="OK") == 2
    assert _value(metrics, "seqserve_rpc_duration_seconds_count", code="INVALID_ARGUMENT") == 1


def test_rpc_code_must_be_a_status_name(metrics: Metrics) -> None:
    with pytest.raises(ValueError, match="status code"):
        metrics.observe_rpc("Step", "StatusCode.OK", 0.001)


def test_rpc_protocol_is_grpc_or_http(metrics: Metrics) -> None:
    metrics.observe_rpc("Step", "OK", 0.001)
    metrics.observe_rpc("Step", "OK", 0.001, "http")
    metrics.observe_rpc("Step", "OK", 0.001, "http")
    count = "seqserve_rpc_duration_seconds_count"
    assert _value(metrics, count, method="Step", protocol="grpc") == 1
    assert _value(metrics, count, method="Step", protocol="http") == 2
    with pytest.raises(ValueError, match="protocol"):
        metrics.observe_rpc("Step", "OK", 0.001, "websocket")


def test_refusals_counted_by_reason_from_zero(metrics: Metrics) -> None:
    """RESOURCE_EXHAUSTED alone cannot tell the server out of capacity from one principal over
    its own quota; the error-ratio alert subtracts `reason="QUOTA_EXCEEDED"`, so each reason
    must be there (at 0) before the first refusal."""
    refusals = "seqserve_refusals_total"
    for reason in REFUSAL_REASONS:
        assert _value(metrics, refusals, reason=reason) == 0.0, reason

    metrics.observe_rpc("CreateSession", "RESOURCE_EXHAUSTED", 0.001, reason="QUOTA_EXCEEDED")
    metrics.observe_rpc("Step", "RESOURCE_EXHAUSTED", 0.001, "http", "QUOTA_EXCEEDED")
    metrics.observe_rpc("CreateSession", "RESOURCE_EXHAUSTED", 0.001, reason="SESSION_LIMIT")
    metrics.observe_rpc("Step", "RESOURCE_EXHAUSTED", 0.001)  # no reason: still a refusal
    metrics.observe_rpc("Step", "RESOURCE_EXHAUSTED", 0.001, reason="MADE_UP")  # bounded
    metrics.observe_rpc("Step", "NOT_FOUND", 0.001, reason="SESSION_NOT_FOUND")  # no refusal
    metrics.observe_rpc("Step", "OK", 0.001)

    assert _value(metrics, refusals, reason="QUOTA_EXCEEDED") == 2
    assert _value(metrics, refusals, reason="SESSION_LIMIT") == 1
    assert _value(metrics, refusals, reason="OTHER") == 2
    assert _value(metrics, refusals, reason="QUEUE_FULL") == 0
    # Every RESOURCE_EXHAUSTED call once, under one reason.
    exhausted = "seqserve_rpc_duration_seconds_count"
    total = sum(
        s.value for s in _samples(metrics)
        if s.name == exhausted and s.labels["code"] == "RESOURCE_EXHAUSTED"
    )  # fmt: skip
    assert sum(s.value for s in _samples(metrics) if s.name == refusals) == total == 5


def test_stream_items_and_their_in_band_errors_counted(metrics: Metrics) -> None:
    """Items are not calls: a Stream answering every item with an error is one OK call. The
    items and their errors are counted apart, the reason kept (bounded) for RESOURCE_EXHAUSTED
    only, so quota refusals can be told from capacity ones as for calls."""
    items, errors = "seqserve_stream_items_total", "seqserve_stream_item_errors_total"
    assert _value(metrics, items) == 0.0  # there before the first item
    metrics.observe_stream_items(64)
    metrics.observe_stream_items(1)
    metrics.observe_stream_item_errors("RESOURCE_EXHAUSTED", "QUEUE_FULL", 60)
    metrics.observe_stream_item_errors("RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED", 2)
    metrics.observe_stream_item_errors("RESOURCE_EXHAUSTED", "MADE_UP", 1)
    metrics.observe_stream_item_errors("NOT_FOUND", "SESSION_NOT_FOUND", 1)
    metrics.observe_stream_item_errors("NOT_FOUND", "SESSION_EXPIRED", 1)

    assert _value(metrics, items) == 65
    assert _value(metrics, errors, code="RESOURCE_EXHAUSTED", reason="QUEUE_FULL") == 60
    assert _value(metrics, errors, code="RESOURCE_EXHAUSTED", reason="QUOTA_EXCEEDED") == 2
    assert _value(metrics, errors, code="RESOURCE_EXHAUSTED", reason="OTHER") == 1
    assert _value(metrics, errors, code="NOT_FOUND", reason="") == 2  # one series: bounded
    assert _value(metrics, "seqserve_rpc_duration_seconds_count", method="Stream") is None
    with pytest.raises(ValueError, match="gRPC status code"):
        metrics.observe_stream_item_errors("NOT_A_CODE", "", 1)


def test_refusal_reasons_are_the_error_tables_resource_exhausted_rows() -> None:
    exhausted = {r for r, code in REASONS.items() if code.name == "RESOURCE_EXHAUSTED"}

    assert {*CAPACITY_REASONS, QUOTA_REASON} == exhausted
    assert set(REFUSAL_REASONS) == exhausted | {"OTHER"}


def test_session_events_counted_and_precreated(metrics: Metrics) -> None:
    metrics.set_model_info("text", "3", "fp3", "gru", loaded=True)
    for event in SESSION_EVENTS:
        assert _value(metrics, "seqserve_session_events_total", event=event, version="3") == 0

    metrics.session_event("evicted", "text", "3")
    metrics.session_event("evicted", "text", "3")
    metrics.session_event("created", "text", "3")

    assert _value(metrics, "seqserve_session_events_total", event="evicted", version="3") == 2
    assert _value(metrics, "seqserve_session_events_total", event="created", version="3") == 1
    with pytest.raises(ValueError, match="unknown session event"):
        metrics.session_event("teleported", "text", "3")


def test_session_and_state_gauges(metrics: Metrics) -> None:
    metrics.set_sessions("memory", 12)
    metrics.set_sessions("spilled", 3)
    metrics.set_state_bytes("memory", 4096)
    metrics.set_pool_capacity_bytes(1 << 20)
    metrics.set_sessions("memory", 10)

    assert _value(metrics, "seqserve_sessions", tier="memory") == 10
    assert _value(metrics, "seqserve_sessions", tier="spilled") == 3
    assert _value(metrics, "seqserve_state_bytes", tier="memory") == 4096
    assert _value(metrics, "seqserve_state_pool_capacity_bytes") == 1 << 20
    with pytest.raises(ValueError, match="unknown tier"):
        metrics.set_sessions("gpu", 1)


def test_gc_pauses_and_thawed_garbage(metrics: Metrics) -> None:
    for generation in ("0", "1", "2"):  # at zero before the first collection
        assert _value(metrics, "seqserve_gc_pause_seconds_count", generation=generation) == 0
    metrics.observe_gc_pauses([(0, 0.004), (0, 0.02), (2, 0.3)])
    metrics.count_thawed_garbage(7)
    metrics.count_thawed_garbage(0)

    assert _value(metrics, "seqserve_gc_pause_seconds_count", generation="0") == 2
    assert _value(metrics, "seqserve_gc_pause_seconds_sum", generation="0") == pytest.approx(0.024)
    assert _value(metrics, "seqserve_gc_pause_seconds_bucket", generation="0", le="0.005") == 1
    assert _value(metrics, "seqserve_gc_pause_seconds_count", generation="1") == 0
    assert _value(metrics, "seqserve_gc_pause_seconds_count", generation="2") == 1
    assert _value(metrics, "seqserve_gc_thawed_garbage_objects_total") == 7


def test_state_writes_follow_the_engines_totals(metrics: Metrics) -> None:
    assert _value(metrics, "seqserve_state_writes_total") == 0
    metrics.set_state_writes(5, 0.002)
    metrics.set_state_writes(5, 0.002)  # a refresh with nothing new moves nothing
    metrics.set_state_writes(12, 0.0075)
    assert _value(metrics, "seqserve_state_writes_total") == 12
    assert _value(metrics, "seqserve_state_write_seconds_total") == pytest.approx(0.0075)


def test_model_info_follows_load_state(metrics: Metrics) -> None:
    metrics.set_model_info("text", "1", "fp-a", "lstm", loaded=True)
    metrics.set_model_info("feat", "2", "fp-b", "gru", loaded=True)
    metrics.set_queue_depth("text", "1", 5)
    metrics.observe_model_load("text", "1", 0.3)

    assert (
        _value(metrics, "seqserve_model_info", model="text", fingerprint="fp-a", cell="lstm") == 1
    )
    assert _value(metrics, "seqserve_queue_depth", model="text") == 5
    assert _value(metrics, "seqserve_model_load_duration_seconds_sum", model="text") == 0.3

    metrics.set_model_info("text", "1", "fp-a", "lstm", loaded=False)

    assert _value(metrics, "seqserve_model_info", model="text") is None
    assert _value(metrics, "seqserve_model_info", model="feat") == 1
    assert _value(metrics, "seqserve_queue_depth", model="text") == 0


def test_model_info_relabel_replaces_the_old_series(metrics: Metrics) -> None:
    metrics.set_model_info("text", "1", "old", "lstm", loaded=True)
    metrics.set_model_info("text", "1", "new", "lstm", loaded=True)

    infos = [s for s in _samples(metrics) if s.name == "seqserve_model_info"]
    assert [s.labels["fingerprint"] for s in infos] == ["new"]


def test_forget_version_drops_its_series_only(metrics: Metrics) -> None:
    for version in ("1", "2"):
        metrics.set_model_info("text", version, f"fp{version}", "lstm", loaded=True)
        metrics.observe_step(_step(version=version))
        metrics.observe_inter_tokens("text", version, [0.01])
        metrics.observe_model_load("text", version, 0.1)

    metrics.forget_version("text", "1")

    versions = {s.labels.get("version") for s in _samples(metrics) if "version" in s.labels}
    assert versions == {"2"}
    # Observing again after forgetting recreates the series from zero.
    metrics.observe_step(_step(version="1", tokens_in=1))
    assert _value(metrics, "seqserve_tokens_in_total", version="1") == 1


def test_only_bounded_labels(metrics: Metrics) -> None:
    metrics.set_model_info("text", "1", "fp", "lstm", loaded=True)
    metrics.observe_step(_step())
    metrics.observe_rpc("Stream", "OK", 1.0)

    labels = {name for s in _samples(metrics) for name in s.labels}

    assert labels <= BOUNDED_LABELS | {"fingerprint", "cell"}
    assert {s.labels["phase"] for s in _samples(metrics) if "phase" in s.labels} == set(PHASES)
    kinds = {s.labels["kind"] for s in _samples(metrics) if "kind" in s.labels}
    assert kinds == set(WRITE_FAILURE_KINDS)


def test_exposition_passes_promtool(metrics: Metrics, promtool: str) -> None:
    metrics.set_model_info("text", "1", "fp", "lstm", loaded=True)
    metrics.observe_step(_step())
    metrics.observe_rpc("Step", "OK", 0.001)
    metrics.observe_request_latency("text", "1", 0.001)
    metrics.observe_times_to_first_token("text", "1", [0.01])
    metrics.observe_inter_tokens("text", "1", [0.01])
    metrics.session_event("created", "text", "1")
    metrics.set_state_bytes("memory", 100)
    metrics.observe_model_load("text", "1", 0.2)
    full = Metrics()  # with the process collectors, as served
    full.observe_step(_step())

    for exposition in (metrics.render(), full.render()):
        result = subprocess.run(
            [promtool, "check", "metrics"], input=exposition, capture_output=True, timeout=60
        )
        assert result.returncode == 0, (result.stdout + result.stderr).decode()
        assert result.stdout.strip() == b"" and result.stderr.strip() == b""


def test_http_endpoint_serves_the_registry(metrics: Metrics) -> None:
    metrics.set_pool_capacity_bytes(123)
    port = metrics.start_http_server("127.0.0.1", 0)
    try:
        assert port > 0
        with pytest.raises(RuntimeError, match="already running"):
            metrics.start_http_server("127.0.0.1", 0)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            body = response.read().decode()
    finally:
        metrics.stop()
    metrics.stop()  # idempotent

    assert "seqserve_state_pool_capacity_bytes 123.0" in body
    # The port is released: a new endpoint can bind it at once.
    again = Metrics(process_collectors=False)
    assert again.start_http_server("127.0.0.1", port) == port
    again.stop()


def test_state_write_failures_start_at_zero_for_each_kind() -> None:
    """The runbook's check is `increase(seqserve_state_write_failures_total[...]) > 0`: without
    a zero to start from, the first failure of each kind never showed in it."""
    metrics = Metrics()
    for kind in ("journal", "end"):
        assert _value(metrics, "seqserve_state_write_failures_total", kind=kind) == 0.0


def test_damaged_records_start_at_zero_and_follow_the_engines_count() -> None:
    metrics = Metrics(process_collectors=False)
    assert _value(metrics, "seqserve_state_damaged_records_total", kind="journal") == 0.0
    metrics.set_damaged_records("journal", 2)
    metrics.set_damaged_records("journal", 2)  # the next refresh: nothing new
    assert _value(metrics, "seqserve_state_damaged_records_total", kind="journal") == 2.0
