"""deploy/grafana: valid dashboard JSON whose queries name only series `Metrics` exposes,
parse as PromQL in a real Prometheus, and take their datasource from a variable."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml

from .conftest import DEPLOY_DIR, StartPrometheus

GRAFANA_DIR = DEPLOY_DIR / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "seqserve.json"
DATASOURCES = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = GRAFANA_DIR / "provisioning" / "dashboards" / "dashboards.yml"

# What the brief asks the dashboard to show, as (panel title fragment, series it must query).
REQUIRED_PANELS = {
    "Time to first token": "seqserve_time_to_first_token_seconds_bucket",
    "Inter-token latency": "seqserve_inter_token_latency_seconds_bucket",
    "Step latency": "seqserve_step_latency_seconds_bucket",
    "Rows per batched step": "seqserve_batch_rows_bucket",
    "Queue wait": "seqserve_queue_wait_seconds_bucket",
    "Sessions by tier": "seqserve_sessions",
    "Evictions": "seqserve_session_events_total",
    "Tokens / s": "seqserve_tokens_generated_total",
    "Errors by code": "seqserve_rpc_duration_seconds_count",
    # RESOURCE_EXHAUSTED split into the server's capacity and principals' own quotas.
    "Refusals by reason": "seqserve_refusals_total",
    # A Stream ends OK whatever its items' errors: they are counted apart.
    "Stream item errors": "seqserve_stream_item_errors_total",
    "State write time": "seqserve_state_write_seconds_total",
}
# Grafana's variables, replaced by values Prometheus accepts.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "1h", "$model": ".*"}
SELECTOR = re.compile(r"\b(seqserve_\w+|up)\b\s*(?:\{([^}]*)\})?")
MATCHER_LABEL = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # panels inside collapsed rows
    return panels


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if isinstance(query, str):
            # label_values(metric, label) is Grafana syntax; check the metric part only.
            exprs.extend(re.findall(r"label_values\((\w+)", query))
    return exprs


def _substitute(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def test_dashboard_shape(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "seqserve"
    assert dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        grid = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= grid.keys(), panel["title"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], f"{panel['title']} queries nothing"
            assert all(t["expr"].strip() for t in panel["targets"]), panel["title"]
            refs = [t["refId"] for t in panel["targets"]]
            assert len(refs) == len(set(refs)), panel["title"]


def test_required_panels_present(dashboard: dict[str, Any]) -> None:
    panels = [p for p in _panels(dashboard) if p["type"] != "row"]
    for title, series in REQUIRED_PANELS.items():
        matching = [p for p in panels if title in p["title"]]
        assert matching, f"no panel titled like {title!r}"
        assert any(series in t["expr"] for p in matching for t in p["targets"]), title
    latency = {p["title"]: p for p in panels}
    for title in ("Time to first token", "Inter-token latency", "Step latency"):
        exprs = " ".join(t["expr"] for t in latency[title]["targets"])
        assert "histogram_quantile(0.5," in exprs and "histogram_quantile(0.99," in exprs, title


DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}


def _datasource_refs(node: Any) -> list[Any]:
    """Every `datasource` value anywhere in the dashboard (panels, targets, variables)."""
    if isinstance(node, dict):
        found = [node["datasource"]] if "datasource" in node else []
        return found + [ref for value in node.values() for ref in _datasource_refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _datasource_refs(value)]
    return []


def test_datasource_is_a_variable_so_the_dashboard_imports_anywhere(
    dashboard: dict[str, Any],
) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    assert not ds.get("current"), "no data source pinned: Grafana picks its default Prometheus"
    # The variable comes first: the other variables' queries run on it.
    assert dashboard["templating"]["list"][0]["name"] == "datasource"
    refs = _datasource_refs(dashboard)
    assert len(refs) > 20
    assert all(ref == DATASOURCE_REF for ref in refs), [r for r in refs if r != DATASOURCE_REF]
    assert '"uid": "prometheus"' not in DASHBOARD.read_text()
    for panel in _panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE_REF, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE_REF, panel["title"]


def test_provisioned_datasource_is_the_default_prometheus() -> None:
    # With nothing chosen, ${datasource} resolves to Grafana's default data source of its
    # type: in the compose stack that is the provisioned Prometheus.
    (source,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"] is True
    assert source["url"] == "http://prometheus:9090"


def test_provider_loads_from_a_folder() -> None:
    text = PROVIDERS.read_text()

    assert re.search(r"type:\s*file\b", text)
    assert re.search(r"path:\s*/\S+", text)


def _unknown_references(expr: str, exposed: dict[str, frozenset[str]]) -> list[str]:
    """Series, or label matchers on a series, in `expr` that `Metrics` does not expose."""
    selectors = SELECTOR.findall(expr)
    if not selectors:
        return [f"no seqserve series in {expr!r}"]
    problems = []
    for name, matchers in selectors:
        if name not in exposed:
            problems.append(name)
            continue
        problems += [f"{name}{{{label}}}" for label in MATCHER_LABEL.findall(matchers)
                     if label not in exposed[name]]  # fmt: skip
    return problems


def test_queries_name_only_exposed_series_and_labels(
    dashboard: dict[str, Any], exposed_series: dict[str, frozenset[str]]
) -> None:
    exprs = _exprs(dashboard)
    assert exprs
    for expr in exprs:
        assert _unknown_references(expr, exposed_series) == [], expr


def test_reference_check_catches_typos(exposed_series: dict[str, frozenset[str]]) -> None:
    bad_name = 'rate(seqserve_tokens_genrated_total{model=~".*"}[1m])'
    bad_label = 'sum(seqserve_sessions{model="text"})'

    assert _unknown_references(bad_name, exposed_series) == ["seqserve_tokens_genrated_total"]
    assert _unknown_references(bad_label, exposed_series) == ["seqserve_sessions{model}"]
    assert _unknown_references("vector(1)", exposed_series) != []


def test_queries_parse_in_prometheus(
    dashboard: dict[str, Any], prometheus_factory: StartPrometheus
) -> None:
    server = prometheus_factory()
    checked = 0
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            # Raises PrometheusQueryError with Prometheus's parse error if the PromQL is bad.
            server.query(_substitute(target["expr"]))
            checked += 1
    assert checked >= 10, f"only {checked} dashboard queries were checked"
