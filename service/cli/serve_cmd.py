"""`seqserve serve`: run the gRPC server (and the metrics endpoint) until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from service.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the gRPC server on a model store")
    p.add_argument("--host", help="bind address (default: settings, 127.0.0.1)")
    p.add_argument("--port", type=int, help="gRPC port (default 50051; 0 picks one)")
    p.add_argument("--metrics-port", type=int, help="metrics port (default 9464; -1 disables)")
    p.add_argument("--store", type=Path, help="model store (default: SEQSERVE_MODEL_STORE)")
    p.add_argument("--spill-dir", type=Path, help="session spill directory")
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
    if getattr(args, "spill_dir", None) is not None:
        update["sessions"] = settings.sessions.model_copy(update={"spill_dir": args.spill_dir})
    return settings.model_copy(update=update)


def run(args: argparse.Namespace) -> int:
    from service.api.server import serve  # heavy imports only for this command

    settings = settings_from_args(args)
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(serve(settings))
    return 0
