"""What replicas cost and give, side by side in one run: `python -m benchmarks.replicas [--quick]`.

Three comparisons, each measured in alternation over two rounds (drift shows as a spread):
- nginx in front of one replica against the same replica direct: one session, one token per
  message (p50 latency; the proxy hop);
- the Redis state tier against the local one: two servers, 64 sessions (tokens/s; every step's
  records go to Redis instead of a local file);
- one replica against two behind nginx, both on the Redis tier: 64 sessions, one routing key
  each (tokens/s). On a 2-core machine the load generator shares the cores: a report, no target.

Servers are pinned to the last CPU when there are two or more (the load generator gets the
others); the two-replica row pins both replicas to the server CPUs too, so it shows what a
second process costs or gives on the same cores. Writes `OUT/replicas.json`, prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path

from benchmarks.durability import load_row, rounds_table
from benchmarks.processes import ServerProcess, start_server
from benchmarks.real_services import NginxServer, RedisServer
from benchmarks.run import split_cpus

REPO = Path(__file__).resolve().parent.parent


def _serve(
    name: str, args: argparse.Namespace, work: Path, cpus, state_url: str = ""
) -> ServerProcess:  # type: ignore[no-untyped-def]
    argv = ["-m", "service.cli.main", "serve", "--host", "127.0.0.1", "--port", "0",
            "--metrics-port", "-1", "--http-port", "-1", "--store", str(args.store),
            "--spill-dir", str(work / f"{name}-state")]  # fmt: skip
    if state_url:
        argv += ["--state-url", state_url]
    return start_server(name, argv, work, cpus, timeout=300.0, cwd=REPO)


async def main_async(args: argparse.Namespace, work: Path) -> int:
    server_cpus, client_cpus = split_cpus(no_pin=False)
    if client_cpus:
        os.sched_setaffinity(0, client_cpus)
    window = 2.0 if args.quick else 5.0
    redis = RedisServer(work / "redis")
    redis.start()
    servers: dict[str, ServerProcess] = {}
    proxies: list[NginxServer] = []
    rows: dict[str, list[dict[str, float]]] = {}
    try:
        servers["local"] = _serve("local", args, work, server_cpus)
        servers["redis"] = _serve("redis", args, work, server_cpus, redis.url)
        servers["redis-b"] = _serve("redis-b", args, work, server_cpus, redis.url)
        one = NginxServer(work / "nginx-one", [servers["redis"].port])
        two = NginxServer(work / "nginx-two", [servers["redis"].port, servers["redis-b"].port])
        for proxy in (one, two):
            proxy.start()
            proxies.append(proxy)
        plan = [
            ("direct/1", servers["redis"].target, 1),
            ("nginx/1", one.target, 1),
            ("local tier/64", servers["local"].target, 64),
            ("redis tier/64", servers["redis"].target, 64),
            ("1 replica behind nginx/64", one.target, 64),
            ("2 replicas behind nginx/64", two.target, 64),
        ]
        for _round in range(2):
            for key, target, sessions in plan:
                got = await load_row(target, args.model, sessions, window)
                rows.setdefault(key, []).append(got)
                print(f"{key:28s} {got['tokens_per_second']:8,.0f} tokens/s  "
                      f"p50 {got['p50_ms']:.3f} ms", file=sys.stderr, flush=True)  # fmt: skip
    finally:
        for proxy in proxies:
            proxy.stop()
        for server in servers.values():
            server.stop()
        redis.kill()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "replicas.json").write_text(
        json.dumps({"window_seconds": window, "rows": rows}, indent=2) + "\n"
    )
    print("\n".join(rounds_table(rows, "setup")))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.replicas", description=__doc__)
    p.add_argument("--quick", action="store_true", help="2 s windows instead of 5 s")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out")
    p.add_argument("--store", type=Path, default=REPO / "model_store")
    p.add_argument("--model", default="bytes-lstm")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="seqserve-replicas-") as tmp:
        return asyncio.run(main_async(args, Path(tmp)))


if __name__ == "__main__":
    sys.exit(main())
