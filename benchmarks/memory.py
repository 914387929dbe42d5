"""Memory and churn per session: `python -m benchmarks.memory [--sessions N] [--spill-sessions M]`.

Two phases, each against a real `seqserve serve` process over gRPC on loopback, with the
default durability (journal, fsync every 200 ms) and auth off:

- `resident`: N sessions (default 100,000) are created and fed one token each (CreateSession
  then Step, as the Python client does: request ids, routing key, expected position) by
  `--concurrency` workers (default 64) spread over `--clients` load processes. The pool's byte
  budget fits them all. Reported: create + first feed per second; the server's RSS growth
  (VmRSS, after the idle checkpoints have been written) per session, and that divided by the
  session's hidden-state bytes (h and c for an LSTM: layers x hidden x 4 bytes each). Then a
  shorter run of CreateSession with the one-token prefix (create + first feed in one call).
- `spill`: M sessions (default 200,000) against a pool of `--spill-pool-slots` slots, so most of
  them live in the spill tier. Reported: create + first feed per second, RSS growth per
  session, and the spill directory's bytes per session (file sizes, and blocks allocated).

Writes `OUT/memory.json` and prints a table. The rates depend on how busy the machine is (note
the load average printed with them) and on what the disk charges for a new file in the state
directory (every session's idle checkpoint creates one; the mean checkpoint write is printed
with them, from `seqserve_state_write*`; `--scratch DIR` puts the state directories under
DIR); the memory figures do not.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.filesystem import state_filesystem
from benchmarks.processes import ServerProcess, mean_write_us, start_server, state_writes
from benchmarks.run import split_cpus
from benchmarks.session_load import make_sessions

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__)
    p.add_argument("--sessions", type=int, default=100_000, help="resident phase (0: skip)")
    p.add_argument("--prefix-sessions", type=int, default=20_000, help="create-with-prefix run")
    p.add_argument("--spill-sessions", type=int, default=200_000, help="spill phase (0: skip)")
    p.add_argument("--spill-pool-slots", type=int, default=4096, help="pool size, spill phase")
    p.add_argument("--concurrency", type=int, default=64, help="sessions in flight")
    p.add_argument("--clients", type=int, default=2, help="load processes")
    p.add_argument(
        "--pin", action="store_true", help="the server on the last CPU, the load processes on "
        "the others (as `benchmarks.run` and `benchmarks.churn`; default: neither pinned)",
    )  # fmt: skip
    p.add_argument("--quick", action="store_true", help="10,000 / 2,000 / 20,000 sessions")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out")
    p.add_argument("--store", type=Path, default=REPO / "model_store")
    p.add_argument("--model", default="bytes-lstm")
    p.add_argument(
        "--scratch", type=Path, help="the state directories go in a temporary directory here "
        "(default: the system's temporary directory)",
    )  # fmt: skip
    p.add_argument(
        "--server-root", type=Path, default=REPO, help="run the server from this checkout "
        "(e.g. `git archive` of an older commit, for a before/after comparison)",
    )  # fmt: skip
    args = p.parse_args(argv)
    args.server_cpus = None  # `main` pins with --pin
    if args.quick:
        args.sessions = min(args.sessions, 10_000)
        args.prefix_sessions = min(args.prefix_sessions, 2_000)
        args.spill_sessions = min(args.spill_sessions, 20_000)
    return args


def hidden_state_bytes(store: Path, model: str) -> int:
    """One session's h (and c for an LSTM) in float32, from the latest manifest."""
    versions = [int(d.name) for d in (store / model).iterdir() if d.name.isdigit()]
    manifest = json.loads((store / model / str(max(versions)) / "manifest.json").read_text())
    parts = 2 if manifest["cell"] == "lstm" else 1
    return parts * manifest["num_layers"] * manifest["hidden_size"] * 4


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def dir_usage(path: Path) -> tuple[int, int, int]:
    """(files, bytes in them, bytes allocated on disk) under `path`."""
    files = size = blocks = 0
    for root, _, names in os.walk(path):
        for name in names:
            try:
                st = os.stat(os.path.join(root, name))
            except FileNotFoundError:
                continue  # replaced or deleted while walking
            files, size, blocks = files + 1, size + st.st_size, blocks + st.st_blocks * 512
    return files, size, blocks


# ---- phases -------------------------------------------------------------------------------


def _serve(
    name: str, args: argparse.Namespace, scratch: Path, env: dict[str, str]
) -> ServerProcess:
    argv = ["-m", "service.cli.main", "serve", "--host", "127.0.0.1", "--port", "0",
            "--metrics-port", "0", "--store", str(args.store),
            "--spill-dir", str(scratch / name)]  # fmt: skip
    # Sessions made early in a long run must not expire before it ends (the default TTL is 10
    # minutes; a million sessions take most of an hour to make): that would read as less memory.
    env = {
        "SEQSERVE_SERVER__HTTP_PORT": "-1",
        "SEQSERVE_SESSIONS__TTL_SECONDS": "86400",
        **env,
    }
    return start_server(
        name, argv, args.out, args.server_cpus, env=env, timeout=300.0, cwd=args.server_root
    )


def _settle(server: ServerProcess, spill: Path, want_files: int, limit: float = 600.0) -> None:
    """Wait until the idle checkpoints are written (a file per session) and RSS is steady."""
    deadline, last = time.monotonic() + limit, -1
    while time.monotonic() < deadline:
        time.sleep(2.0)
        files = dir_usage(spill)[0]
        rss = rss_bytes(server.proc.pid)
        if files >= want_files and abs(rss - last) < 1 << 20:
            return
        last = rss


def resident_phase(args: argparse.Namespace, scratch: Path, state_bytes: int) -> dict[str, Any]:
    n, warm = args.sessions, 1024
    total = n + warm + args.prefix_sessions
    env = {  # every session fits the pool (growth included) and the cap
        "SEQSERVE_SESSIONS__MAX_SESSIONS": str(total + 1000),
        "SEQSERVE_SESSIONS__POOL_BYTES": str(int(total * state_bytes * 1.25) + (64 << 20)),
        "SEQSERVE_SESSIONS__SPILL_MAX_BYTES": str(64 << 30),
    }
    server = _serve("resident", args, scratch, env)
    try:
        target, pid = server.target, server.proc.pid
        make_sessions(target, args.model, warm, args.concurrency, args.clients)
        _settle(server, scratch / "resident", warm)
        writes0 = state_writes(
            server.metrics_port
        )  # (scraped first: the endpoint's own memory is not counted)
        rss0, cpu0 = rss_bytes(pid), server.cpu_seconds()
        churn: dict[str, Any] = make_sessions(target, args.model, n, args.concurrency, args.clients)
        rss_loaded, cpu_loaded = rss_bytes(pid), server.cpu_seconds()
        _settle(server, scratch / "resident", warm + n)
        rss1, cpu1 = rss_bytes(pid), server.cpu_seconds()
        churn["state_write_us"] = mean_write_us(writes0, state_writes(server.metrics_port))
        per = (rss1 - rss0) / n
        # Server CPU per session: during the load, and with the idle checkpoints written after
        churn["server_cpu_ms_per_session_during_load"] = (cpu_loaded - cpu0) / n * 1e3
        churn["server_cpu_ms_per_session_with_checkpoints"] = (cpu1 - cpu0) / n * 1e3
        result: dict[str, Any] = {
            "sessions": n,
            "state_bytes_per_session": state_bytes,
            "rss_before": rss0,
            "rss_after_load": rss_loaded,
            "rss_settled": rss1,
            "rss_growth_per_session": per,
            "ratio_to_state": per / state_bytes,
            "create_then_step": churn,
        }
        if args.prefix_sessions:
            result["create_with_prefix"] = make_sessions(
                target, args.model, args.prefix_sessions, args.concurrency, args.clients, True
            )
        return result
    finally:
        server.stop(timeout=600.0)


def spill_phase(args: argparse.Namespace, scratch: Path, state_bytes: int) -> dict[str, Any]:
    m, spill = args.spill_sessions, scratch / "spill"
    env = {
        "SEQSERVE_SESSIONS__MAX_SESSIONS": str(m + 2000),
        "SEQSERVE_SESSIONS__POOL_BYTES": str(args.spill_pool_slots * state_bytes),
        "SEQSERVE_SESSIONS__POOL_INITIAL_SLOTS": str(args.spill_pool_slots),
        "SEQSERVE_SESSIONS__SPILL_MAX_BYTES": str(256 << 30),
    }
    server = _serve("spill", args, scratch, env)
    try:
        pid = server.proc.pid
        make_sessions(server.target, args.model, 256, args.concurrency, args.clients)
        _settle(server, spill, 256)
        writes0 = state_writes(server.metrics_port)
        rss0, disk0 = rss_bytes(pid), dir_usage(spill)
        churn: dict[str, Any] = make_sessions(
            server.target, args.model, m, args.concurrency, args.clients
        )
        _settle(server, spill, 256 + m)
        rss1, disk1 = rss_bytes(pid), dir_usage(spill)
        churn["state_write_us"] = mean_write_us(writes0, state_writes(server.metrics_port))
        return {
            "sessions": m,
            "pool_slots": args.spill_pool_slots,
            "create_then_step": churn,
            "rss_growth_per_session": (rss1 - rss0) / m,
            "spill_files": disk1[0],
            "disk_bytes_per_session": (disk1[1] - disk0[1]) / m,
            "disk_allocated_per_session": (disk1[2] - disk0[2]) / m,
            "state_bytes_per_session": state_bytes,
        }
    finally:
        server.stop(timeout=900.0)


def table(result: dict[str, Any]) -> str:
    lines = ["| row | sessions | figure | target | met |", "|---|---|---|---|---|"]
    res, sp = result.get("resident"), result.get("spill")
    if res:
        ratio, per = res["ratio_to_state"], res["rss_growth_per_session"]
        lines.append(
            f"| RSS growth per session ÷ hidden state ({res['state_bytes_per_session']:,} B) "
            f"| {res['sessions']:,} | {per:,.0f} B = {ratio:.2f}× | ≤ 1.5× | "
            f"{'yes' if ratio <= 1.5 else 'no'} |"
        )
        for key, label in (("create_then_step", "CreateSession + Step"),
                           ("create_with_prefix", "CreateSession with a prefix")):  # fmt: skip
            if key in res:
                c = res[key]
                cpu = c.get("server_cpu_ms_per_session_with_checkpoints")
                cpu_note = "" if cpu is None else f"; server CPU {cpu:.2f} ms per session"
                cpu_note += _write_note(c)
                lines.append(
                    f"| {label}, {result['concurrency']} concurrent (load avg "
                    f"{c['load_average_1m_before']:.1f}) | {c['sessions']:,} | "
                    f"{c['sessions_per_second']:,.0f} sessions/s, {c['errors']} errors{cpu_note} "
                    f"| ≥ 2,000/s | {'yes' if c['sessions_per_second'] >= 2000 else 'no'} |"
                )
    if sp:
        c = sp["create_then_step"]
        lines.append(
            f"| spill tier: pool of {sp['pool_slots']:,} slots, {sp['spill_files']:,} records "
            f"| {sp['sessions']:,} | RSS {sp['rss_growth_per_session']:,.0f} B, disk "
            f"{sp['disk_bytes_per_session']:,.0f} B ({sp['disk_allocated_per_session']:,.0f} B "
            f"allocated) per session; {c['sessions_per_second']:,.0f} sessions/s"
            f"{_write_note(c)} | 1,000,000 "
            f"held | {'yes' if sp['sessions'] >= 1_000_000 else 'not at this count'} |"
        )
    if result.get("state_filesystem"):
        lines += ["", f"State directories: {result['state_filesystem']}."]
    return "\n".join(lines)


def _write_note(churn: dict[str, Any]) -> str:
    """What the disk charged for each state write of the run (checkpoints, evictions)."""
    us = churn.get("state_write_us")
    return "" if us is None else f"; state writes {us:,.0f} µs each"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.server_cpus, load_cpus = split_cpus(not args.pin)
    if load_cpus:
        os.sched_setaffinity(0, load_cpus)  # the load processes inherit it
    args.out.mkdir(parents=True, exist_ok=True)
    state_bytes = hidden_state_bytes(args.store, args.model)
    shown = sys.argv[1:] if argv is None else argv
    result: dict[str, Any] = {
        "command": "python -m benchmarks.memory " + " ".join(shown),
        "model": args.model,
        "concurrency": args.concurrency,
        "clients": args.clients,
        "cpus": os.cpu_count(),
        "server_cpus": args.server_cpus,
    }
    with tempfile.TemporaryDirectory(prefix="seqserve-memory-", dir=args.scratch) as tmp:
        result["state_filesystem"] = state_filesystem(Path(tmp))
        if args.sessions:
            result["resident"] = resident_phase(args, Path(tmp), state_bytes)
            print(table(result), file=sys.stderr, flush=True)
        if args.spill_sessions:
            result["spill"] = spill_phase(args, Path(tmp), state_bytes)
    result["load_average_after"] = os.getloadavg()
    (args.out / "memory.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"wrote {args.out / 'memory.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
