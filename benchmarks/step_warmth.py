"""The batched step's CPU as a server runs it, not back to back:
`taskset -c 1 python -m benchmarks.step_warmth [--rows 1 64] [--gap-us 300] [--walk-mb 4 32]`.

`compute/step` in `benchmarks.run` times the runner's step back to back, so the weights and
the state stay in the core's caches from one step to the next. A server steps between other
work: for one session it waits for the next message (the CPU idles), at 64 sessions it handles
some fifty messages between steps. This runs the same step (`inprocess.step_function`) four
ways, in interleaved rounds, and reports the CPU time of the step itself (`time.thread_time`
around it, nothing else; the median over the rounds of each round's mean) per step and per
row, and how long what ran between two steps took (wall time; a sleep overshoots what it asks):

- back to back: nothing between steps (what `compute/step` measures);
- after an idle gap: the thread sleeps `--gap-us` between steps, as a server waits for a
  client's next message;
- after a busy gap: the thread spins on the clock for `--gap-us` (the CPU stays busy; little
  memory is touched);
- after a memory walk: `--walk-mb` of memory is read and written between steps, what other work
  does to the caches (32 MB is this machine's whole L3: the weights come from memory).

`benchmarks.run`'s "Where the service's CPU goes" table compares the step as served with the
back-to-back one ("as served ÷ in-process"); this says how much of that a step pays for being
run between other work at all. Not a test: compare the rows of one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks.inprocess import load_model, step_function

REPO = Path(__file__).resolve().parent.parent
BACK_TO_BACK, IDLE, BUSY = "back to back", "after an idle gap", "after a busy gap"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.step_warmth", description=__doc__)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 64], help="rows per step")
    p.add_argument("--gap-us", type=float, default=300.0, help="idle or busy time between steps")
    p.add_argument(
        "--walk-mb", type=int, nargs="*", default=[4, 32], help="memory walked between steps"
    )
    p.add_argument("--steps", type=int, default=300, help="steps per way per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--store", type=Path, default=REPO / "model_store")
    p.add_argument("--model", default="bytes-lstm")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args(argv)


def _ways(gap: float, walk_mb: list[int]) -> dict[str, Callable[[], None]]:
    """Each way's name, and what runs between two steps."""

    def spin() -> None:
        until = time.perf_counter() + gap
        while time.perf_counter() < until:
            pass

    def walker(mb: int) -> Callable[[], None]:
        memory = np.zeros(mb * (1 << 20) // 4, dtype=np.float32)

        def walk() -> None:
            np.add(memory, 1.0, out=memory)  # every byte read and written once

        return walk

    ways: dict[str, Callable[[], None]] = {
        BACK_TO_BACK: lambda: None,
        IDLE: lambda: time.sleep(gap),
        BUSY: spin,
    }
    for mb in walk_mb:
        ways[f"after a walk of {mb} MB"] = walker(mb)
    return ways


def _step_cpu(
    step: Callable[[], None], between: Callable[[], None], steps: int
) -> tuple[float, float]:
    """Mean CPU seconds of one step, `between` run before each; and the mean wall seconds
    `between` took."""
    total = gaps = 0.0
    for _ in range(steps):
        gap_started = time.perf_counter()
        between()
        gaps += time.perf_counter() - gap_started
        started = time.thread_time()
        step()
        total += time.thread_time() - started
    return total / steps, gaps / steps


def measure(args: argparse.Namespace) -> list[dict[str, float | int | str]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the server runs its steps
    try:
        return _measure(args)
    finally:
        torch.set_num_threads(threads)


def _measure(args: argparse.Namespace) -> list[dict[str, float | int | str]]:
    model = load_model(args.store, args.model)
    ways = _ways(args.gap_us / 1e6, args.walk_mb)
    results: list[dict[str, float | int | str]] = []
    for rows in args.rows:
        step = step_function(model, rows)
        for _ in range(20):
            step()  # warm up: fused weights built, buffers allocated
        per_mode: dict[str, list[float]] = {mode: [] for mode in ways}
        gaps: dict[str, list[float]] = {mode: [] for mode in ways}
        for round_ in range(args.rounds):
            order = list(ways) if round_ % 2 == 0 else list(reversed(ways))
            for mode in order:
                cpu, gap = _step_cpu(step, ways[mode], args.steps)
                per_mode[mode].append(cpu)
                gaps[mode].append(gap)
        base = statistics.median(per_mode[BACK_TO_BACK])
        for mode in ways:
            seconds = statistics.median(per_mode[mode])
            results.append(
                {
                    "rows": rows,
                    "way": mode,
                    "gap_us": statistics.median(gaps[mode]) * 1e6,
                    "step_us": seconds * 1e6,
                    "per_row_us": seconds * 1e6 / rows,
                    "vs_back_to_back": seconds / base,
                    "rounds_us": ", ".join(f"{s * 1e6:.0f}" for s in per_mode[mode]),
                }
            )
    return results


def render(results: list[dict[str, float | int | str]], args: argparse.Namespace) -> str:
    lines = [
        f"step CPU (median of {args.rounds} rounds of {args.steps} steps; gap "
        f"{args.gap_us:.0f} µs)",
        "",
        "| rows | way | µs between | µs a step | µs a row | ÷ back to back | rounds (µs a step) |",
        "|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['rows']} | {r['way']} | {r['gap_us']:.0f} | {r['step_us']:.1f} | "
            f"{r['per_row_us']:.1f} | {r['vs_back_to_back']:.2f} | {r['rounds_us']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = measure(args)
    print(render(results, args))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
