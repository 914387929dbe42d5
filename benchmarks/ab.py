"""Two source trees side by side: `python -m benchmarks.ab --base DIR [--head DIR] LOAD...`.

A change to the hot path is judged against the code before it, on the same machine in the same
minutes: both trees' servers run at once (each `python -m service.cli.main serve` started in
its tree, pinned like `benchmarks.run` pins), and each load alternates between them, the order
flipped every repetition. Reported per load and tree: medians over the repetitions of tokens/s,
server CPU per token, rows per step, p50 / p99 and time to first token. Make a base tree with
`git worktree add /tmp/base HEAD~1`. Loads: stream1, stream16, stream64, mux64, cmux64, gen1,
gen16, gen64, and burst64 / burst64x1 (64 Generate calls sent at once on idle sessions, 64
tokens or one token each: `benchmarks.burst`, time to first token).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.burst import generation_burst
from benchmarks.processes import ServerProcess, start_server
from benchmarks.results import Row
from benchmarks.run import REPO, Bench, split_cpus

_GEN = {"generate_fraction": 1.0, "max_tokens": 64}
LOADS: dict[str, dict[str, object]] = {
    "stream1": {"sessions": 1},
    "stream16": {"sessions": 16},
    "stream64": {"sessions": 64},
    "mux64": {"sessions": 64, "multiplex": 64},
    "cmux64": {"sessions": 64, "client_mux": True},
    "gen1": {"sessions": 1, **_GEN},
    "gen16": {"sessions": 16, **_GEN},
    "gen64": {"sessions": 64, **_GEN},
}
BURSTS: dict[str, int] = {"burst64": 64, "burst64x1": 1}  # load -> tokens per Generate call


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=__doc__)
    p.add_argument("loads", nargs="+", choices=sorted([*LOADS, *BURSTS]))
    p.add_argument("--base", type=Path, required=True, help="the tree to compare against")
    p.add_argument("--head", type=Path, default=REPO, help="the tree under test (this one)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--window", type=float, default=4.0, help="seconds measured per load")
    p.add_argument("--store", type=Path, default=REPO / "model_store")
    p.add_argument("--model", default="bytes-lstm")
    p.add_argument("--no-pin", action="store_true")
    p.add_argument(
        "--echo",
        action="store_true",
        help="run each tree's bare echo server (benchmarks.echo_server), not the service: for a "
        "change to the event loop or server set-up they share, which moves the ceiling too",
    )
    return p.parse_args(argv)


def _serve(name: str, tree: Path, args: argparse.Namespace, scratch: Path, cpus) -> ServerProcess:  # type: ignore[no-untyped-def]
    if args.echo:
        return start_server(
            name, ["-m", "benchmarks.echo_server", "--port", "0"], scratch, cpus, cwd=tree
        )
    argv = ["-m", "service.cli.main", "serve", "--host", "127.0.0.1", "--port", "0",
            "--metrics-port", "0", "--http-port", "-1", "--store", str(args.store),
            "--spill-dir", str(scratch / f"spill-{name}")]  # fmt: skip
    return start_server(name, argv, scratch, cpus, cwd=tree)


def summary(rows: list[Row]) -> dict[str, float | None]:
    """Medians over repetitions (None where no repetition has the figure)."""

    def median(f: Callable[[Row], float | None]) -> float | None:
        values = [v for v in (f(r) for r in rows) if v is not None]
        return statistics.median(values) if values else None

    return {
        "tokens_per_second": median(lambda r: r.tokens_per_second),
        "cpu_us_per_token": median(
            lambda r: (
                1e6 * r.server_cpu / r.tokens_per_second
                if r.server_cpu and r.tokens_per_second
                else None
            )
        ),
        "rows_per_step": median(lambda r: r.rows_per_step),
        "p50_ms": median(lambda r: r.p50_ms),
        "p99_ms": median(lambda r: r.p99_ms),
        "ttft_p50_ms": median(lambda r: r.ttft_p50_ms),
    }


async def main_async(args: argparse.Namespace) -> dict[str, dict[str, dict[str, float | None]]]:
    server_cpus, client_cpus = split_cpus(args.no_pin)
    if client_cpus:
        os.sched_setaffinity(0, client_cpus)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="seqserve-ab-") as tmp:
        scratch = Path(tmp)
        servers = {
            "base": _serve("base", args.base, args, scratch, server_cpus),
            "head": _serve("head", args.head, args, scratch, server_cpus),
        }
        bench = Bench(
            argparse.Namespace(model=args.model, quick=False), servers["base"], servers["head"]
        )
        bench.window = args.window
        try:
            for rep in range(args.reps):
                order = ("base", "head") if rep % 2 == 0 else ("head", "base")
                for load in args.loads:
                    for name in order:
                        key = f"{load}/{name}/{rep}"
                        if load in BURSTS:
                            burst = await generation_burst(
                                servers[name].target, args.model, 64, rounds=4,
                                max_tokens=BURSTS[load],
                            )  # fmt: skip
                            bench.rows.append(Row.burst(key, load, burst))
                        else:
                            await bench.load(key, servers[name], load, **LOADS[load])
        finally:
            for server in servers.values():
                server.stop()
    return {
        load: {
            name: summary([r for r in bench.rows if r.key.startswith(f"{load}/{name}/")])
            for name in ("base", "head")
        }
        for load in args.loads
    }


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = asyncio.run(main_async(args))
    print("| load | tree | tokens/s | CPU µs/token | rows/step | p50 ms | p99 ms | TTFT p50 ms |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for load, trees in results.items():
        for name, s in trees.items():
            print(
                f"| {load} | {name} | {_fmt(s['tokens_per_second'], ',.0f')} "
                f"| {_fmt(s['cpu_us_per_token'], '.1f')} | {_fmt(s['rows_per_step'], '.1f')} "
                f"| {_fmt(s['p50_ms'], '.3f')} | {_fmt(s['p99_ms'], '.3f')} "
                f"| {_fmt(s['ttft_p50_ms'], '.2f')} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
