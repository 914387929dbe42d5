"""What refused requests cost the server: `python -m benchmarks.refusals`.

A real `seqserve serve` (default settings, auth off), pinned to the last CPU when there are two
or more; the load runs here, on the other CPUs, `--concurrency` requests in flight for
`--seconds`:
- `unary`: Step calls on sessions that do not exist, each refused with NOT_FOUND (the call's
  status);
- `inband`: Stream messages of one item for a session that does not exist, each answered with
  an in-band NOT_FOUND (the stream goes on).

Reported per load: refusals per second, the server's CPU per refusal (`/proc/<pid>/stat`), the
young collections Python ran meanwhile (`seqserve_gc_pause_seconds_count{generation="0"}`), and
what the server's next thaw of its frozen heap found unreachable
(`seqserve_gc_thawed_garbage_objects_total`, `server.gc_thaw_seconds` set to the run's length):
the reference cycles that requests left behind after a collection had frozen them.

`--compare ROOT` runs the same against a server started from another checkout (a `git worktree`
of an older commit), the two alternating `--reps` times.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.processes import SampleKey, ServerProcess, scrape_samples, start_server
from benchmarks.run import split_cpus

REPO = Path(__file__).resolve().parent.parent
LOADS = ("unary", "inband")
WARMUP_SECONDS = 1.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.refusals", description=__doc__)
    p.add_argument("loads", nargs="*", metavar="{unary,inband}", help="default: both")
    p.add_argument("--seconds", type=float, default=5.0, help="seconds measured per load")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    p.add_argument("--compare", type=Path, help="another checkout's root, run alternately")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--store", type=Path, default=REPO / "model_store")
    p.add_argument("--no-pin", action="store_true")
    p.add_argument("--out", type=Path, help="also write the results here as JSON")
    args = p.parse_args(argv)
    unknown = sorted(set(args.loads) - set(LOADS))
    if unknown:
        p.error(f"unknown loads {unknown}; choose from {list(LOADS)}")
    args.loads = args.loads or list(LOADS)
    return args


def _collections(found: dict[SampleKey, float], gen: int) -> float:
    return found.get(("seqserve_gc_pause_seconds_count", (("generation", str(gen)),)), 0.0)


def _thawed(found: dict[SampleKey, float]) -> float:
    return found.get(("seqserve_gc_thawed_garbage_objects_total", ()), 0.0)


async def refuse(target: str, load: str, seconds: float, concurrency: int) -> tuple[int, int]:
    """Refused requests for `seconds`, `concurrency` in flight. → (refusals, other answers)."""
    import grpc

    from service.pb.seqserve.v1 import session_service_pb2 as pb
    from service.pb.seqserve.v1 import session_service_pb2_grpc as pb_grpc
    from service.pb.seqserve.v1 import types_pb2 as types

    one = types.Input(tokens=types.Tokens(ids=[1]))
    refused = other = 0
    not_found = grpc.StatusCode.NOT_FOUND
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.SessionServiceStub(channel)
        stop = time.monotonic() + seconds

        async def unary(k: int) -> None:
            nonlocal refused, other
            request = pb.StepRequest(session_id=f"no-such-session-{k}", input=one)
            while time.monotonic() < stop:
                try:
                    await stub.Step(request)
                    other += 1
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == not_found:
                        refused += 1
                    else:
                        other += 1

        async def inband(k: int) -> None:
            nonlocal refused, other
            message = pb.StreamRequest(
                items=[pb.StreamItem(session_id=f"no-such-session-{k}", input=one)]
            )
            call = stub.Stream()
            while time.monotonic() < stop:
                await call.write(message)
                response = await call.read()
                if response.replies[0].error.code == not_found.value[0]:
                    refused += 1
                else:
                    other += 1
            await call.done_writing()
            await call.read()  # the end of the stream

        work = unary if load == "unary" else inband
        await asyncio.gather(*(work(k) for k in range(concurrency)))
    return refused, other


def measure(
    args: argparse.Namespace, root: Path, load: str, server_cpus: list[int] | None
) -> dict[str, Any]:
    """One load against the server in `root`, pinned to `server_cpus` (None: not pinned)."""
    # The thaw comes once the load is over (the server's start is about a second before it).
    thaw_seconds = WARMUP_SECONDS + args.seconds + 3.0
    with tempfile.TemporaryDirectory(prefix="seqserve-refusals-") as tmp:
        scratch = Path(tmp)
        env = {
            "SEQSERVE_SERVER__HTTP_PORT": "-1",
            "SEQSERVE_SERVER__GC_THAW_SECONDS": str(thaw_seconds),
        }
        argv = ["-m", "service.cli.main", "serve", "--host", "127.0.0.1", "--port", "0",
                "--metrics-port", "0", "--store", str(args.store),
                "--spill-dir", str(scratch / "spill")]  # fmt: skip
        server: ServerProcess = start_server(
            "refusals", argv, scratch, server_cpus, env=env, cwd=root
        )
        try:
            asyncio.run(refuse(server.target, load, WARMUP_SECONDS, args.concurrency))
            before, cpu0, t0 = (
                scrape_samples(server.metrics_port),
                server.cpu_seconds(),
                time.monotonic(),
            )
            refused, other = asyncio.run(
                refuse(server.target, load, args.seconds, args.concurrency)
            )
            elapsed, cpu1 = time.monotonic() - t0, server.cpu_seconds()
            after = scrape_samples(server.metrics_port)
            deadline = time.monotonic() + thaw_seconds + 10.0
            thawed = after
            while _collections(thawed, 2) == _collections(before, 2):  # the thaw's collection
                if time.monotonic() > deadline:
                    raise RuntimeError("the server did not thaw its heap")
                time.sleep(0.5)
                thawed = scrape_samples(server.metrics_port)
        finally:
            server.stop()
    if other:
        raise RuntimeError(f"{other} requests were not refused with NOT_FOUND")
    return {
        "server_root": str(root),
        "load": load,
        "refusals_per_second": refused / elapsed,
        "server_cpu_us_per_refusal": (cpu1 - cpu0) / max(1, refused) * 1e6,
        "young_collections": _collections(after, 0) - _collections(before, 0),
        "thawed_garbage_objects": _thawed(thawed) - _thawed(before),
        "refusals": refused,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    server_cpus, load_cpus = split_cpus(args.no_pin)  # once: pinning narrows what it sees
    if load_cpus:
        os.sched_setaffinity(0, load_cpus)  # the load runs in this process
    roots = [REPO] if args.compare is None else [args.compare.resolve(), REPO]
    results = []
    print("| load | server | refusals/s | server CPU µs a refusal | young collections "
          "| garbage found by the thaw |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|")
    for _ in range(args.reps):
        for load in args.loads:
            for root in roots:
                r = measure(args, root, load, server_cpus)
                results.append(r)
                print(
                    f"| {load} | {root} | {r['refusals_per_second']:,.0f} "
                    f"| {r['server_cpu_us_per_refusal']:.1f} | {r['young_collections']:.0f} "
                    f"| {r['thawed_garbage_objects']:,.0f} |",
                    flush=True,
                )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
