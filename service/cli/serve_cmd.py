"""`seqserve serve`: run the gRPC server (and the metrics endpoint) until SIGTERM/SIGINT.

On SIGTERM every session is written to the spill directory; started again on the same
directory, the server resumes each one where it stopped.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from service.cli.settings_flags import (
    InvalidSetting,
    add_config_argument,
    add_settings_arguments,
    flags_argv,
    load_from_args,
)
from service.config_sources import check_runnable
from service.settings import Settings

if TYPE_CHECKING:
    from service.api.server import SeqServeServer


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the gRPC server on a model store",
        description="Run the gRPC server. Every setting is a flag (below), an environment "
        "variable (SEQSERVE_<SECTION>__<NAME>) or an entry of the --config file; "
        "precedence: flags > env > config file > defaults.",
    )
    add_config_argument(p)
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="run N server processes on the port (one per core), sharing the state directory",
    )
    p.add_argument(
        "--port-file",
        type=Path,
        help="once listening, write the gRPC, metrics and HTTP ports here as JSON (for --port 0)",
    )
    add_settings_arguments(p)
    p.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The effective settings (flags > env > --config > defaults); raises InvalidSetting."""
    return load_from_args(args).settings


def write_port_file(path: Path, server: SeqServeServer) -> None:
    """Atomically, so a reader polling for the file never sees half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(
        f'{{"port": {server.port}, "metrics_port": {server.metrics_port}, '
        f'"http_port": {server.http_port}}}\n'
    )
    os.replace(tmp, path)


def worker_argv(args: argparse.Namespace) -> list[str]:
    """`serve` and the setting flags as given (and `--config`); the supervisor adds the ports."""
    return ["serve", *flags_argv(args, skip=("server.port", "server.metrics_port"))]


def run(args: argparse.Namespace) -> int:
    from service.errors import (
        InsecureBind,
        InvalidArgument,
        PortInUse,
        SpillDirUnusable,
        SpillTierInUse,
        StateTierUnusable,
    )

    try:
        settings = settings_from_args(args)
        check_runnable(settings)
    except InvalidSetting as exc:
        print(f"seqserve: {exc}", file=sys.stderr)  # one line, no traceback
        return 2
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
    from service.api.event_loop import run  # uvloop when installed
    from service.api.server import serve  # heavy imports only for this command
    from service.cli.workers import PortLock

    lock = None
    if settings.server.worker < 0 and settings.server.port != 0:  # workers: their supervisor's
        lock = PortLock(settings.server.port)
        lock.acquire()
    on_started = None if port_file is None else (lambda srv: write_port_file(port_file, srv))
    try:
        run(serve(settings, on_started))
    finally:
        if lock is not None:
            lock.release()
    return 0
