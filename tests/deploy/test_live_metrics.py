"""A live seqserve's /metrics under real traffic: every family DESIGN §6 lists is there, each
moves by exactly what the traffic did, and no label value is a session id."""

from __future__ import annotations

import asyncio
import math
import re
import subprocess
from collections import Counter

from service.api.server import SeqServeServer
from service.client.client import SeqServeClient
from service.metrics.bounds import PHASES, SESSION_EVENTS
from service.sessions.session import SESSION_ID_PATTERN

from .exposition import Exposition, fetch, scrape
from .traffic import MODEL, Tally, Traffic

# DESIGN §6, item by item, and the family that answers it.
DESIGN_FAMILIES = {
    "RPC duration by method and code": ("seqserve_rpc_duration_seconds", "histogram"),
    "time to first token": ("seqserve_time_to_first_token_seconds", "histogram"),
    "inter-token latency": ("seqserve_inter_token_latency_seconds", "histogram"),
    "per-step server latency": ("seqserve_step_latency_seconds", "histogram"),
    "queue wait": ("seqserve_queue_wait_seconds", "histogram"),
    "rows per batched step": ("seqserve_batch_rows", "histogram"),
    "step compute time by phase": ("seqserve_step_phase_seconds", "histogram"),
    "tokens in": ("seqserve_tokens_in", "counter"),
    "tokens generated": ("seqserve_tokens_generated", "counter"),
    "live sessions by tier": ("seqserve_sessions", "gauge"),
    "session events": ("seqserve_session_events", "counter"),
    "state bytes by tier": ("seqserve_state_bytes", "gauge"),
    "model load time": ("seqserve_model_load_duration_seconds", "histogram"),
    "model info": ("seqserve_model_info", "gauge"),
}
BOUNDED_LABELS = {
    "method", "code", "protocol", "model", "version", "tier", "event", "phase", "generation", "le",
    "kind",  # seqserve_state_write_failures_total, seqserve_state_damaged_records_total
    "reason",  # seqserve_refusals_total: the ErrorInfo reasons of RESOURCE_EXHAUSTED
}  # fmt: skip
INFO_LABELS = {"fingerprint", "cell"}  # seqserve_model_info only: one series per loaded version
SESSION_ID = re.compile(SESSION_ID_PATTERN)  # service.sessions.session.new_session_id
V = {"model": MODEL, "version": "1"}


async def _scrape(server: SeqServeServer) -> Exposition:
    server.refresh_gauges()  # the gauges as of now, not as of the last 1 s refresh
    return await scrape(server.metrics_port)


async def test_every_design_family_is_live_and_moves_with_traffic(
    live_server: SeqServeServer, live_client: SeqServeClient
) -> None:
    # Load the model first, so the baseline already has its series (at non-zero counts).
    warm_up = Traffic(live_client, sessions=1)
    await warm_up.close(await warm_up.open())
    before = await _scrape(live_server)

    traffic = Traffic(live_client, sessions=4, max_tokens=6)
    opened = await traffic.open()
    await traffic.drive(opened)
    during = await _scrape(live_server)
    await traffic.fail_not_found()
    await traffic.close(opened)
    after = await _scrape(live_server)

    for item, (name, kind) in DESIGN_FAMILIES.items():
        assert after.types.get(name) == kind, f"{item}: {name} ({kind}) missing: {after.types}"
    _assert_well_formed(after)
    _assert_no_session_ids(after, warm_up.tally.session_ids | traffic.tally.session_ids)
    _assert_moved_with(traffic.tally, before, after)
    _assert_gauges(during, after, live_sessions=len(opened))


def _assert_well_formed(exp: Exposition) -> None:
    """Bounded label names; finite, non-negative values; each histogram's buckets cumulative
    and ending at its count."""
    histograms = {n for n, t in exp.types.items() if t == "histogram" and n.startswith("seqserve_")}
    buckets: dict[tuple[str, frozenset[tuple[str, str]]], list[tuple[float, float]]] = {}
    counts: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for s in exp.samples:
        if not s.name.startswith("seqserve_"):
            continue
        allowed = BOUNDED_LABELS | (INFO_LABELS if s.name == "seqserve_model_info" else set())
        assert set(s.labels) <= allowed, f"unbounded label on {s.name}: {s.labels}"
        assert math.isfinite(s.value) and s.value >= 0, s
        family = s.name.rsplit("_", 1)[0]
        if family not in histograms:
            continue
        series = (family, frozenset((k, v) for k, v in s.labels.items() if k != "le"))
        if s.name.endswith("_bucket"):
            buckets.setdefault(series, []).append((float(s.labels["le"]), s.value))
        elif s.name.endswith("_count"):
            counts[series] = s.value
    assert buckets.keys() == counts.keys() and buckets
    for series, bs in buckets.items():
        values = [v for _, v in sorted(bs)]
        assert values == sorted(values), f"buckets not cumulative: {series} {bs}"
        assert max(bs)[0] == math.inf and values[-1] == counts[series], series


def _assert_no_session_ids(exp: Exposition, session_ids: set[str]) -> None:
    values = exp.label_values()
    assert not values & session_ids
    assert not [v for v in values if SESSION_ID.match(v)]


def _assert_moved_with(tally: Tally, before: Exposition, after: Exposition) -> None:
    def delta(name: str, **labels: str) -> float:
        return after.total(name, **labels) - before.total(name, **labels)

    # The client's tally, one for one.
    assert delta("seqserve_tokens_in_total", **V) == tally.tokens_fed > 0
    assert delta("seqserve_tokens_generated_total", **V) == tally.tokens_generated > 0
    for event, expected in (("created", tally.created), ("forked", tally.forked),
                            ("closed", tally.closed)):  # fmt: skip
        assert delta("seqserve_session_events_total", event=event, **V) == expected > 0, event
    for event in set(SESSION_EVENTS) - {"created", "forked", "closed"}:
        # Not exercised here, but present from the version's load on, at zero.
        assert after.matching("seqserve_session_events_total", event=event, **V), event
        assert delta("seqserve_session_events_total", event=event, **V) == 0, event
    assert delta("seqserve_step_latency_seconds_count", **V) == tally.steps
    assert delta("seqserve_queue_wait_seconds_count", **V) == tally.fed_rows
    assert delta("seqserve_time_to_first_token_seconds_count", **V) == tally.generations > 0
    assert delta("seqserve_inter_token_latency_seconds_count", **V) == (
        tally.tokens_generated - tally.generations
    )
    for latency in ("step_latency", "queue_wait", "time_to_first_token", "inter_token_latency"):
        name = f"seqserve_{latency}_seconds_sum"
        assert delta(name, **V) >= 0 if latency == "queue_wait" else delta(name, **V) > 0, name

    # Every feed row and every generated token is one row of one step.
    steps = delta("seqserve_batch_rows_count", **V)
    assert delta("seqserve_batch_rows_sum", **V) == tally.fed_rows + tally.tokens_generated
    assert 0 < steps < tally.fed_rows + tally.tokens_generated, "no step batched two rows"
    assert delta("seqserve_batch_rows_bucket", le="1.0", **V) < steps
    assert delta("seqserve_step_duration_seconds_count", **V) == steps
    # The steps' own CPU time: some, and no more than their wall time.
    step_cpu = delta("seqserve_step_cpu_seconds_total", **V)
    assert 0 < step_cpu <= delta("seqserve_step_duration_seconds_sum", **V)
    for phase in PHASES:
        assert delta("seqserve_step_phase_seconds_count", phase=phase, **V) == steps, phase
        assert delta("seqserve_step_phase_seconds_sum", phase=phase, **V) > 0, phase

    # Each RPC once, under its method and final status, and nothing else.
    rpcs: Counter[tuple[str, str]] = Counter()
    for s in after.matching("seqserve_rpc_duration_seconds_count"):
        moved = s.value - before.total(s.name, **s.labels)
        if moved:
            rpcs[s.labels["method"], s.labels["code"]] = int(moved)
    assert rpcs == tally.rpcs

    # The model's one load, and its info series.
    assert after.total("seqserve_model_load_duration_seconds_count", **V) == 1
    assert after.total("seqserve_model_load_duration_seconds_sum", **V) > 0
    (info,) = after.matching("seqserve_model_info", **V)
    assert info.value == 1 and info.labels["cell"] == "lstm" and info.labels["fingerprint"]


def _assert_gauges(during: Exposition, after: Exposition, live_sessions: int) -> None:
    capacity = during.total("seqserve_state_pool_capacity_bytes")
    assert capacity > 0
    assert during.total("seqserve_sessions", tier="memory") == live_sessions
    assert during.total("seqserve_sessions", tier="spilled") == 0
    assert 0 < during.total("seqserve_state_bytes", tier="memory") <= capacity
    assert during.total("seqserve_queue_depth", **V) == 0  # between requests: nothing queued
    assert after.total("seqserve_sessions", tier="memory") == 0
    assert after.total("seqserve_state_bytes", tier="memory") == 0


async def test_live_exposition_has_no_created_series(
    live_server: SeqServeServer, live_client: SeqServeClient, promtool: str
) -> None:
    traffic = Traffic(live_client, sessions=2, max_tokens=3)
    opened = await traffic.open()
    await traffic.drive(opened)
    await traffic.close(opened)
    body = await asyncio.to_thread(fetch, live_server.metrics_port)
    exp = Exposition.parse(body)

    # Counters and histograms that moved are there; none of them has a *_created twin.
    assert exp.total("seqserve_tokens_in_total", **V) > 0
    assert exp.total("seqserve_rpc_duration_seconds_count") > 0
    assert [s.name for s in exp.samples if s.name.endswith("_created")] == []
    assert b"_created" not in body
    result = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, timeout=60, check=False
    )
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result
