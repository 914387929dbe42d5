"""The HTTP/JSON API against gRPC on the same server, side by side: one session stepping one
token per call, and 16 sessions doing so concurrently, in interleaved rounds; client latency
p50/p99 and the server's CPU per call (from /proc, so a loaded machine distorts it less).

    python -m benchmarks.http_api [--rounds 6] [--calls 200] [--store model_store]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import grpc

from benchmarks.processes import ServerProcess, start_server
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import session_service_pb2_grpc as pb_grpc
from service.pb.seqserve.v1 import types_pb2 as types

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "out"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


class _Sides:
    def __init__(self, http: aiohttp.ClientSession, stub: pb_grpc.SessionServiceStub) -> None:
        self.http = http
        self.stub = stub

    async def http_session(self, model: str) -> str:
        made = await (await self.http.post("/v1/sessions", json={"model": model})).json()
        return str(made["session"]["sessionId"])

    async def grpc_session(self, model: str) -> str:
        made = await self.stub.CreateSession(pb.CreateSessionRequest(model=model))
        return str(made.session.session_id)

    async def http_step(self, sid: str) -> None:
        response = await self.http.post(
            f"/v1/sessions/{sid}:step", json={"input": {"tokens": {"ids": [97]}}}
        )
        await response.read()
        assert response.status == 200, response.status

    async def grpc_step(self, sid: str) -> None:
        await self.stub.Step(
            pb.StepRequest(session_id=sid, input=types.Input(tokens=types.Tokens(ids=[97])))
        )


async def _round(step: Any, sids: list[str], calls: int, server: ServerProcess) -> dict[str, Any]:
    """`calls` steps per session, the sessions concurrently; latencies and server CPU."""
    latencies: list[float] = []

    async def one(sid: str) -> None:
        for _ in range(calls):
            t0 = time.perf_counter()
            await step(sid)
            latencies.append(time.perf_counter() - t0)

    cpu0, wall0 = server.cpu_seconds(), time.perf_counter()
    await asyncio.gather(*(one(s) for s in sids))
    cpu, wall = server.cpu_seconds() - cpu0, time.perf_counter() - wall0
    return {"latencies": latencies, "cpu": cpu, "wall": wall, "calls": len(latencies)}


async def measure(server: ServerProcess, http_port: int, args: argparse.Namespace) -> list[dict]:
    rows: list[dict[str, Any]] = []
    async with (
        aiohttp.ClientSession(f"http://127.0.0.1:{http_port}") as http,
        grpc.aio.insecure_channel(server.target) as channel,
    ):
        sides = _Sides(http, pb_grpc.SessionServiceStub(channel))
        for sessions in (1, 16):
            sids = {
                "http": [await sides.http_session(args.model) for _ in range(sessions)],
                "grpc": [await sides.grpc_session(args.model) for _ in range(sessions)],
            }
            steps = {"http": sides.http_step, "grpc": sides.grpc_step}
            totals: dict[str, dict[str, Any]] = {
                p: {"latencies": [], "cpu": 0.0, "wall": 0.0, "calls": 0} for p in steps
            }
            for _ in range(args.rounds):  # interleaved: the machine's noise hits both alike
                for protocol, step in steps.items():
                    r = await _round(step, sids[protocol], args.calls, server)
                    t = totals[protocol]
                    t["latencies"] += r["latencies"]
                    for k in ("cpu", "wall", "calls"):
                        t[k] += r[k]
            for protocol, t in totals.items():
                rows.append({
                    "protocol": protocol, "sessions": sessions, "calls": t["calls"],
                    "p50_ms": 1e3 * _percentile(t["latencies"], 0.50),
                    "p99_ms": 1e3 * _percentile(t["latencies"], 0.99),
                    "calls_per_s": t["calls"] / t["wall"],
                    "server_cpu_ms_per_call": 1e3 * t["cpu"] / t["calls"],
                })  # fmt: skip
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| sessions | protocol | p50 ms | p99 ms | calls/s | server CPU ms/call |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['sessions']} | {r['protocol']} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | "
            f"{r['calls_per_s']:.0f} | {r['server_cpu_ms_per_call']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--calls", type=int, default=200, help="steps per session per round")
    parser.add_argument("--model", default="bytes-lstm")
    parser.add_argument("--store", type=Path, default=REPO / "model_store")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="seqserve-http-bench-") as tmp:
        work = Path(tmp)
        argv_ = ["-m", "service.cli.main", "serve", "--host", "127.0.0.1", "--port", "0",
                 "--metrics-port", "-1", "--http-port", "0", "--store", str(args.store),
                 "--spill-dir", str(work / "spill")]  # fmt: skip
        server = start_server("seqserve", argv_, work, None, cwd=REPO)
        try:
            http_port = int(json.loads((work / "seqserve.ports.json").read_text())["http_port"])
            rows = asyncio.run(measure(server, http_port, args))
        finally:
            server.stop()
    OUT.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.http_api " + " ".join(sys.argv[1:] if argv is None else argv)
    (OUT / "http_api.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
