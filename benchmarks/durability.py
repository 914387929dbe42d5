"""What durability costs, side by side in one run: `python -m benchmarks.durability [--quick]`.

Three servers on the same model, each its own process pinned to the same CPU, measured in
alternation (two rounds, so drift shows as a spread, not as a difference):
- `shutdown`: sessions written only at SIGTERM and eviction (the first version's behaviour);
- `journal`: every step in the journal before its reply (the default; fsync every 200 ms);
- `journal+fsync`: the same, fsynced after every batched step (survives power loss).
Loads: one session, one token per message (p50 latency), and 64 sessions (tokens/s).

Then recovery: a state directory with 10,000 sessions of 100 journaled steps each, written
straight into a journal segment, and the time `seqserve serve` takes to come up on it (to
SERVING, every session at its position), less its start-up time on an empty directory; then
the latency of the first Step on one of those sessions (its replay is done on demand), and
when the background replay of all of them ends (from the server's log). Writes
`OUT/durability.json` and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.processes import ServerProcess, start_server
from benchmarks.run import split_cpus
from service.client.client import SeqServeClient, make_input
from service.loadtest import LoadConfig, run_load
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.registry.store import ModelStore
from service.sessions import journal_record as jr

REPO = Path(__file__).resolve().parent.parent
MODES = {
    "shutdown": {"SEQSERVE_SESSIONS__DURABILITY": "shutdown"},
    "journal": {"SEQSERVE_SESSIONS__DURABILITY": "journal"},
    "journal+fsync": {
        "SEQSERVE_SESSIONS__DURABILITY": "journal",
        "SEQSERVE_SESSIONS__FSYNC": "batch",
    },
}


def _serve(
    name: str, store: Path, state: Path, out: Path, cpus, env: dict[str, str]
) -> ServerProcess:  # type: ignore[no-untyped-def]
    argv = ["-m", "service.cli.main", "serve", "--host", "127.0.0.1", "--port", "0",
            "--metrics-port", "-1", "--http-port", "-1", "--store", str(store),
            "--spill-dir", str(state)]  # fmt: skip
    return start_server(name, argv, out, cpus, env=env, timeout=600.0, cwd=REPO)


async def load_row(target: str, model: str, sessions: int, window: float) -> dict[str, float]:
    """tokens/s and p50 ms of `sessions` sessions, one token per message, for `window` s."""
    report = await run_load(
        LoadConfig(
            target=target,
            model=model,
            duration_seconds=window,
            warmup_seconds=1.0,
            seed=1,
            sessions=sessions,
        )
    )
    p50 = report.step_latency.p50 * 1e3 if report.step_latency is not None else float("nan")
    return {"tokens_per_second": report.tokens_per_second, "p50_ms": p50}


def write_journal(state: Path, store: Path, model: str, sessions: int, steps: int) -> None:
    """`sessions` sessions of `steps` one-token steps each, interleaved as live traffic is."""
    entry = ModelStore(store).model(model)
    version = entry.latest
    assert version is not None
    manifest = entry.usable(version).manifest
    assert manifest is not None
    ids = [f"s_bench{i:017d}" for i in range(sessions)]
    now = time.time()
    sampling = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "stop_strings": [],
                "stop_token_ids": [], "max_tokens": 16}  # fmt: skip
    journal = state / "journal"
    journal.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with (journal / f"{1:012d}.log").open("wb") as f:
        f.write(b"".join(
            jr.create(sid, {"model": model, "version": version,
                            "fingerprint": manifest.fingerprint(), "seed": i,
                            "ttl_seconds": 86400.0, "created_at": now,
                            "parent_session_id": "", "default_sampling": sampling})
            for i, sid in enumerate(ids)
        ))  # fmt: skip
        for step in range(steps):
            tokens = rng.integers(0, 256, size=sessions)
            f.write(b"".join(jr.tokens(sid, step, tokens[i : i + 1]) for i, sid in enumerate(ids)))


async def main_async(args: argparse.Namespace, work: Path) -> int:
    all_cpus = os.sched_getaffinity(0)
    server_cpus, client_cpus = split_cpus(no_pin=False)
    if client_cpus:
        os.sched_setaffinity(0, client_cpus)
    window = 2.0 if args.quick else 5.0
    rows: dict[str, list[dict[str, float]]] = {}
    servers = {m: _serve(m.replace("+", "-"), args.store, work / m, work, server_cpus, env)
               for m, env in MODES.items() if not args.recovery_only}  # fmt: skip
    try:
        for _round in range(0 if args.recovery_only else 2):
            for sessions in (1, 64):
                for mode, server in servers.items():
                    got = await load_row(server.target, args.model, sessions, window)
                    rows.setdefault(f"{mode}/stream/{sessions}", []).append(got)
                    line = (
                        f"{mode:14s} {sessions:3d} sessions: {got['tokens_per_second']:8,.0f} "
                        f"tokens/s  p50 {got['p50_ms']:.3f} ms"
                    )
                    print(line, file=sys.stderr, flush=True)
    finally:
        for server in servers.values():
            server.stop()

    os.sched_setaffinity(0, all_cpus)  # the recovering servers inherit every core
    n, steps = (1000, 100) if args.quick else (10_000, 100)
    empty, full = work / "empty-state", work / "full-state"
    written = time.perf_counter()
    write_journal(full, args.store, args.model, n, steps)
    print(f"wrote {n} sessions x {steps} steps in {time.perf_counter() - written:.1f} s",
          file=sys.stderr)  # fmt: skip
    timings = {}
    for name, state in (("empty", empty), ("recover", full)):
        started = time.perf_counter()
        # Not pinned: a restarting server has the machine's cores.
        server = _serve(f"start-{name}", args.store, state, work, None, {})
        timings[name] = time.perf_counter() - started
        if name == "recover":
            timings["first_step_ms"] = await _first_step(server, f"s_bench{n // 2:017d}", steps)
            timings["background_s"] = _background_replay_seconds(server)
        server.stop(timeout=600.0)
    recovery = {"sessions": n, "steps_each": steps, "start_empty_s": timings["empty"],
                "start_with_journal_s": timings["recover"],
                "recovery_s": timings["recover"] - timings["empty"],
                "first_step_ms": timings["first_step_ms"],
                "background_replay_s": timings["background_s"]}  # fmt: skip
    print(json.dumps(recovery), file=sys.stderr)
    results = {"window_seconds": window, "rows": rows, "recovery": recovery}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "durability.json").write_text(json.dumps(results, indent=2) + "\n")
    print(_table(rows, recovery))
    return 0


async def _first_step(server: ServerProcess, session_id: str, position: int) -> float:
    """Milliseconds of the first Step on a recovered session (it waits for its replay)."""
    async with SeqServeClient(server.target) as client:
        request = pb.StepRequest(
            session_id=session_id,
            input=make_input(tokens=[65]),
            expected_position=position,
        )
        started = time.perf_counter()
        reply = await client.sessions.Step(request)
        elapsed = (time.perf_counter() - started) * 1e3
    assert reply.position == position + 1, reply.position
    return elapsed


def _background_replay_seconds(server: ServerProcess, timeout: float = 600.0) -> float:
    """The server's own figure for its background replay, from its log line."""
    pattern = re.compile(r"replayed \d+ sessions \(\d+ steps\) from the journal in ([\d.]+) s")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = pattern.search(server.log_path.read_text(errors="replace"))
        if found:
            return float(found.group(1))
        time.sleep(0.5)
    raise TimeoutError(f"no background replay line in {server.log_path}")


def rounds_table(rows: dict[str, list[dict[str, float]]], first: str) -> list[str]:
    """Markdown rows "<first>/<sessions>" → tokens/s and p50 of each round."""
    lines = [f"| {first} | sessions | tokens/s (round 1 / 2) | p50 ms (round 1 / 2) |",
             "|---|---:|---:|---:|"]  # fmt: skip
    for key, runs in rows.items():
        name, _, sessions = key.rpartition("/")
        tps = " / ".join(f"{r['tokens_per_second']:,.0f}" for r in runs)
        p50 = " / ".join(f"{r['p50_ms']:.3f}" for r in runs)
        lines.append(f"| {name} | {sessions} | {tps} | {p50} |")
    return lines


def _table(rows: dict[str, list[dict[str, float]]], recovery: dict[str, float]) -> str:
    lines = rounds_table(rows, "mode")
    lines.append("")
    lines.append(
        f"Recovery of {recovery['sessions']:,} sessions x {recovery['steps_each']} journaled "
        f"steps: {recovery['recovery_s']:.1f} s (start-up {recovery['start_with_journal_s']:.1f} s "
        f"against {recovery['start_empty_s']:.1f} s on an empty directory); the first Step "
        f"on one of them {recovery['first_step_ms']:.1f} ms; all replayed in the background "
        f"{recovery['background_replay_s']:.1f} s after SERVING."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.durability", description=__doc__)
    p.add_argument("--quick", action="store_true", help="short windows, 1,000 sessions")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out")
    p.add_argument("--store", type=Path, default=REPO / "model_store")
    p.add_argument("--model", default="bytes-lstm")
    p.add_argument("--recovery-only", action="store_true", help="skip the load rows")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="seqserve-durability-") as tmp:
        return asyncio.run(main_async(args, Path(tmp)))


if __name__ == "__main__":
    sys.exit(main())
