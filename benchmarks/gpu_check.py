"""GPU check (optional; CI has no GPU): the engine on `cuda` gives the CPU's answers, and how
the raw batched step compares.

    python -m benchmarks.gpu_check [--out DIR] [--device cuda]

Builds a small random LSTM store and a small article-GRU store, runs the same sessions through a
CPU engine and a CUDA engine (steps, multi-token chunks, greedy generation), compares every
prediction, then times the runner's batched step on both devices. Exits non-zero on mismatch.
`--device cpu` runs the same comparison CPU against CPU (no GPU needed): the test suite does, so
this script keeps working with the engine's API until a session with the GPU machine runs it
(`benchmarks/gpu_check.sh`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from service.engine.model_input import ModelInput
from service.models import ModelConfig, SequenceModel
from service.registry.manifest import Training
from service.registry.store import ModelStore
from service.runtime.sampler import SamplingParams
from service.settings import EngineSettings, SessionSettings, Settings
from service.wiring import build_engine

CONFIGS = {
    "lstm": ModelConfig(
        cell="lstm", num_layers=2, hidden_size=256, input_kind="tokens", input_dim=256,
        embed_dim=64, head_kind="classification", output_dim=256,
    ),
    "gru-article": ModelConfig(
        cell="gru", num_layers=2, hidden_size=64, input_kind="features", input_dim=4,
        embed_dim=16, head_kind="regression", output_dim=1, reset_after=False,
    ),
}  # fmt: skip


async def run_sessions(
    root: Path, device: str, name: str, sessions_n: int = 48
) -> list[list[float]]:
    with tempfile.TemporaryDirectory() as state:
        settings = Settings(
            model_store=root,
            registry_poll_seconds=0,
            engine=EngineSettings(device=device),
            sessions=SessionSettings(spill_dir=Path(state) / "state"),
        )
        return await _drive_all(build_engine(settings), name, sessions_n)


async def _drive_all(engine, name: str, sessions_n: int) -> list[list[float]]:  # type: ignore[no-untyped-def]
    await engine.start()
    gen = torch.Generator().manual_seed(0)
    outputs: list[list[float]] = []
    try:
        sessions = [(await engine.create_session(name, seed=i))[0] for i in range(sessions_n)]

        async def drive(idx: int) -> list[float]:
            sid = sessions[idx].session_id
            got: list[float] = []
            for step in range(6):
                n = 1 if (idx + step) % 3 else 1 + (idx % 7)  # mix single steps and chunks
                if CONFIGS[name].input_kind == "tokens":
                    ids = torch.randint(0, 256, (n,), generator=gen).tolist()
                    out = await engine.feed(sid, ModelInput(tokens=ids))
                    pred = out.prediction
                    got += list(pred.top_probs) + [float(i) for i in pred.top_ids]
                else:
                    frames = torch.randn(n * 4, generator=gen).tolist()
                    out = await engine.feed(sid, ModelInput(frames=frames))
                    got += list(out.prediction.values)
            if CONFIGS[name].input_kind == "tokens":
                greedy = SamplingParams(temperature=0.0, max_tokens=8)
                got += [float(t.token_id) async for t in engine.generate(sid, None, greedy)]
            return got

        outputs = list(await asyncio.gather(*(drive(i) for i in range(len(sessions)))))
    finally:
        await engine.stop()
    return outputs


def time_step(config: ModelConfig, device: str, batch: int, iters: int = 200) -> float:
    torch.manual_seed(0)
    model = SequenceModel(config).to(device).eval()
    state = model.zero_state(batch, device)
    if config.input_kind == "tokens":
        inputs = torch.randint(0, config.input_dim, (batch,), device=device)
    else:
        inputs = torch.randn(batch, config.input_dim, device=device)
    for _ in range(20):
        _, state = model.step(inputs, state)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(iters):
        _, state = model.step(inputs, state)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / iters


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--device", default="cuda", help="compared with cpu (default: cuda)")
    parser.add_argument("--sessions", type=int, default=48)
    parser.add_argument("--iters", type=int, default=200, help="timed steps per batch size")
    args = parser.parse_args(argv)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    report: dict[str, object] = {
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else device,
        "torch": torch.__version__,
    }
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = ModelStore(root)
        for name, config in CONFIGS.items():
            torch.manual_seed(1)
            store.publish(name, config, SequenceModel(config).state_dict(), description=name,
                          training=Training(data="random init", steps=0))  # fmt: skip
        for name in CONFIGS:
            cpu = asyncio.run(run_sessions(root, "cpu", name, args.sessions))
            gpu = asyncio.run(run_sessions(root, device, name, args.sessions))
            worst = max(
                (abs(a - b) for xs, ys in zip(cpu, gpu, strict=True)
                 for a, b in zip(xs, ys, strict=True)),
                default=0.0,
            )  # fmt: skip
            same_len = all(len(a) == len(b) for a, b in zip(cpu, gpu, strict=True))
            report[f"{name}_max_abs_diff"] = worst
            report[f"{name}_values_compared"] = sum(len(xs) for xs in cpu)
            passed = same_len and worst < 1e-3 and all(cpu)
            ok &= passed
            verdict = "ok" if passed else "MISMATCH"
            print(f"{name}: cpu vs {device} max |diff| = {worst:.2e} ({verdict})")
    timings = {}
    for batch in (1, 64, 256):
        cpu_s = time_step(CONFIGS["lstm"], "cpu", batch, args.iters)
        dev_s = time_step(CONFIGS["lstm"], device, batch, args.iters)
        timings[batch] = {"cpu_ms": cpu_s * 1e3, f"{device}_ms": dev_s * 1e3}
        print(
            f"lstm step batch {batch:4d}: cpu {cpu_s * 1e3:.3f} ms, {device} {dev_s * 1e3:.3f} ms"
        )
    report["step_timings"] = timings
    report["ok"] = ok
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
