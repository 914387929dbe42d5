"""Stopping a server that holds many sessions: `python -m benchmarks.shutdown [--sessions N]`.

A real `seqserve serve` (default durability, auth off) with a pool of `--pool-slots` slots, so
most sessions live in the spill tier. N sessions are created over gRPC with a one-token prefix
(`benchmarks.session_load.make_sessions`, 64 in flight); after `--idle` seconds (the idle
checkpoints, 5 s, are written) the server gets SIGTERM. Reported: creations per second, and the
time from SIGTERM to the process's exit, which is the drain, the writing of the sessions still
in memory and the flush of the spill tier. `--server-root` runs the server from another
checkout, for a before/after pair. The server is pinned to the last CPU when there are two or
more.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.memory import hidden_state_bytes
from benchmarks.processes import start_server
from benchmarks.run import split_cpus
from benchmarks.session_load import make_sessions

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.shutdown", description=__doc__)
    p.add_argument("--sessions", type=int, default=60_000)
    p.add_argument("--pool-slots", type=int, default=4096)
    p.add_argument("--idle", type=float, default=8.0, help="seconds between the load and SIGTERM")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--clients", type=int, default=1, help="load processes")
    p.add_argument("--store", type=Path, default=REPO / "model_store")
    p.add_argument("--model", default="bytes-lstm")
    p.add_argument("--server-root", type=Path, default=REPO)
    p.add_argument("--no-pin", action="store_true")
    p.add_argument("--out", type=Path, help="also write the result here as JSON")
    return p.parse_args(argv)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    server_cpus, _ = split_cpus(args.no_pin)
    state_bytes = hidden_state_bytes(args.store, args.model)
    with tempfile.TemporaryDirectory(prefix="seqserve-shutdown-") as tmp:
        scratch = Path(tmp)
        env = {
            "SEQSERVE_SERVER__HTTP_PORT": "-1",
            "SEQSERVE_SESSIONS__TTL_SECONDS": "86400",
            "SEQSERVE_SESSIONS__MAX_SESSIONS": str(args.sessions + 5000),
            "SEQSERVE_SESSIONS__POOL_BYTES": str(args.pool_slots * state_bytes),
            "SEQSERVE_SESSIONS__POOL_INITIAL_SLOTS": str(args.pool_slots),
            "SEQSERVE_SESSIONS__SPILL_MAX_BYTES": str(64 << 30),
        }
        argv = ["-m", "service.cli.main", "serve", "--host", "127.0.0.1", "--port", "0",
                "--metrics-port", "-1", "--store", str(args.store),
                "--spill-dir", str(scratch / "spill")]  # fmt: skip
        server = start_server("shutdown", argv, scratch, server_cpus, env=env, cwd=args.server_root)
        try:
            made = make_sessions(
                server.target, args.model, args.sessions, args.concurrency, args.clients, True
            )
            time.sleep(args.idle)
            started = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            code = server.proc.wait(timeout=600)
            stop_seconds = time.monotonic() - started
        finally:
            server.stop()
        log = server.log_path.read_text(errors="replace").splitlines()
    return {
        "sessions": args.sessions,
        "pool_slots": args.pool_slots,
        "server_root": str(args.server_root),
        "create_with_prefix": made,
        "stop_seconds": stop_seconds,
        "exit_code": code,
        "shutdown_log": [line for line in log if "spilled" in line or "shutdown" in line],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = measure(args)
    made = result["create_with_prefix"]
    print(
        f"{result['sessions']:,} sessions, pool of {result['pool_slots']:,} slots: "
        f"{made['sessions_per_second']:,.0f} created/s ({made['errors']} errors); "
        f"SIGTERM to exit {result['stop_seconds']:.2f} s (exit code {result['exit_code']})"
    )
    for line in result["shutdown_log"]:
        print("  " + line)
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["exit_code"] == 0 and made["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
