"""Fixtures for deployment tests: the real `promtool` / `prometheus` binaries, the repo's
deploy/ folder, the series a live `Metrics` actually exposes (what configs may reference), and
a live in-process seqserve with its metrics endpoint on 127.0.0.1.

The store and server fixtures are tests/api's own (`store_root`, `server_factory`), imported
here so both folders start servers the same way.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from api.conftest import ServerFactory, server_factory, store_root
from prometheus_client.parser import text_string_to_metric_families

from service.api.server import SeqServeServer
from service.client.client import SeqServeClient
from service.metrics import Metrics, StepStats

from .prometheus_server import INSTALL_HINT, PrometheusServer, start_prometheus

__all__ = ["server_factory", "store_root"]  # re-exported fixtures, used by this folder's tests

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY_DIR = REPO_ROOT / "deploy"

StartPrometheus = Callable[..., PrometheusServer]


@pytest.fixture(scope="session")
def promtool() -> str:
    """Path of `promtool`; a missing tool fails the test (CI must install it, not skip)."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(f"`promtool` not found on PATH; {INSTALL_HINT}")
    return path


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[StartPrometheus]:
    """Start real Prometheus servers on 127.0.0.1; each is terminated after the test.

    Call it as `prometheus_factory(["127.0.0.1:9464"], scrape_interval_s=1.0)`; keyword
    arguments are those of `start_prometheus` (job, scrape_self, rule_files, ...). The
    returned server has `base_url`, `query()` and a bounded `wait_for_query()`.
    """
    started: list[PrometheusServer] = []

    def start(targets: Sequence[str] = (), **kwargs: Any) -> PrometheusServer:
        server = start_prometheus(tmp_path / f"prometheus-{len(started)}", targets, **kwargs)
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        server.stop()


@pytest.fixture
async def live_server(server_factory: ServerFactory) -> SeqServeServer:
    """A seqserve over the test store (models `tok`, `frames`) with its metrics endpoint on
    127.0.0.1 (`live_server.metrics_port`)."""
    return await server_factory(server={"metrics_host": "127.0.0.1", "metrics_port": 0})


@pytest.fixture
async def live_client(live_server: SeqServeServer) -> AsyncIterator[SeqServeClient]:
    # Feeds by Step: traffic.py tallies them as Step calls (multiplexed feeds would be Stream).
    async with SeqServeClient(f"127.0.0.1:{live_server.port}", multiplex=False) as client:
        yield client


def _exercised_metrics() -> Metrics:
    """A `Metrics` fed one of everything, so every family has samples with its labels."""
    metrics = Metrics()
    metrics.set_model_info("text", "1", "fp", "lstm", loaded=True)
    metrics.observe_model_load("text", "1", 0.2)
    metrics.observe_rpc("Step", "OK", 0.001)
    metrics.observe_stream_items(2)
    metrics.observe_stream_item_errors("RESOURCE_EXHAUSTED", "QUEUE_FULL", 1)
    metrics.observe_step(
        StepStats(
            model="text",
            version="1",
            rows=2,
            tokens_in=3,
            tokens_generated=1,
            queue_wait_seconds=[0.0001],
            gather_seconds=1e-5,
            forward_seconds=1e-4,
            scatter_seconds=1e-5,
            sample_seconds=1e-5,
            total_seconds=2e-4,
        )
    )
    metrics.observe_request_latency("text", "1", 0.001)
    metrics.observe_times_to_first_token("text", "1", [0.002])
    metrics.observe_inter_tokens("text", "1", [0.001])
    metrics.set_queue_depth("text", "1", 1)
    metrics.set_pool_capacity_bytes(1 << 20)
    return metrics


@pytest.fixture(scope="session")
def exposed_series() -> dict[str, frozenset[str]]:
    """Every sample name `Metrics` exposes (plus Prometheus's own `up`), with its label names."""
    text = _exercised_metrics().render().decode()
    series: dict[str, set[str]] = {"up": {"job", "instance"}}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    # Prometheus attaches these target labels at scrape time.
    return {name: frozenset(labels | {"job", "instance"}) for name, labels in series.items()}
