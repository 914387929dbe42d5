"""seqserve benchmarks, side by side in one run: `python -m benchmarks.run [--quick] [--out DIR]`.

Measures, on one model:
- the service (a `seqserve serve` subprocess) at 1, 16 and 64 streaming sessions, one token per
  message; 64 sessions multiplexed into one frame per tick, by the load generator and by the
  Python client (64 concurrent `session.feed()` calls); server-pushed generation at 16
  and 64 sessions; one session's per-token latency at history 10, 1,000 and 10,000;
- the bare gRPC echo ceiling: the same loads against `benchmarks.echo_server` (no model);
- the compute ceiling: the runner's batched step in-process at batch 1, 16 and 64;
- a stateless baseline that re-runs the whole history for every token.
The in-process rows run on the servers' CPU (idle then), half their time before the loads and
half after, so a host whose speed drifts over the run moves them as it moves the loads.

The load comes from `service.loadtest` in this process; each server runs in its own process,
pinned to its own CPU when there are two or more. Writes `OUT/results.json` and the markdown
table (`benchmarks/RESULTS.md` by default). These are measurements, not tests: nothing fails
on a slow machine; the targets table says what was met.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import inprocess
from benchmarks.burst import Burst, generation_burst
from benchmarks.filesystem import state_filesystem
from benchmarks.processes import ServerProcess, scrape, start_server
from benchmarks.results import Row, evaluate_targets, machine_info, write_markdown
from service.loadtest import LoadConfig, run_load
from service.loadtest.progress import Progress

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    p.add_argument("--quick", action="store_true", help="short windows (~1 minute in all)")
    p.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "out", help="results.json, server logs"
    )
    p.add_argument(
        "--results",
        type=Path,
        default=REPO / "benchmarks" / "RESULTS.md",
        help="where the markdown table goes",
    )
    p.add_argument("--store", type=Path, default=REPO / "model_store")
    p.add_argument("--model", default="bytes-lstm")
    p.add_argument(
        "--random-model",
        action="store_true",
        help="benchmark a random-weight LSTM of bytes-lstm's shape (2x256, embed 64) "
        "in a temporary store instead (for before the shipped model exists)",
    )
    p.add_argument("--no-pin", action="store_true", help="do not pin servers and client to CPUs")
    p.add_argument(
        "--memory-sessions",
        type=int,
        default=0,
        help="also the memory-per-session and churn rows of benchmarks.memory at this many "
        "sessions (e.g. 100000: minutes; 0 = skip)",
    )
    return p.parse_args(argv)


def publish_random_model(root: Path, name: str) -> None:
    from service.models import ModelConfig, SequenceModel
    from service.registry.manifest import Training
    from service.registry.store import ModelStore

    config = ModelConfig(
        cell="lstm", num_layers=2, hidden_size=256, input_kind="tokens", input_dim=256,
        embed_dim=64, head_kind="classification", output_dim=256,
    )  # fmt: skip
    torch.manual_seed(0)
    ModelStore(root).publish(
        name, config, SequenceModel(config).state_dict(),
        description="random weights, bytes-lstm's shape (benchmark stand-in)",
        training=Training(data="random init", steps=0, seed=0),
    )  # fmt: skip


def split_cpus(no_pin: bool) -> tuple[list[int] | None, list[int] | None]:
    """(server CPUs, client CPUs): the last CPU for servers, the rest for the load."""
    cpus = sorted(os.sched_getaffinity(0))
    if no_pin or len(cpus) < 2:
        return None, None
    return cpus[-1:], cpus[:-1]


def _delta(before: dict[str, float], after: dict[str, float]):  # type: ignore[no-untyped-def]
    """Increase of a series between two scrapes (absent = 0: series appear with a model)."""
    return lambda name: after.get(name, 0.0) - before.get(name, 0.0)


class Bench:
    def __init__(self, args: argparse.Namespace, service: ServerProcess, echo: ServerProcess):
        self.args = args
        self.service = service
        self.echo = echo
        self.window = 2.0 if args.quick else 5.0
        self.warmup = 0.5 if args.quick else 1.0
        self.rows: list[Row] = []
        self.reports: dict[str, dict[str, object]] = {}
        self._halves: dict[str, list[inprocess.Timing]] = {}  # in-process timings, by row

    async def load(self, key: str, server: ServerProcess, label: str, **cfg: object) -> None:
        config = LoadConfig(
            target=server.target, model=self.args.model, duration_seconds=self.window,
            warmup_seconds=self.warmup, seed=1, **cfg,  # type: ignore[arg-type]
        )  # fmt: skip
        before = scrape(server.metrics_port) if server.metrics_port > 0 else None
        marks: dict[str, tuple[float, float, float]] = {}

        def mark(progress: Progress) -> None:  # CPU clocks as the window opens and closes
            now = (time.perf_counter(), time.process_time(), server.cpu_seconds())
            if progress.phase == "measuring":
                marks.setdefault("open", now)
            elif progress.phase == "draining":
                marks["close"] = now

        report = await run_load(config, progress=mark, progress_interval=0.2)
        (w0, c0, s0), (w1, c1, s1) = marks["open"], marks["close"]
        client_cpu, server_cpu = (c1 - c0) / (w1 - w0), (s1 - s0) / (w1 - w0)
        rows_per_step = step_cpu_us = None
        if before is not None:
            delta = _delta(before, scrape(server.metrics_port))
            steps = delta("seqserve_batch_rows_count")
            rows_per_step = delta("seqserve_batch_rows_sum") / steps if steps else None
            tokens = delta("seqserve_tokens_in_total") + delta("seqserve_tokens_generated_total")
            cpu = delta("seqserve_step_cpu_seconds_total")
            step_cpu_us = 1e6 * cpu / tokens if tokens and cpu else None
        self.reports[key] = report.to_dict()
        self._add(
            Row.from_report(key, label, report, rows_per_step, server_cpu, client_cpu, step_cpu_us)
        )

    async def run_rpc(self) -> None:
        """Service and echo rows alternate, so both see the machine in the same state."""
        svc, echo = self.service, self.echo
        gen = {"generate_fraction": 1.0, "max_tokens": 64}
        for n in (1, 16, 64):
            await self.load(f"service/stream/{n}", svc, "service: stream, 1 token/msg", sessions=n)
            await self.load(f"echo/stream/{n}", echo, "echo: stream, 1 token/msg", sessions=n)
        mux = {"sessions": 64, "multiplex": 64}
        await self.load("service/mux/64", svc, "service: 64 sessions per frame", **mux)
        await self.load("echo/mux/64", echo, "echo: 64 sessions per frame", **mux)
        # The same 64 sessions fed as an app writes it: one `await session.feed()` per token
        # and session on one SeqServeClient, which coalesces each tick's feeds into a frame.
        cmux = {"sessions": 64, "client_mux": True}
        label = "service: 64 sessions, client coalescing, 1 token/feed"
        await self.load("service/client-mux/64", svc, label, **cmux)
        label = "echo: 64 sessions, client coalescing, 1 token/feed"
        await self.load("echo/client-mux/64", echo, label, **cmux)
        for n in (16, 64):
            await self.load(
                f"service/generate/{n}", svc, "service: Generate (push)", sessions=n, **gen
            )
            await self.load(f"echo/generate/{n}", echo, "echo: Generate (push)", sessions=n, **gen)
        await self.bursts()
        for h in (10, 1000, 10000):
            label = f"service: 1 session at history {h:,}"
            await self.load(f"service/history/{h}", svc, label, sessions=1, history=h)

    async def bursts(self) -> None:
        """64 Generate calls sent at once, on idle sessions: time to first token, service and
        echo in alternate rounds; with 64 tokens a call, and with one (the echo server's
        one-token burst is what gRPC alone takes to answer 64 calls started together)."""
        rounds = 2 if self.args.quick else 4
        for key, max_tokens, label in (
            ("generate-burst", 64, "{}: 64 Generate calls started at once"),
            ("generate-burst-1", 1, "{}: 64 one-token Generate calls started at once"),
        ):
            found: dict[str, list[Burst]] = {"service": [], "echo": []}
            for _ in range(2):
                for name, server in (("service", self.service), ("echo", self.echo)):
                    found[name].append(
                        await generation_burst(
                            server.target, self.args.model, 64, rounds, max_tokens=max_tokens
                        )
                    )
            for name, bursts in found.items():
                merged = Burst(
                    64, sum(b.rounds for b in bursts), [t for b in bursts for t in b.ttft_seconds],
                    sum(b.tokens for b in bursts), sum(b.seconds for b in bursts),
                )  # fmt: skip
                self._add(Row.burst(f"{name}/{key}/64", label.format(name), merged))

    def measure_inprocess(self, model_store: Path, cpus: list[int] | None) -> None:
        """Half of each in-process row's time (the runner's step, the generation step, the
        stateless baseline), on the CPU the servers run on (`cpus`; they are idle now): called
        before the loads and again after them, so a host that drifts faster or slower over the
        run moves the served and the in-process rows alike. `inprocess_rows` makes the rows."""
        previous = os.sched_getaffinity(0)
        if cpus:
            os.sched_setaffinity(0, cpus)
        try:
            model = inprocess.load_model(model_store, self.args.model)
            seconds = 0.25 if self.args.quick else 1.0
            for batch in (1, 16, 64):
                self._timed(f"compute/step/{batch}", inprocess.batched_step(model, batch, seconds))
            for batch in (1, 16, 64):
                self._timed(
                    f"compute/generate/{batch}", inprocess.generation_step(model, batch, seconds)
                )
            for h in (10, 1000, 10000):
                self._timed(f"stateless/{h}", inprocess.stateless_per_token(model, h, seconds))
        finally:
            os.sched_setaffinity(0, previous)

    def _timed(self, key: str, timing: inprocess.Timing) -> None:
        self._halves.setdefault(key, []).append(timing)

    def inprocess_rows(self) -> None:
        """The in-process rows from both halves (their calls and time summed); each half's
        per-call time is kept in the report (`inprocess halves`), to show the drift."""
        labels = {
            "compute/step": "in-process batched step (no RPC)",
            "compute/generate": "in-process generation step (no RPC)",
        }
        drift: dict[str, object] = {}
        for key, halves in self._halves.items():
            kind, _, size = key.rpartition("/")
            calls = sum(t.calls for t in halves)
            seconds = sum(t.seconds for t in halves)
            if kind == "stateless":
                label, batch = f"stateless: re-run {int(size):,} tokens per token", 1
            else:
                label, batch = labels[kind], int(size)
            self._add(Row.compute(key, label, batch, seconds / calls))
            drift[key] = [round(t.per_call * 1e3, 4) for t in halves]
        self.reports["inprocess halves"] = {"per_call_ms_before_and_after_the_loads": drift}

    def _add(self, row: Row) -> None:
        self.rows.append(row)
        print(row.progress_line(), file=sys.stderr, flush=True)


async def main_async(args: argparse.Namespace, store: Path, scratch: Path) -> int:
    server_cpus, client_cpus = split_cpus(args.no_pin)
    if client_cpus:
        os.sched_setaffinity(0, client_cpus)
    torch.set_num_threads(1)  # like the server: one intra-op thread
    args.out.mkdir(parents=True, exist_ok=True)
    spill = scratch / "spill"
    service = start_server(
        "seqserve",
        ["-m", "service.cli.main", "serve", "--host", "127.0.0.1", "--port", "0",
         "--metrics-port", "0", "--http-port", "-1", "--store", str(store),
         "--spill-dir", str(spill)],
        args.out, server_cpus,
    )  # fmt: skip
    echo = None
    try:
        echo = start_server(
            "echo", ["-m", "benchmarks.echo_server", "--port", "0"], args.out, server_cpus
        )
        bench = Bench(args, service, echo)
        load_before = os.getloadavg()
        started = time.time()
        bench.measure_inprocess(store, server_cpus)
        await bench.run_rpc()
        bench.measure_inprocess(store, server_cpus)
        bench.inprocess_rows()
        elapsed = time.time() - started
    finally:
        service.stop()
        if echo is not None:
            echo.stop()
    info = machine_info(server_cpus, client_cpus, load_before, os.getloadavg(), elapsed)
    info["model"] = args.model + (" (random weights)" if args.random_model else "")
    info["store"] = str(store)
    info["state_filesystem"] = state_filesystem(scratch)
    command = "python -m benchmarks.run " + shlex.join(sys.argv[1:])
    targets = evaluate_targets({r.key: r for r in bench.rows})
    results = {
        "command": command.strip(),
        "quick": args.quick,
        "window_seconds": bench.window,
        "machine": info,
        "rows": [r.to_dict() for r in bench.rows],
        "targets": [t.to_dict() for t in targets],
        "reports": bench.reports,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(args.results, bench.rows, targets, info, command.strip(), bench.window)
    if args.memory_sessions:
        add_memory_rows(args, results, store)
    print(f"wrote {args.out / 'results.json'} and {args.results}", file=sys.stderr)
    return 0


def add_memory_rows(args: argparse.Namespace, results: dict[str, object], store: Path) -> None:
    """benchmarks.memory's resident phase (memory per session, create + first feed) as rows
    of this run: into results.json ("memory") and a table appended to the markdown."""
    from benchmarks import memory

    margs = memory.parse_args(
        ["--sessions", str(args.memory_sessions), "--spill-sessions", "0",
         "--prefix-sessions", "5000", "--out", str(args.out), "--store", str(store),
         "--model", args.model]
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="seqserve-memory-") as tmp:
        state = memory.hidden_state_bytes(store, args.model)
        res = {
            "concurrency": margs.concurrency,
            "resident": memory.resident_phase(margs, Path(tmp), state),
        }
    results["memory"] = res
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = "\n\n## Memory and churn per session (benchmarks.memory)\n\n" + memory.table(res)
    args.results.write_text(args.results.read_text() + table + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="seqserve-bench-") as tmp:
        scratch, store = Path(tmp), args.store
        if args.random_model:
            store = scratch / "store"
            publish_random_model(store, args.model)
        elif not (store / args.model).is_dir():
            hint = "train it, pass --store/--model, or use --random-model"
            print(f"error: no model {args.model!r} in {store}; {hint}", file=sys.stderr)
            return 2
        return asyncio.run(main_async(args, store, scratch))


if __name__ == "__main__":
    sys.exit(main())
