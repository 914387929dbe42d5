"""deploy/k8s/: every manifest passes `kubernetes-validate --strict` (the resource schemas of a
real Kubernetes version), and the manifests agree with each other and with the server: the
ingress hashes the routing header onto the gRPC port, the probes ask the health names the
server answers, the grace period covers preStop + drain + the writes, the selectors match."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.api.server import LIVENESS
from service.sessions.session import ROUTE_HEADER

from .conftest import DEPLOY_DIR

K8S = DEPLOY_DIR / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml"))


def _docs() -> dict[tuple[str, str], dict[str, Any]]:
    found = {}
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid_kubernetes(path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", str(path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_ingress_hashes_the_routing_key_onto_grpc() -> None:
    docs = _docs()
    ingress = docs[("Ingress", "seqserve")]
    notes = ingress["metadata"]["annotations"]
    header = "$http_" + ROUTE_HEADER.replace("-", "_")

    assert notes["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    assert notes["nginx.ingress.kubernetes.io/upstream-hash-by"] == header
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    service = docs[("Service", backend["name"])]
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}


def test_probes_grace_and_selectors_fit_the_server() -> None:
    docs = _docs()
    deployment = docs[("Deployment", "seqserve")]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    port = int(env["SEQSERVE_SERVER__PORT"])

    assert container["readinessProbe"]["grpc"] == {"port": port}  # "" : follows start/drain
    assert container["livenessProbe"]["grpc"] == {"port": port, "service": LIVENESS}
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    needed = (
        float(pre_stop[1])
        + float(env["SEQSERVE_SERVER__GRACE_SECONDS"])
        + float(env["SEQSERVE_SESSIONS__WRITE_TIMEOUT_SECONDS"])
    )
    assert pod["spec"]["terminationGracePeriodSeconds"] >= needed
    assert env["SEQSERVE_SESSIONS__STATE_URL"].startswith("redis://seqserve-redis:")

    labels = pod["metadata"]["labels"]
    for kind, name in (("Service", "seqserve"), ("PodDisruptionBudget", "seqserve")):
        spec = docs[(kind, name)]["spec"]
        selector = spec["selector"].get("matchLabels", spec["selector"])
        assert selector.items() <= labels.items(), (kind, selector)
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["models"]["readOnly"]
    assert mounts["models"]["mountPath"] == env["SEQSERVE_MODEL_STORE"]
    tokens = Path(env["SEQSERVE_SECURITY__AUTH_TOKENS"])  # from a Secret, read-only
    assert mounts["tokens"]["readOnly"] and str(tokens.parent) == mounts["tokens"]["mountPath"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["tokens"]["secret"]["secretName"] == "seqserve-tokens"


def test_redis_is_configured_as_the_state_tier_needs() -> None:
    docs = _docs()
    conf = docs[("ConfigMap", "seqserve-redis")]["data"]["redis.conf"]
    settings = dict(line.split(None, 1) for line in conf.splitlines() if line.strip())

    assert settings["appendonly"] == "yes"
    assert settings["maxmemory-policy"] == "noeviction"
    assert settings["appendfsync"] == "everysec"
    assert docs[("StatefulSet", "seqserve-redis")]["spec"]["replicas"] == 1  # one primary
