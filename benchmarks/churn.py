"""One session's latency while sessions are created fast beside it: `python -m benchmarks.churn`.

A real `seqserve serve` (default durability: journal, idle checkpoints after 5 s; auth off),
pinned to the last CPU when there are two or more. `--sessions` sessions are created over gRPC
with a one-token prefix, `--concurrency` in flight (`benchmarks.memory.make_sessions`); once
the first of them are due for their idle checkpoint (`--probe-after` seconds in), one more
session feeds one token every `--think-ms` (`seqserve loadtest --sessions 1`) for
`--probe-seconds`. Reported per server: creations per second, and that one session's mean /
p50 / p99 / max step latency. The sweep that writes the idle checkpoints shares the event loop
with both; this shows what it costs the session beside it.

`--compare ROOT` runs the same against a server started from another checkout (a `git
worktree` of an older commit), the two alternating `--reps` times: a before/after pair measured
side by side. The load runs on the other CPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.memory import make_sessions
from benchmarks.processes import start_server
from benchmarks.run import split_cpus

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.churn", description=__doc__)
    p.add_argument("--sessions", type=int, default=14_000, help="sessions created")
    p.add_argument("--concurrency", type=int, default=64, help="creations in flight")
    p.add_argument("--probe-after", type=float, default=6.0, help="seconds into the creations")
    p.add_argument("--probe-seconds", type=float, default=8.0)
    p.add_argument("--think-ms", type=float, default=5.0, help="the probe's pause between feeds")
    p.add_argument("--compare", type=Path, help="another checkout's root, run alternately")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--store", type=Path, default=REPO / "model_store")
    p.add_argument("--model", default="bytes-lstm")
    p.add_argument("--no-pin", action="store_true")
    p.add_argument("--out", type=Path, help="also write the results here as JSON")
    return p.parse_args(argv)


def probe(args: argparse.Namespace, target: str, scratch: Path) -> dict[str, float]:
    """One session feeding every `think_ms` for `probe_seconds`: its step latency, in ms."""
    report = scratch / "probe.json"
    cmd = [sys.executable, "-m", "service.cli.main", "loadtest", "--target", target,
           "--model", args.model, "--sessions", "1", "--think-ms", str(args.think_ms),
           "--duration", str(args.probe_seconds), "--warmup", "0.5", "--quiet",
           "--json", str(report)]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL, timeout=300)
    latency = json.loads(report.read_text())["step_latency"]
    return {k: 1000.0 * latency[k] for k in ("mean", "p50", "p99", "max")} | {
        "count": latency["count"]
    }


def measure(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    server_cpus, _ = split_cpus(args.no_pin)
    with tempfile.TemporaryDirectory(prefix="seqserve-churn-") as tmp:
        scratch = Path(tmp)
        env = {
            "SEQSERVE_SERVER__HTTP_PORT": "-1",
            "SEQSERVE_SESSIONS__MAX_SESSIONS": str(args.sessions + 5000),
        }
        argv = ["-m", "service.cli.main", "serve", "--host", "127.0.0.1", "--port", "0",
                "--metrics-port", "-1", "--store", str(args.store),
                "--spill-dir", str(scratch / "spill")]  # fmt: skip
        server = start_server("churn", argv, scratch, server_cpus, env=env, cwd=root)
        made: dict[str, Any] = {}
        try:

            def create() -> None:
                n, k = args.sessions, args.concurrency
                made.update(make_sessions(server.target, args.model, n, k, 1, True))

            load = threading.Thread(target=create)
            load.start()
            time.sleep(3.0 + args.probe_after)  # (make_sessions starts its clock after ~3 s)
            latency = probe(args, server.target, scratch)
            load.join()
        finally:
            server.stop()
    if made.get("errors"):
        raise RuntimeError(f"{made['errors']} creations failed")
    return {
        "server_root": str(root),
        "sessions_per_second": made["sessions_per_second"],
        "probe_ms": latency,
        "load_average_1m_before": made["load_average_1m_before"],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _, load_cpus = split_cpus(args.no_pin)
    if load_cpus:
        os.sched_setaffinity(0, load_cpus)  # the load processes inherit it
    roots = [REPO] + ([args.compare.resolve()] if args.compare else [])
    results: list[dict[str, Any]] = []
    for rep in range(args.reps):
        for root in roots if rep % 2 == 0 else roots[::-1]:
            result = measure(args, root)
            results.append(result)
            p = result["probe_ms"]
            step = ", ".join(f"{k} {p[k]:.1f} ms" for k in ("mean", "p50", "p99", "max"))
            rate = result["sessions_per_second"]
            print(f"{root}: {rate:,.0f} creations/s; one session's step {step}", flush=True)
    if args.out:
        shown = sys.argv[1:] if argv is None else argv
        summary = {"command": "python -m benchmarks.churn " + " ".join(shown), "runs": results}
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
