"""docker-compose.yml and deploy/Dockerfile, checked without a Docker engine.

`docker-compose config` (the real tool; CI installs it) validates the file and resolves it;
then every path it mounts or builds from must exist, every file the Dockerfile copies must be
in the build context, and the services must point at each other as the configs expect
(three replicas on one Redis tier and one read-only store, nginx hashing onto exactly those
replicas, Prometheus scraping each, Grafana reading `prometheus:9090`, the load generator
targeting nginx with flags the CLI accepts). The container health check is run against a live
server.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from service.api.server import SeqServeServer
from service.cli.main import build_parser
from service.settings import ServerSettings, SessionSettings, Settings

from .conftest import DEPLOY_DIR, REPO_ROOT
from .prometheus_server import INSTALL_HINT

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE = DEPLOY_DIR / "Dockerfile"
REPLICAS = ("replica1", "replica2", "replica3")
SERVICES = {*REPLICAS, "nginx", "redis", "prometheus", "grafana", "loadtest"}

# Compose v1 (Debian's `docker-compose`, Python) prints YAML only; v2 can print JSON. For v1,
# its own interpreter (which has PyYAML, a dependency of docker-compose) converts to JSON.
_YAML_TO_JSON = "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"


@pytest.fixture(scope="module")
def docker_compose() -> str:
    path = shutil.which("docker-compose")
    if path is None:
        pytest.fail(f"`docker-compose` not found on PATH; {INSTALL_HINT}")
    return path


def _compose(docker_compose: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [docker_compose, "-f", str(COMPOSE_FILE), "--profile", "loadtest", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": str(REPO_ROOT)},  # no stray COMPOSE_* settings
    )  # fmt: skip


@pytest.fixture(scope="module")
def compose(docker_compose: str) -> dict[str, Any]:
    """The resolved compose file (paths absolute, variables substituted)."""
    as_json = _compose(docker_compose, "config", "--format", "json")
    if as_json.returncode == 0 and as_json.stdout.lstrip().startswith("{"):
        return json.loads(as_json.stdout)  # v2 (v1 prints its usage, and exits 0)
    as_yaml = _compose(docker_compose, "config")
    assert as_yaml.returncode == 0, as_yaml.stderr
    shebang = Path(docker_compose).read_text(errors="replace").splitlines()[0]
    interpreter = shlex.split(shebang.removeprefix("#!"))
    converted = subprocess.run(
        [*interpreter, "-c", _YAML_TO_JSON], input=as_yaml.stdout, capture_output=True,
        text=True, timeout=60, check=True,
    )  # fmt: skip
    return json.loads(converted.stdout)


def _volumes(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each mount, from v1's short form or v2's long form."""
    mounts = []
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            mounts.append((v["source"], v["target"]))
        else:
            source, target = v.split(":")[:2]
            mounts.append((source, target))
    return mounts


def _source(volume: str | dict[str, Any]) -> Path:
    return Path(volume["source"] if isinstance(volume, dict) else volume.split(":")[0])


def _target(volume: str | dict[str, Any]) -> str:
    return str(volume["target"] if isinstance(volume, dict) else volume.split(":")[1])


def _read_only(volume: str | dict[str, Any]) -> bool:
    if isinstance(volume, dict):
        return bool(volume.get("read_only"))
    return volume.split(":")[2:3] == ["ro"]


def _seconds(duration: str | int | float) -> float:
    """A compose duration ("30s", "1m30s") in seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)([hms])", duration))


def _published(service: dict[str, Any]) -> set[tuple[str, int]]:
    """(host ip, container port) of each published port."""
    out = set()
    for p in service.get("ports", []):
        if isinstance(p, dict):
            out.add((p.get("host_ip", ""), int(p["target"])))
        else:
            parts = p.split("/")[0].split(":")
            out.add((parts[0] if len(parts) == 3 else "", int(parts[-1])))
    return out


def test_compose_file_is_valid(docker_compose: str) -> None:
    result = _compose(docker_compose, "config", "--quiet")

    assert result.returncode == 0, result.stderr


def test_services_and_the_loadtest_profile(compose: dict[str, Any]) -> None:
    services = compose["services"]

    assert set(services) == SERVICES
    assert services["loadtest"]["profiles"] == ["loadtest"]
    assert all("profiles" not in services[name] for name in SERVICES - {"loadtest"})


def test_replicas_bind_every_interface_and_share_the_tier_and_store(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    for name in REPLICAS:
        server = services[name]
        env = server["environment"]
        assert env["SEQSERVE_SERVER__HOST"] == "0.0.0.0"
        assert env["SEQSERVE_SERVER__METRICS_HOST"] == "0.0.0.0"
        assert env["SEQSERVE_SESSIONS__STATE_URL"] == "redis://redis:6379/0"
        assert server["healthcheck"]["test"] == ["CMD", "seqserve-healthcheck"]
        assert _published(server) == set()  # reached through nginx only
        store = env["SEQSERVE_MODEL_STORE"]
        mounts = [v for v in server["volumes"] if _target(v) == store]
        assert len(mounts) == 1 and _read_only(mounts[0]), mounts
        assert _source(mounts[0]) == REPO_ROOT / "model_store"
        # The drain and the writes to Redis fit in the time compose waits before SIGKILL.
        grace = float(env["SEQSERVE_SERVER__GRACE_SECONDS"])
        write = float(env["SEQSERVE_SESSIONS__WRITE_TIMEOUT_SECONDS"])
        assert grace + write <= _seconds(server["stop_grace_period"])
        assert server["depends_on"]["redis"]["condition"] == "service_healthy"
        tokens = Path(env["SEQSERVE_SECURITY__AUTH_TOKENS"])  # deploy/local-secrets.sh's
        secrets = [v for v in server["volumes"] if _target(v) == str(tokens.parent)]
        assert len(secrets) == 1 and _read_only(secrets[0])
        assert _source(secrets[0]) == REPO_ROOT / "deploy" / "secrets"
        assert env["SEQSERVE_SECURITY__INSECURE"] == "true"  # the compose network only
    assert len({json.dumps(services[n], sort_keys=True) for n in REPLICAS}) == 1  # alike


def test_nginx_hashes_onto_the_replicas_and_is_the_published_port(
    compose: dict[str, Any],
) -> None:
    nginx = compose["services"]["nginx"]
    mounts = {_target(v): _source(v) for v in nginx["volumes"]}
    conf = mounts["/etc/nginx/conf.d/default.conf"]
    text = conf.read_text()
    port = compose["services"]["replica1"]["environment"]["SEQSERVE_SERVER__PORT"]

    http = compose["services"]["replica1"]["environment"]["SEQSERVE_SERVER__HTTP_PORT"]

    assert conf == DEPLOY_DIR / "nginx" / "seqserve.conf"
    assert set(re.findall(r"server (\S+):(\d+) ", text)) == {
        (r, p) for r in REPLICAS for p in (port, http)
    }
    assert "hash $http_x_seqserve_route consistent;" in text
    assert "hash $seqserve_http_route consistent;" in text  # the key in the URL, or the header
    assert "grpc_pass grpc://seqserve_replicas;" in text
    assert "proxy_pass http://seqserve_http_replicas;" in text
    assert _published(nginx) == {("127.0.0.1", int(port)), ("127.0.0.1", int(http))}


def test_redis_is_configured_as_the_state_tier_needs(compose: dict[str, Any]) -> None:
    command = compose["services"]["redis"]["command"]
    if isinstance(command, str):
        command = shlex.split(command)
    flags = dict(zip(command[1::2], command[2::2], strict=False))

    assert flags["--appendonly"] == "yes"
    assert flags["--maxmemory-policy"] == "noeviction"
    assert flags["--appendfsync"] == "everysec"  # matches the replicas' default fsync policy


def test_every_mounted_path_exists(compose: dict[str, Any]) -> None:
    named = set(compose.get("volumes", {}))
    for name, service in compose["services"].items():
        for source, target in _volumes(service):
            if source.startswith("/"):
                assert Path(source).exists(), f"{name}: mounts missing {source} at {target}"
                assert Path(source).resolve().is_relative_to(REPO_ROOT), source
            else:
                assert source in named, f"{name}: volume {source!r} is not declared"


def test_every_build_has_its_dockerfile_and_context(compose: dict[str, Any]) -> None:
    builds = [s["build"] for s in compose["services"].values() if "build" in s]

    assert len(builds) == len(REPLICAS) + 1  # the replicas and the load generator: one image
    for build in builds:
        context = Path(build["context"])
        assert context == REPO_ROOT
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE
    images = {s["image"] for s in compose["services"].values() if "build" in s}
    assert images == {"seqserve:local"}


def _dockerfile() -> list[str]:
    """Instructions, with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _dockerignore() -> list[str]:
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    parts = Path(path).parts
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(parts[0], p) for p in patterns)


def test_dockerfile_base_and_torch_from_the_cpu_index() -> None:
    lines = _dockerfile()
    runs = [line for line in lines if line.startswith("RUN ")]
    torch_at = next(i for i, r in enumerate(runs) if "torch==2.13.0" in r)
    package_at = next(i for i, r in enumerate(runs) if "/tmp/src" in r and "pip install" in r)

    assert lines[0] == "FROM python:3.11-slim"
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs[torch_at]
    assert torch_at < package_at  # torch is in place before the package asks for it
    assert any(line.startswith("USER ") and "root" not in line for line in lines)
    env = " ".join(line for line in lines if line.startswith("ENV "))
    assert "SEQSERVE_SERVER__HOST=0.0.0.0" in env
    assert "SEQSERVE_SERVER__METRICS_HOST=0.0.0.0" in env


def test_every_file_the_dockerfile_copies_is_in_the_build_context() -> None:
    ignore = _dockerignore()
    copies = [line.split()[1:-1] for line in _dockerfile() if line.startswith("COPY ")]

    assert copies, "the Dockerfile copies nothing"
    for sources in copies:
        for source in sources:
            assert (REPO_ROOT / source).exists(), f"COPY source {source} is missing"
            assert not _ignored(source, ignore), f"COPY source {source} is in .dockerignore"


def test_prometheus_scrapes_every_replica(compose: dict[str, Any]) -> None:
    services = compose["services"]
    config = (DEPLOY_DIR / "prometheus" / "prometheus.yml").read_text()
    metrics_port = services["replica1"]["environment"]["SEQSERVE_SERVER__METRICS_PORT"]
    mounted = dict((t, Path(s)) for s, t in _volumes(services["prometheus"]))
    rule_files = re.findall(r"^rule_files:\s*\n((?:\s+- .+\n)+)", config, flags=re.MULTILINE)

    targets = ", ".join(f'"{r}:{metrics_port}"' for r in REPLICAS)
    assert f"targets: [{targets}]" in config
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    assert mounted["/etc/prometheus"] == DEPLOY_DIR / "prometheus"
    assert rule_files, "prometheus.yml names no rule files"
    for rule_file in re.findall(r"- (\S+)", rule_files[0]):
        assert (mounted["/etc/prometheus"] / rule_file).is_file(), rule_file


def test_grafana_is_provisioned_from_the_repo(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounted = dict((t, Path(s)) for s, t in _volumes(grafana))
    provisioning = mounted["/etc/grafana/provisioning"]
    dashboards_yml = (provisioning / "dashboards" / "dashboards.yml").read_text()
    datasource_yml = (provisioning / "datasources" / "prometheus.yml").read_text()
    dashboards_path = re.search(r"path:\s*(\S+)", dashboards_yml)

    assert provisioning == DEPLOY_DIR / "grafana" / "provisioning"
    assert dashboards_path is not None
    assert mounted[dashboards_path.group(1)] == DEPLOY_DIR / "grafana" / "dashboards"
    assert list(mounted[dashboards_path.group(1)].glob("*.json"))
    assert "url: http://prometheus:9090" in datasource_yml
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    relative = Path(home).relative_to(dashboards_path.group(1))
    assert (mounted[dashboards_path.group(1)] / relative).is_file()


def test_load_generator_targets_the_server_with_valid_flags(compose: dict[str, Any]) -> None:
    services = compose["services"]
    loadtest = services["loadtest"]
    args = build_parser().parse_args(loadtest["command"])  # flags the CLI really has

    assert args.command == "loadtest"
    assert args.target == f"nginx:{services['replica1']['environment']['SEQSERVE_SERVER__PORT']}"
    assert args.json is not None and args.plot is not None
    reports = {t for _s, t in _volumes(loadtest)}
    assert args.json.parent.as_posix() in reports and args.plot.parent.as_posix() in reports
    assert all(loadtest["depends_on"][r]["condition"] == "service_healthy" for r in REPLICAS)
    assert "SEQSERVE_TOKEN" in loadtest["environment"]  # the replicas need a token
    assert args.insecure  # ...sent in plain text to nginx: the client needs to be told so
    assert "nginx" in loadtest["depends_on"]


async def _healthcheck(port: int) -> int:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(DEPLOY_DIR / "healthcheck.py"),
        env={"SEQSERVE_SERVER__PORT": str(port), "PATH": "/usr/bin:/bin"},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    return await asyncio.wait_for(proc.wait(), 30)


async def test_healthcheck_script_follows_the_server(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    server = SeqServeServer(
        Settings(
            model_store=tmp_path / "store",
            registry_poll_seconds=0,
            server=ServerSettings(port=0, metrics_port=-1, http_port=-1, grace_seconds=0.1),
            sessions=SessionSettings(spill_dir=tmp_path / "spill"),
        )
    )
    await server.start()
    try:
        serving = await _healthcheck(server.port)
    finally:
        await server.stop()
    gone = await _healthcheck(server.port)

    assert serving == 0
    assert gone == 1
