"""One session's latency while sessions are created fast beside it: `python -m benchmarks.churn`.

A real `seqserve serve` (default durability: journal, idle checkpoints after 5 s; auth off),
pinned to the last CPU when there are two or more. `--sessions` sessions are created over gRPC
with a one-token prefix, `--concurrency` in flight (`benchmarks.session_load.make_sessions`); once
the first of them are due for their idle checkpoint (`--probe-after` seconds in), one more
session feeds one token every `--think-ms` (`seqserve loadtest --sessions 1`) for
`--probe-seconds`. Reported per server: creations per second, and that one session's mean /
p50 / p99 / max step latency. The sweep that writes the idle checkpoints shares the event loop
with both; this shows what it costs the session beside it.

Also reported: the server's CPU per creation, its main thread (the event loop) apart from the
rest (the runner, store-reader, journal and other threads; `/proc/<pid>/task/*/stat`), from the
load's start until `--settle` seconds after its end (the last sessions' idle checkpoints), and
the rows per batched step (`seqserve_batch_rows`). The probe's feeds count in that CPU;
`--probe-seconds 0` leaves the probe out. And the checkpoints written meanwhile with their
mean wall time (`seqserve_state_write_seconds_total` ÷ `seqserve_state_writes_total`): each
new session's idle checkpoint creates a file, and on this VM the kernel's price for a new
file moves from ~15 to ~700 µs with the directory's place on the disk and the hour, so two
runs compare only where these agree. `--scratch DIR` puts the state directories under DIR
(a tmpfs such as /dev/shm takes the disk out).

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

from benchmarks.filesystem import state_filesystem
from benchmarks.processes import mean_write_us, scrape, start_server, state_writes
from benchmarks.run import split_cpus
from benchmarks.session_load import make_sessions

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.churn", description=__doc__)
    p.add_argument("--sessions", type=int, default=14_000, help="sessions created")
    p.add_argument("--concurrency", type=int, default=64, help="creations in flight")
    p.add_argument("--probe-after", type=float, default=6.0, help="seconds into the creations")
    p.add_argument("--probe-seconds", type=float, default=8.0, help="0: no probe")
    p.add_argument("--settle", type=float, default=6.5, help="CPU counted this long after")
    p.add_argument("--think-ms", type=float, default=5.0, help="the probe's pause between feeds")
    p.add_argument("--compare", type=Path, help="another checkout's root, run alternately")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--store", type=Path, default=REPO / "model_store")
    p.add_argument("--model", default="bytes-lstm")
    p.add_argument("--no-pin", action="store_true")
    p.add_argument("--out", type=Path, help="also write the results here as JSON")
    p.add_argument(
        "--scratch", type=Path, help="the state directories go in a temporary directory here "
        "(default: the system's temporary directory)",
    )  # fmt: skip
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


def measure(args: argparse.Namespace, root: Path, server_cpus: list[int] | None) -> dict[str, Any]:
    """One run against the server in `root`, pinned to `server_cpus` (None: not pinned)."""
    with tempfile.TemporaryDirectory(prefix="seqserve-churn-", dir=args.scratch) as tmp:
        scratch = Path(tmp)
        state_dir = scratch / "spill"
        filesystem = state_filesystem(scratch)
        env = {
            "SEQSERVE_SERVER__HTTP_PORT": "-1",
            "SEQSERVE_SESSIONS__MAX_SESSIONS": str(args.sessions + 5000),
        }
        argv = ["-m", "service.cli.main", "serve", "--host", "127.0.0.1", "--port", "0",
                "--metrics-port", "0", "--store", str(args.store),
                "--spill-dir", str(state_dir)]  # fmt: skip
        server = start_server("churn", argv, scratch, server_cpus, env=env, cwd=root)
        made: dict[str, Any] = {}
        latency: dict[str, float] | None = None
        try:

            def create() -> None:
                n, k = args.sessions, args.concurrency
                made.update(make_sessions(server.target, args.model, n, k, 1, True))

            cpu0, rows0 = thread_cpu(server.proc.pid), batch_rows(server.metrics_port)
            writes0 = state_writes(server.metrics_port)
            load = threading.Thread(target=create)
            load.start()
            if args.probe_seconds > 0:
                time.sleep(3.0 + args.probe_after)  # (make_sessions starts its clock after ~3 s)
                latency = probe(args, server.target, scratch)
            load.join()
            time.sleep(args.settle)
            cpu1, rows1 = thread_cpu(server.proc.pid), batch_rows(server.metrics_port)
            writes1 = state_writes(server.metrics_port)
        finally:
            server.stop()
    if made.get("errors"):
        raise RuntimeError(f"{made['errors']} creations failed")
    n = args.sessions
    return {
        "server_root": str(root),
        "sessions_per_second": made["sessions_per_second"],
        "probe_ms": latency,
        "server_cpu_us_per_creation": {
            "main_thread": (cpu1[0] - cpu0[0]) / n * 1e6,
            "other_threads": (cpu1[1] - cpu0[1]) / n * 1e6,
        },
        "rows_per_step": (rows1[0] - rows0[0]) / max(1.0, rows1[1] - rows0[1]),
        "state_writes": writes1[0] - writes0[0],
        "state_write_us": mean_write_us(writes0, writes1),
        "state_filesystem": filesystem,
        "state_dir": str(state_dir),
        "load_average_1m_before": made["load_average_1m_before"],
    }


def thread_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds of a process's main thread, and of all its other threads together."""
    tick = os.sysconf("SC_CLK_TCK")
    main = rest = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # a thread that just ended
            continue
        cpu = (int(fields[11]) + int(fields[12])) / tick
        if task.name == str(pid):
            main += cpu
        else:
            rest += cpu
    return main, rest


def batch_rows(metrics_port: int) -> tuple[float, float]:
    """`seqserve_batch_rows` sum and count, all versions together."""
    found = scrape(metrics_port)
    return found.get("seqserve_batch_rows_sum", 0.0), found.get("seqserve_batch_rows_count", 0.0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Split once: after pinning this process, `split_cpus` would see the load's CPUs only (and
    # leave the server unpinned, inheriting them: on two CPUs, server and load shared one).
    server_cpus, load_cpus = split_cpus(args.no_pin)
    if load_cpus:
        os.sched_setaffinity(0, load_cpus)  # the load processes inherit it
    roots = [REPO] + ([args.compare.resolve()] if args.compare else [])
    results: list[dict[str, Any]] = []
    for rep in range(args.reps):
        for root in roots if rep % 2 == 0 else roots[::-1]:
            result = measure(args, root, server_cpus)
            results.append(result)
            rate, cpu = result["sessions_per_second"], result["server_cpu_us_per_creation"]
            line = (
                f"{root}: {rate:,.0f} creations/s; server CPU {cpu['main_thread']:,.0f} µs a "
                f"creation on the main thread, {cpu['other_threads']:,.0f} on the others; "
                f"{result['rows_per_step']:.1f} rows per step; {result['state_writes']:,.0f} "
                f"checkpoints written"
            )
            if result["state_write_us"] is not None:
                line += f", {result['state_write_us']:,.0f} µs each"
            if result["state_filesystem"]:
                line += f" (state on {result['state_filesystem']})"
            if (p := result["probe_ms"]) is not None:
                step = ", ".join(f"{k} {p[k]:.1f} ms" for k in ("mean", "p50", "p99", "max"))
                line += f"; one session's step {step}"
            print(line, flush=True)
    if args.out:
        shown = sys.argv[1:] if argv is None else argv
        summary = {"command": "python -m benchmarks.churn " + " ".join(shown), "runs": results}
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
