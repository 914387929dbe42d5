"""Do seeded generations draw the same tokens alone as batched?
`python -m benchmarks.batch_invariance [--sessions 64] [--tokens 3000] [--temperature 1]`.

Each session draws from its own seeded stream, so the draws themselves do not depend on the
batch. The arithmetic does: a batched step's matrix products sum in another order than a
one-row step's (a one-row product is a matrix-vector product; on this machine's CPU a row's
result is the same for any batch of four rows or more, and differs in the last bits for one to
three), so a session's state alone and batched differs by about 1e-6. That changes a drawn
token only where the draw falls within that distance of the boundary between two tokens;
after one does, the two continuations differ.

It also times why this is not fixed by padding every step to a batch where rows agree: one
layer's matrix product (a random float32 matrix the shape of a layer above the first, 4H x 2H,
gates x [input, h], of an LSTM of the model's hidden size H; 3H for a GRU) of 1, 2, 4 and 8 rows,
and which batch sizes of 1 to 8 and 64 give a row another result than a batch of 256 does.

This runs the server's own runner (`ModelRunner.execute` of generate rows, each row's head
output kept from its step before, as a running generation's) twice over the same sessions and
seeds: each session stepped alone, then all of them in one batch each step. It reports how
many sessions' tokens diverged, at which token, and the tokens compared up to each divergence.
Not a test: the count is a rate, and changes with the model, the CPU and the library build.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.inprocess import load_model
from service.models import SequenceModel
from service.runtime.runner import ModelRunner
from service.runtime.sampler import SamplingParams, SessionRng
from service.runtime.state_pool import ByteBudget, StatePool
from service.runtime.step_batch import Head, Row, StepBatch


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.batch_invariance", description=__doc__)
    p.add_argument("--sessions", type=int, default=64)
    p.add_argument("--tokens", type=int, default=3000, help="generated per session")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--store", type=Path, default=Path("model_store"))
    p.add_argument("--model", default="bytes-lstm")
    p.add_argument("--json", type=Path, default=None, help="write the result here too")
    return p.parse_args(argv)


def generate(
    model: SequenceModel, sessions: int, tokens: int, temperature: float, *, batched: bool
) -> list[list[int]]:
    """Each session's `tokens` drawn tokens, from the zero state, session i seeded 1000 + i."""
    pool = StatePool(model.config, ByteBudget(1 << 34), initial_slots=sessions, head=model.head)
    runner = ModelRunner(model, pool)
    slots = [pool.allocate() for _ in range(sessions)]
    rngs = [SessionRng.seeded(1000 + i) for i in range(sessions)]
    sampling = SamplingParams(temperature=temperature)
    heads: list[Head | None] = [None] * sessions
    drawn: list[list[int]] = [[] for _ in range(sessions)]
    groups = [list(range(sessions))] if batched else [[i] for i in range(sessions)]
    for _ in range(tokens):
        for group in groups:
            rows = [
                Row(slot=slots[i], inputs=None, sampling=sampling, rng=rngs[i], head=heads[i])
                for i in group
            ]
            for i, result in zip(group, runner.execute(StepBatch(rows)).results, strict=True):
                assert result.token is not None
                heads[i] = result.head
                drawn[i].append(result.token)
    return drawn


SIZES = (1, 2, 3, 4, 5, 6, 7, 8, 64)


def products(model: SequenceModel, calls: int = 2000) -> dict[str, object]:
    """One layer's product, the batch sizes whose rows differ from a batch of 256's, and the
    time of a product of 1, 2, 4 and 8 rows (µs, the mean over `calls`)."""
    hidden = model.config.hidden_size
    gates = model.config.gates * hidden
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(gates, 2 * hidden, generator=gen) * 0.05
    rows = torch.randn(256, 2 * hidden, generator=gen)
    reference = rows @ weight.T
    differ = [n for n in SIZES if not torch.equal((rows[:n] @ weight.T), reference[:n])]
    bias = torch.zeros(gates)
    timed: dict[int, float] = {}
    for n in (1, 2, 4, 8):
        batch = rows[:n]
        for _ in range(calls // 10):
            torch.addmm(bias, batch, weight.T)
        started = time.perf_counter()
        for _ in range(calls):
            torch.addmm(bias, batch, weight.T)
        timed[n] = (time.perf_counter() - started) / calls * 1e6
    return {"rows_differ_at": differ, "product_us": timed}


def measure(args: argparse.Namespace) -> dict[str, object]:
    torch.set_num_threads(1)
    model = load_model(args.store, args.model)
    layer = products(model)
    alone = generate(model, args.sessions, args.tokens, args.temperature, batched=False)
    batched = generate(model, args.sessions, args.tokens, args.temperature, batched=True)
    firsts = [
        next((t for t, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), None)
        for x, y in zip(alone, batched, strict=True)
    ]
    diverged = sorted(f for f in firsts if f is not None)
    compared = sum(args.tokens if f is None else f + 1 for f in firsts)
    return {
        "model": args.model,
        "sessions": args.sessions,
        "tokens": args.tokens,
        "temperature": args.temperature,
        "diverged": len(diverged),
        "first_divergences": diverged,
        "tokens_compared": compared,
        **layer,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = measure(args)
    print(
        f"{result['sessions']} sessions x {result['tokens']} tokens of {result['model']} at "
        f"temperature {result['temperature']}, alone against batched: "
        f"{result['diverged']} diverged (at tokens {result['first_divergences']}) in "
        f"{result['tokens_compared']:,} tokens compared up to each divergence"
    )
    product_us = result["product_us"]
    assert isinstance(product_us, dict)
    print(
        f"one layer's product: a row differs from a batch of 256's at batch sizes "
        f"{result['rows_differ_at']} (of {list(SIZES)}); "
        + ", ".join(f"{n} rows {us:.1f} µs" for n, us in product_us.items())
    )
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
