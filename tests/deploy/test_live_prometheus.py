"""A real Prometheus scraping a live seqserve under real traffic: the queries the dashboard and
alerts rely on answer with finite numbers, the counters Prometheus stores equal what the
client did, and `promtool check metrics` passes on a scrape taken mid-traffic."""

from __future__ import annotations

import asyncio
import math
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest

from service.api.server import SeqServeServer
from service.client.client import SeqServeClient

from .conftest import StartPrometheus
from .exposition import fetch
from .prometheus_server import PrometheusServer
from .traffic import Traffic

Result = list[dict[str, Any]]

P99_INTER_TOKEN = (
    "histogram_quantile(0.99, sum by (le) (rate(seqserve_inter_token_latency_seconds_bucket[1m])))"
)
MEAN_BATCH_ROWS = (
    "sum(rate(seqserve_batch_rows_sum[1m])) / sum(rate(seqserve_batch_rows_count[1m]))"
)
WAIT_S = 60.0  # each condition; Prometheus scrapes every 0.5 s, so a few seconds is typical


def _scalar(result: Result) -> float | None:
    """The value of a one-element vector; None for an empty one."""
    if len(result) != 1:
        return None
    return float(result[0]["value"][1])


def _finite_positive(result: Result) -> bool:
    value = _scalar(result)
    return value is not None and math.isfinite(value) and value > 0


async def _wait_for(
    prometheus: PrometheusServer,
    promql: str,
    predicate: Callable[[Result], bool],
    traffic: asyncio.Task[None] | None = None,
) -> Result:
    """Poll `promql` until `predicate` holds, off the event loop (the server runs on it); a
    failed traffic task fails at once rather than at the deadline."""
    deadline = time.monotonic() + WAIT_S
    result: Result = []
    while time.monotonic() < deadline:
        if traffic is not None and traffic.done():
            traffic.result()  # raises what the traffic raised
            raise AssertionError("traffic stopped early")
        result = await asyncio.to_thread(prometheus.query, promql)
        if predicate(result):
            return result
        await asyncio.sleep(0.25)
    raise AssertionError(
        f"{promql!r} never satisfied the condition within {WAIT_S}s; last result: {result}\n"
        f"--- prometheus log tail ---\n{prometheus.log_tail()}"
    )


@pytest.mark.integration
async def test_prometheus_scrapes_a_live_server_under_traffic(
    live_server: SeqServeServer,
    live_client: SeqServeClient,
    prometheus_factory: StartPrometheus,
    promtool: str,
) -> None:
    target = f"127.0.0.1:{live_server.metrics_port}"
    prometheus = await asyncio.to_thread(prometheus_factory, [target], scrape_interval_s=0.5)
    traffic = Traffic(live_client, sessions=4, max_tokens=8)
    stopping = asyncio.Event()

    async def keep_busy() -> None:
        while not stopping.is_set():
            await traffic.round()

    running = asyncio.create_task(keep_busy())
    try:
        up = await _wait_for(prometheus, 'up{job="seqserve"}', lambda r: _scalar(r) == 1, running)
        assert up[0]["metric"]["instance"] == target
        await _wait_for(prometheus, P99_INTER_TOKEN, _finite_positive, running)
        await _wait_for(prometheus, MEAN_BATCH_ROWS, lambda r: (_scalar(r) or 0.0) > 1.0, running)
        exposition = await asyncio.to_thread(fetch, live_server.metrics_port)
    finally:
        stopping.set()
        await running  # the round in flight finishes: every session it opened is closed

    lint = subprocess.run(
        [promtool, "check", "metrics"], input=exposition, capture_output=True, timeout=60
    )
    assert lint.returncode == 0, (lint.stdout + lint.stderr).decode()
    assert lint.stdout.strip() == b"" and lint.stderr.strip() == b""
    assert b"seqserve_inter_token_latency_seconds_bucket" in exposition

    # Traffic has stopped: once Prometheus has scraped again, its counters are the tally.
    t = traffic.tally
    for promql, expected in (
        ("sum(seqserve_tokens_in_total)", t.tokens_fed),
        ("sum(seqserve_tokens_generated_total)", t.tokens_generated),
        ('sum(seqserve_session_events_total{event="created"})', t.created),
        ('sum(seqserve_session_events_total{event="forked"})', t.forked),
        ('sum(seqserve_session_events_total{event="closed"})', t.closed),
        ('sum(seqserve_rpc_duration_seconds_count{method="Generate", code="OK"})',
         t.rpcs["Generate", "OK"]),
        ('sum(seqserve_rpc_duration_seconds_count{code="NOT_FOUND"})',
         t.rpcs["CreateSession", "NOT_FOUND"]),
    ):  # fmt: skip
        assert expected > 0, promql
        await _wait_for(prometheus, promql, lambda r, n=expected: _scalar(r) == n)
    await _wait_for(prometheus, "sum(seqserve_sessions)", lambda r: _scalar(r) == 0)
