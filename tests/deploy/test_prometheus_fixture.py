"""The `prometheus_factory` fixture itself: a real Prometheus that scrapes and answers queries."""

from __future__ import annotations

import itertools
import socket
from pathlib import Path

import pytest

from .conftest import StartPrometheus
from .prometheus_server import PrometheusQueryError, random_ports, start_prometheus


def _values(result: list[dict[str, object]]) -> list[str]:
    return [item["value"][1] for item in result]  # type: ignore[index]


def test_scrapes_itself_and_answers_up(prometheus_factory: StartPrometheus) -> None:
    server = prometheus_factory(scrape_self=True, scrape_interval_s=0.5)
    assert server.base_url.startswith("http://127.0.0.1:")

    result = server.wait_for_query('up{job="prometheus"}', lambda r: _values(r) == ["1"])

    assert result[0]["metric"]["instance"] == f"127.0.0.1:{server.port}"


def test_unreachable_target_reports_up_zero(prometheus_factory: StartPrometheus) -> None:
    # A bound but not listening socket: connections to it are refused for as long as we hold
    # it, so no other process can take the port mid-test.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{closed.getsockname()[1]}"
        server = prometheus_factory([target], scrape_interval_s=0.5)

        result = server.wait_for_query('up{job="seqserve"}', lambda r: _values(r) == ["0"])

    assert result[0]["metric"]["instance"] == target


def test_bad_promql_is_reported(prometheus_factory: StartPrometheus) -> None:
    server = prometheus_factory()

    with pytest.raises(PrometheusQueryError, match="parse error"):
        server.query("sum(rate(")


def test_port_in_use_is_retried(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]

        server = start_prometheus(tmp_path, ports=itertools.chain([busy], random_ports()))
        try:
            assert server.port != busy
            assert server.query("vector(1)")[0]["value"][1] == "1"
            assert "address already in use" in (tmp_path / "prometheus-0.log").read_text()
        finally:
            server.stop()
    assert server.process.poll() is not None


def test_stop_terminates_the_process(prometheus_factory: StartPrometheus) -> None:
    server = prometheus_factory()

    server.stop()

    assert server.process.poll() is not None
