"""Real Redis and nginx for the tests and benchmarks (Debian's `redis-server` and `nginx`,
installed by `.ci/install-system-deps.sh`), each started on 127.0.0.1 in a given directory,
waited for with bounded loops, and killed at the end."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

REPO = Path(__file__).resolve().parents[1]
NGINX_CONF = REPO / "deploy" / "nginx" / "seqserve.conf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _binary(name: str) -> str:
    found = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)), None
    )
    if found is None:
        raise RuntimeError(f"`{name}` not found; install it with .ci/install-system-deps.sh")
    return found


class RedisServer:
    """redis-server with the configuration the state tier needs: an append-only file fsynced
    every second, no eviction, no RDB snapshots."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [
            _binary("redis-server"), "--bind", "127.0.0.1", "--port", str(self.port),
            "--dir", str(self.workdir), "--appendonly", "yes", "--appendfsync", "everysec",
            "--maxmemory-policy", "noeviction", "--save", "", "--daemonize", "no",
            "--logfile", str(self.workdir / "redis.log"),
        ]  # fmt: skip
        self.proc = subprocess.Popen(argv)
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited: {self.log()}")
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    time.sleep(0.05)
            raise RuntimeError(f"redis-server did not answer within {timeout} s: {self.log()}")
        finally:
            client.close()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)

    def log(self) -> str:
        path = self.workdir / "redis.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""


def _local_upstream(text: str, port: int, local_ports: list[int]) -> str:
    """The deploy file's `server replicaN:<port> ...;` lines pointed at local ports."""
    servers = re.findall(rf"^\s*server replica\d+:{port} .*;$", text, flags=re.M)
    assert len(servers) == 3, f"the deploy file names three replicas on port {port}"
    options = servers[0].split(f":{port}", 1)[1]  # " max_fails=... fail_timeout=...;"
    local = "\n".join(f"    server 127.0.0.1:{p}{options}" for p in local_ports)
    return text.replace("\n".join(servers), local)


class NginxServer:
    """nginx running a deploy file (`deploy/nginx/seqserve.conf` by default) itself, its
    replicas rewritten to local ports, its listener to 127.0.0.1, and any other paths of the
    file (certificates, secrets) replaced as `paths` says."""

    def __init__(
        self,
        workdir: Path,
        replica_ports: list[int],
        conf: Path = NGINX_CONF,
        paths: dict[str, Path] | None = None,
        http_ports: list[int] | None = None,
    ) -> None:
        """`http_ports`: the replicas' HTTP API ports, for the file's HTTP upstream (nginx then
        listens for HTTP on `http_port`)."""
        self.workdir = workdir
        self.port = free_port()
        self.http_port = free_port()
        self.replica_ports = replica_ports
        self.http_ports = http_ports
        self.conf = conf
        self.paths = paths or {}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def config(self) -> str:
        """The deploy file with only its addresses and paths changed."""
        text = self.conf.read_text()
        for old, new in self.paths.items():
            assert old in text, f"{old} is not in {self.conf.name}"
            text = text.replace(old, str(new))
        text = _local_upstream(text, 50051, self.replica_ports)
        if ":8080 " in text:  # the HTTP API's upstream: the replicas' HTTP ports
            text = _local_upstream(text, 8080, self.http_ports or self.replica_ports)
            text = text.replace("listen 8080;", f"listen 127.0.0.1:{self.http_port};")
        text = text.replace("listen 50051 http2;", f"listen 127.0.0.1:{self.port} http2;")
        return text.replace("listen 443 ssl http2;", f"listen 127.0.0.1:{self.port} ssl http2;")

    def start(self, timeout: float = 15.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "seqserve.conf").write_text(self.config())
        w = self.workdir
        (w / "nginx.conf").write_text(
            f"daemon off;\nworker_processes 1;\npid {w}/nginx.pid;\n"
            f"error_log {w}/error.log info;\nevents {{ worker_connections 1024; }}\n"
            "http {\n    access_log off;\n"
            f"    client_body_temp_path {w}/body;\n    proxy_temp_path {w}/proxy;\n"
            f"    fastcgi_temp_path {w}/fastcgi;\n    uwsgi_temp_path {w}/uwsgi;\n"
            f"    scgi_temp_path {w}/scgi;\n    include {w}/seqserve.conf;\n}}\n"
        )
        nginx = _binary("nginx")
        check = subprocess.run(
            [nginx, "-t", "-p", str(w), "-c", str(w / "nginx.conf")],
            capture_output=True, text=True,
        )  # fmt: skip
        if check.returncode != 0:
            raise RuntimeError(f"nginx -t refused the config: {check.stderr}")
        self.proc = subprocess.Popen([nginx, "-p", str(w), "-c", str(w / "nginx.conf")])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nginx did not listen within {timeout} s: {self.log()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        path = self.workdir / "error.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""
