"""`seqserve serve`: run the gRPC server (and the metrics endpoint) until SIGTERM/SIGINT.

On SIGTERM every session is written to the spill directory; started again on the same
directory, the server resumes each one where it stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from service.settings import Settings

if TYPE_CHECKING:
    from service.api.server import SeqServeServer


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the gRPC server on a model store")
    p.add_argument("--host", help="bind address (default: settings, 127.0.0.1)")
    p.add_argument("--port", type=int, help="gRPC port (default 50051; 0 picks one)")
    p.add_argument("--metrics-port", type=int, help="metrics port (default 9464; -1 disables)")
    p.add_argument("--store", type=Path, help="model store (default: SEQSERVE_MODEL_STORE)")
    p.add_argument("--spill-dir", type=Path, help="session spill directory")
    p.add_argument("--spill-max-bytes", type=int, help="cap on the spill directory's size")
    p.add_argument(
        "--state-url",
        help="shared state tier, redis://HOST:PORT/DB: replicas take sessions over from it",
    )
    p.add_argument("--pool-bytes", type=int, help="byte budget for session state in memory")
    p.add_argument("--max-sessions", type=int, help="cap on live sessions (memory and spilled)")
    p.add_argument("--ttl", type=float, help="default idle TTL of a session, in seconds")
    p.add_argument("--tls-cert", type=Path, help="PEM certificate: serve gRPC over TLS")
    p.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    p.add_argument(
        "--tls-client-ca", type=Path, help="PEM CA: require client certificates (mutual TLS)"
    )
    p.add_argument(
        "--auth-tokens", type=Path, help="tokens file (seqserve auth add-token): require tokens"
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="allow a non-loopback bind without TLS and tokens (private networks only)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="run N server processes on the port (one per core), sharing the state directory",
    )
    p.add_argument(
        "--port-file",
        type=Path,
        help="once listening, write the gRPC and metrics ports here as JSON (for --port 0)",
    )
    p.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> Settings:
    settings = Settings()
    server = {
        k: v
        for k, v in (("host", args.host), ("port", args.port), ("metrics_port", args.metrics_port))
        if v is not None
    }
    update: dict[str, object] = {"server": settings.server.model_copy(update=server)}
    if args.store is not None:
        update["model_store"] = args.store
    flags = {
        "spill_dir": getattr(args, "spill_dir", None),
        "spill_max_bytes": getattr(args, "spill_max_bytes", None),
        "state_url": getattr(args, "state_url", None),
        "pool_bytes": getattr(args, "pool_bytes", None),
        "max_sessions": getattr(args, "max_sessions", None),
        "ttl_seconds": getattr(args, "ttl", None),
    }
    sessions = {k: v for k, v in flags.items() if v is not None}
    if sessions:
        update["sessions"] = settings.sessions.model_copy(update=sessions)
    security_flags = {
        "tls_cert": getattr(args, "tls_cert", None),
        "tls_key": getattr(args, "tls_key", None),
        "tls_client_ca": getattr(args, "tls_client_ca", None),
        "auth_tokens": getattr(args, "auth_tokens", None),
        "insecure": getattr(args, "insecure", None),
    }
    security = {k: v for k, v in security_flags.items() if v is not None}
    if security:
        update["security"] = settings.security.model_copy(update=security)
    return settings.model_copy(update=update)


def write_port_file(path: Path, server: SeqServeServer) -> None:
    """Atomically, so a reader polling for the file never sees half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(f'{{"port": {server.port}, "metrics_port": {server.metrics_port}}}\n')
    os.replace(tmp, path)


# The flags a worker gets from its supervisor as they were given (port ones are its own).
_PASSED_ON = (
    "host", "store", "spill_dir", "spill_max_bytes", "state_url", "pool_bytes", "max_sessions",
    "ttl", "tls_cert", "tls_key", "tls_client_ca", "auth_tokens",
)  # fmt: skip


def worker_argv(args: argparse.Namespace) -> list[str]:
    argv = ["serve"]
    for name in _PASSED_ON:
        value = getattr(args, name, None)
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    if getattr(args, "insecure", None):
        argv.append("--insecure")
    return argv


def run(args: argparse.Namespace) -> int:
    from service.errors import (
        InsecureBind,
        InvalidArgument,
        PortInUse,
        SpillDirUnusable,
        SpillTierInUse,
        StateTierUnusable,
    )

    settings = settings_from_args(args)
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    port_file: Path | None = getattr(args, "port_file", None)
    workers = getattr(args, "workers", 0) or 0
    try:
        if workers > 0:
            from service.cli.workers import run_workers  # no torch in the supervisor

            return run_workers(settings, worker_argv(args), workers, port_file)
        return _serve_one(settings, port_file)
    except (
        InsecureBind, InvalidArgument, PortInUse, SpillDirUnusable, SpillTierInUse,
        StateTierUnusable,
    ) as exc:  # fmt: skip
        print(f"seqserve serve: {exc.message}", file=sys.stderr)  # one line, no traceback
        return 2


def _serve_one(settings: Settings, port_file: Path | None) -> int:
    from service.api.server import serve  # heavy imports only for this command
    from service.cli.workers import PortLock

    lock = None
    if settings.server.worker < 0 and settings.server.port != 0:  # workers: their supervisor's
        lock = PortLock(settings.server.port)
        lock.acquire()
    on_started = None if port_file is None else (lambda srv: write_port_file(port_file, srv))
    try:
        asyncio.run(serve(settings, on_started))
    finally:
        if lock is not None:
            lock.release()
    return 0
