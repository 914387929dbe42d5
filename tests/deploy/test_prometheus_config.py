"""deploy/prometheus: the config, the alert rules and their unit tests, checked by `promtool`,
and every metric they name checked against what `Metrics` really exposes."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from service.metrics.bounds import GRPC_CODES, QUOTA_REASON, REFUSAL_REASONS

from .conftest import DEPLOY_DIR, StartPrometheus

PROMETHEUS_DIR = DEPLOY_DIR / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yml"
EXPECTED_ALERTS = {
    "SeqserveDown",
    "SeqserveHighInterTokenLatency",
    "SeqserveHighErrorRatio",
    "SeqserveHighStreamItemErrorRatio",
    "SeqserveEvictionStorm",
    "SeqservePoolNearFull",
    "SeqserveLongGCPauses",
    "SeqserveFrozenGarbage",
}


def _promtool(
    promtool: str, *args: str, cwd: Path = PROMETHEUS_DIR
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def _alert_names(text: str) -> list[str]:
    return re.findall(r"^\s*- alert:\s*(\S+)\s*$", text, flags=re.MULTILINE)


def test_config_is_valid(promtool: str) -> None:
    result = _promtool(promtool, "check", "config", "prometheus.yml")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: prometheus.yml is valid" in result.stdout
    assert "SUCCESS: 1 rule files found" in result.stdout


def test_config_scrapes_seqserve_every_5s() -> None:
    text = (PROMETHEUS_DIR / "prometheus.yml").read_text()

    assert re.search(r"job_name:\s*seqserve\b", text)
    assert 'targets: ["replica1:9464", "replica2:9464", "replica3:9464"]' in text
    assert re.search(r"^\s+scrape_interval:\s*5s\s*$", text, flags=re.MULTILINE)
    assert re.search(r"rule_files:\s*\n\s*-\s*alerts\.yml", text)


def test_rules_are_valid(promtool: str) -> None:
    result = _promtool(promtool, "check", "rules", "alerts.yml")

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(EXPECTED_ALERTS)} rules found" in result.stdout


def test_every_expected_alert_is_defined_once() -> None:
    names = _alert_names(ALERTS.read_text())

    assert sorted(names) == sorted(EXPECTED_ALERTS)


def test_alert_unit_tests_pass(promtool: str) -> None:
    result = _promtool(promtool, "test", "rules", "alerts_test.yml")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_firing_case() -> None:
    text = ALERTS_TEST.read_text()
    # An alert is shown firing where its test case expects a non-empty alert list.
    firing = set(re.findall(r"alertname:\s*(\S+)\s*\n\s*exp_alerts:\s*\n\s*- exp_labels:", text))
    quiet = set(re.findall(r"alertname:\s*(\S+)\s*\n\s*exp_alerts:\s*\[\]", text))

    assert firing == EXPECTED_ALERTS
    assert quiet, "at least one case must show an alert not firing"


def test_alert_unit_tests_can_fail(promtool: str, tmp_path: Path) -> None:
    # Guards against a vacuous harness: a server that never goes down must fail the
    # SeqserveDown firing expectation.
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    down = 'values: "1 1 0 0 0 0 0"'
    text = ALERTS_TEST.read_text()
    assert down in text
    (tmp_path / "alerts_test.yml").write_text(text.replace(down, 'values: "1 1 1 1 1 1 1"'))

    result = _promtool(promtool, "test", "rules", "alerts_test.yml", cwd=tmp_path)

    assert result.returncode != 0
    assert "alertname: SeqserveDown" in result.stdout + result.stderr


def test_rules_reference_only_exposed_series(exposed_series: dict[str, frozenset[str]]) -> None:
    for path in (ALERTS, ALERTS_TEST):
        names = set(re.findall(r"\b(seqserve_\w+)", path.read_text()))
        assert names, path
        unknown = names - exposed_series.keys()
        assert not unknown, f"{path.name} names series Metrics never exposes: {unknown}"


def test_rules_load_into_a_live_prometheus(prometheus_factory: StartPrometheus) -> None:
    server = prometheus_factory(rule_files=[ALERTS])

    groups = server.api("/api/v1/rules")["groups"]

    loaded = {rule["name"] for group in groups for rule in group["rules"]}
    assert loaded == EXPECTED_ALERTS
    assert all(rule["health"] != "err" for group in groups for rule in group["rules"])


SERVER_SIDE_CODES = {
    "INTERNAL", "UNKNOWN", "UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "DATA_LOSS",
}  # fmt: skip


def _error_ratio_codes(text: str) -> set[str]:
    (codes,) = re.findall(r'seqserve_rpc_duration_seconds_count\{code=~"([^"]+)"\}', text)
    return set(codes.split("|"))


def test_error_ratio_counts_server_side_codes_only() -> None:
    codes = _error_ratio_codes(ALERTS.read_text())

    # A misspelt code would match nothing and silently never fire.
    assert codes <= GRPC_CODES
    assert codes == SERVER_SIDE_CODES


def test_error_ratio_unit_test_rejects_counting_client_errors(
    promtool: str, tmp_path: Path
) -> None:
    # The unit test must tell the rule apart from one that counts every non-OK code.
    text = ALERTS.read_text()
    matcher = re.search(r'code=~"[^"]+"', text)
    assert matcher is not None
    (tmp_path / "alerts.yml").write_text(text.replace(matcher.group(0), 'code!="OK"'))
    shutil.copy(ALERTS_TEST, tmp_path / "alerts_test.yml")

    result = _promtool(promtool, "test", "rules", "alerts_test.yml", cwd=tmp_path)

    assert result.returncode != 0
    assert "alertname: SeqserveHighErrorRatio" in result.stdout + result.stderr


ITEM_ERRORS = re.compile(r'seqserve_stream_item_errors_total\{code=~"([^"]+)", ([^}]*)\}')


def test_item_error_ratio_counts_what_the_call_ratio_counts() -> None:
    """The same server-side codes as for calls, quota refusals (a reason the counter has)
    left out."""
    ((codes, rest),) = ITEM_ERRORS.findall(ALERTS.read_text())

    assert set(codes.split("|")) == SERVER_SIDE_CODES
    assert rest == f'reason!="{QUOTA_REASON}"'


@pytest.mark.parametrize(
    ("mutation", "failing_case"),
    [
        ('reason!="NONE"', "SeqserveHighStreamItemErrorRatio"),  # quota refusals counted
        ('code=~"INTERNAL"', "SeqserveHighStreamItemErrorRatio"),  # capacity not counted
    ],
)
def test_item_error_ratio_unit_test_tells_quota_from_capacity(
    promtool: str, tmp_path: Path, mutation: str, failing_case: str
) -> None:
    text = ALERTS.read_text()
    match = ITEM_ERRORS.search(text)
    assert match is not None
    original = match.group(0)
    if mutation.startswith("reason"):
        mutated = original.replace(f'reason!="{QUOTA_REASON}"', mutation)
    else:
        mutated = original.replace(f'code=~"{match.group(1)}"', mutation)
    assert mutated != original
    (tmp_path / "alerts.yml").write_text(text.replace(original, mutated))
    shutil.copy(ALERTS_TEST, tmp_path / "alerts_test.yml")

    result = _promtool(promtool, "test", "rules", "alerts_test.yml", cwd=tmp_path)

    assert result.returncode != 0
    assert f"alertname: {failing_case}" in result.stdout + result.stderr


QUOTA_MATCHER = f'seqserve_refusals_total{{reason="{QUOTA_REASON}"}}'


def test_error_ratio_takes_out_quota_refusals_only() -> None:
    text = ALERTS.read_text()
    selectors = re.findall(r"seqserve_refusals_total\{([^}]*)\}", text)

    # A principal over its own quota is RESOURCE_EXHAUSTED too; only those refusals are taken
    # out, by a reason the counter really has (a misspelt one would take out nothing).
    assert selectors == [f'reason="{QUOTA_REASON}"']
    assert QUOTA_REASON in REFUSAL_REASONS


@pytest.mark.parametrize(
    ("taken_out", "failing_case"),
    [
        # Nothing taken out (the rule before refusals were counted by reason): one client
        # over its quota pages.
        ('reason="NONE"', "does not fire when one principal is over its own quota"),
        # Every refusal taken out: a server out of capacity no longer pages.
        ('reason=~".+"', "fires on capacity refusals"),
    ],
)
def test_error_ratio_unit_test_tells_quota_from_capacity(
    promtool: str, tmp_path: Path, taken_out: str, failing_case: str
) -> None:
    text = ALERTS.read_text()
    assert QUOTA_MATCHER in text
    mutated = QUOTA_MATCHER.replace(f'reason="{QUOTA_REASON}"', taken_out)
    (tmp_path / "alerts.yml").write_text(text.replace(QUOTA_MATCHER, mutated))
    shutil.copy(ALERTS_TEST, tmp_path / "alerts_test.yml")

    result = _promtool(promtool, "test", "rules", "alerts_test.yml", cwd=tmp_path)

    assert result.returncode != 0
    assert f"name: SeqserveHighErrorRatio {failing_case}" in result.stdout + result.stderr


RUNBOOK_BASE = "https://github.com/seqserve/seqserve/blob/main/README.md#"
README = DEPLOY_DIR.parent / "README.md"


def github_anchor(heading: str) -> str:
    """The id GitHub gives a Markdown heading: lower case, punctuation dropped, spaces → '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _readme_anchors() -> dict[str, str]:
    """anchor → heading text, for every heading outside code blocks."""
    anchors: dict[str, str] = {}
    in_code = False
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (m := re.match(r"#{1,6}\s+(.+?)\s*$", line)):
            anchors.setdefault(github_anchor(m.group(1)), m.group(1))
    return anchors


def test_every_alert_links_its_runbook_section_in_the_readme() -> None:
    rules = [
        rule
        for group in yaml.safe_load(ALERTS.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]
    anchors = _readme_anchors()
    assert {r["alert"] for r in rules} == EXPECTED_ALERTS
    assert "runbook" in anchors, "README.md has no Runbook section"
    for rule in rules:
        url = rule["annotations"].get("runbook_url", "")
        assert url.startswith(RUNBOOK_BASE), f"{rule['alert']}: runbook_url {url!r}"
        anchor = url.removeprefix(RUNBOOK_BASE)
        assert anchors.get(anchor) == rule["alert"], f"{rule['alert']}: no README heading #{anchor}"


def test_github_anchor_matches_githubs_rules() -> None:
    assert github_anchor("SeqserveHighErrorRatio") == "seqservehigherrorratio"
    assert github_anchor("### `seqserve loadtest`".lstrip("# ")) == "seqserve-loadtest"
    assert github_anchor("Sessions: how they live, expire") == "sessions-how-they-live-expire"
