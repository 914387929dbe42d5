"""The idle checkpoint's cost in-process: `python -m benchmarks.checkpoints [--sessions N]`.

An engine on the bundled store (default durability, a temporary state directory) holds N
`bytes-lstm` sessions, each fed one token. Passes of `--per-pass` sessions are checkpointed
alternately one after another (`CheckpointWriter.checkpoint`, as the sweep did before) and
the way the sweep does now (`IdleCheckpoints.write_batch`, eight at a time, stage by stage),
each session once, into new files; then every session is fed once more and written the way
a shutdown writes them (`shutdown_write.spill_all`). Reported: microseconds per checkpoint,
every pass and the medians. Run it pinned (`taskset -c 1`) on a quiet machine; the files go
under `$TMPDIR` (`TMPDIR=/dev/shm` takes the disk's price for a new file out).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from service.engine.idle_checkpoints import CHECKPOINT_BATCH, IdleCheckpoints
from service.engine.model_input import ModelInput
from service.engine.shutdown_write import spill_all
from service.settings import SessionSettings, Settings
from service.wiring import build_engine

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.checkpoints", description=__doc__)
    p.add_argument("--sessions", type=int, default=6000)
    p.add_argument("--per-pass", type=int, default=1000)
    p.add_argument("--store", type=Path, default=REPO / "model_store")
    p.add_argument("--model", default="bytes-lstm")
    return p.parse_args(argv)


async def measure(args: argparse.Namespace) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory(prefix="seqserve-checkpoints-") as tmp:
        settings = Settings(
            model_store=args.store,
            registry_poll_seconds=0,
            sessions=SessionSettings(
                spill_dir=Path(tmp) / "state",
                sweep_interval_seconds=3600,  # no sweep of its own meanwhile
                max_sessions=args.sessions + 100,
            ),
        )
        engine = build_engine(settings)
        await engine.start()
        try:
            sessions = []
            for i in range(args.sessions):
                session, _ = await engine.create_session(args.model, seed=i)
                await engine.feed(session.session_id, ModelInput(tokens=[65]))
                sessions.append(session)
            writer = engine.residency.writer
            sweep = IdleCheckpoints(writer)
            per_pass: dict[str, list[float]] = {"one by one": [], "batched": []}
            for k in range(args.sessions // args.per_pass):
                part = sessions[k * args.per_pass : (k + 1) * args.per_pass]
                started = time.perf_counter()
                if k % 2 == 0:
                    for session in part:
                        writer.checkpoint(session)
                    key = "one by one"
                else:
                    for i in range(0, len(part), CHECKPOINT_BATCH):
                        sweep.write_batch(part[i : i + CHECKPOINT_BATCH])
                    key = "batched"
                per_pass[key].append(1e6 * (time.perf_counter() - started) / len(part))
                if not all(engine.sessions.record_is_current(s) for s in part):
                    raise RuntimeError(f"{key}: a session's checkpoint was not written")
            # A shutdown's writes: every session used since its checkpoint, written at once.
            for session in sessions:
                await engine.feed(session.session_id, ModelInput(tokens=[66]))
            started = time.perf_counter()
            # On the loop, in one synchronous call: nothing else runs on the slots meanwhile
            # (a real shutdown stops the schedulers first and writes on a thread).
            written, lost = spill_all(engine.residency)
            if (written, lost) != (len(sessions), 0):
                raise RuntimeError(f"shutdown: {written} written, {lost} lost")
            per_pass["shutdown (spill_all)"] = [1e6 * (time.perf_counter() - started) / written]
            return per_pass
        finally:
            await engine.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    per_pass = asyncio.run(measure(args))
    for key, values in per_pass.items():
        shown = ", ".join(f"{v:.0f}" for v in values)
        print(f"{key}: median {statistics.median(values):.0f} µs per checkpoint ({shown})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
