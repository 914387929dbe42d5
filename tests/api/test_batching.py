"""Continuous batching must not change answers: 64 clients at once give exactly what each gets
alone, and one batched step mixing chunk sizes (and generating rows) matches the reference."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from service.api.server import SeqServeServer
from service.client.client import SeqServeClient, make_sampling
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.runtime.runner import ModelRunner
from service.runtime.step_batch import StepBatch

from .support import (
    ReferenceSession,
    assert_matches_reference,
    item,
    read_replies,
    tokens,
    top_ids,
    top_probs,
)

CLIENTS = 64


@dataclass
class Transcript:
    """Everything one client saw."""

    positions: list[int] = field(default_factory=list)
    top_ids: list[list[int]] = field(default_factory=list)
    top_probs: list[list[float]] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)


def _script(n: int) -> list[list[int]]:
    """Client n's input chunks: different per client, of mixed sizes."""
    rng = np.random.default_rng(1000 + n)
    sizes = [1 + int(s) for s in rng.integers(0, 12, size=5)]
    sizes[n % 5] = 1  # at least one single-token chunk (the fused-step path)
    return [[int(t) for t in rng.integers(0, 256, size)] for size in sizes]


async def _run_client(target: str, n: int) -> Transcript:
    """One client with its own channel."""
    async with SeqServeClient(target) as client:
        return await _run_session(client, n)


async def _run_session(client: SeqServeClient, n: int) -> Transcript:
    """Create a session, stream the chunks (one message each, waiting for the reply), generate
    eight sampled tokens on the stream, then feed one more chunk."""
    out = Transcript()
    created = await client.sessions.CreateSession(pb.CreateSessionRequest(model="tok", seed=n))
    sid = created.session.session_id
    call = client.sessions.Stream()
    chunks = _script(n)
    for i, chunk in enumerate(chunks[:4]):
        await call.write(pb.StreamRequest(items=[item(sid, f"{n}-{i}", tokens(*chunk), top_k=5)]))
        (reply,) = (await read_replies(call, [f"{n}-{i}"]))[f"{n}-{i}"]
        assert reply.error.code == 0, reply.error
        out.positions.append(reply.position)
        out.top_ids.append(top_ids(reply.prediction))
        out.top_probs.append(top_probs(reply.prediction))
    gen = make_sampling(temperature=1.0, max_tokens=8)
    await call.write(pb.StreamRequest(items=[item(sid, f"{n}-gen", generate=gen)]))
    replies = (await read_replies(call, [], generate=[f"{n}-gen"]))[f"{n}-gen"]
    out.generated = [r.token.id for r in replies]
    out.positions.append(replies[-1].position)
    await call.write(pb.StreamRequest(items=[item(sid, f"{n}-last", tokens(*chunks[4]), top_k=5)]))
    (reply,) = (await read_replies(call, [f"{n}-last"]))[f"{n}-last"]
    out.positions.append(reply.position)
    out.top_ids.append(top_ids(reply.prediction))
    out.top_probs.append(top_probs(reply.prediction))
    await call.done_writing()
    await client.sessions.CloseSession(pb.CloseSessionRequest(session_id=sid))
    return out


@pytest.fixture
def batch_sizes(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """Spy on the runner: for each step, every row's input length (0 = a generating row)."""
    seen: list[list[int]] = []
    execute = ModelRunner.execute

    def spy(self: ModelRunner, batch: StepBatch):  # type: ignore[no-untyped-def]
        seen.append([0 if r.inputs is None else len(r.inputs) for r in batch.rows])
        return execute(self, batch)

    monkeypatch.setattr(ModelRunner, "execute", spy)
    return seen


async def test_64_concurrent_clients_get_what_each_gets_alone(
    server: SeqServeServer, batch_sizes: list[list[int]]
) -> None:
    target = f"127.0.0.1:{server.port}"
    together = await asyncio.gather(*(_run_client(target, n) for n in range(CLIENTS)))
    assert max(len(rows) for rows in batch_sizes) > 1, "the concurrent run never batched"
    batch_sizes.clear()
    async with SeqServeClient(target) as client:
        alone = [await _run_session(client, n) for n in range(CLIENTS)]
    assert max(len(rows) for rows in batch_sizes) == 1  # the baseline really ran alone

    for n, (a, b) in enumerate(zip(together, alone, strict=True)):
        sizes = [len(c) for c in _script(n)]
        assert a.positions == b.positions
        assert a.positions[:4] == list(np.cumsum(sizes[:4]))
        assert a.positions[-1] == sum(sizes) + 8
        assert a.generated == b.generated, f"client {n}"
        assert a.top_ids == b.top_ids, f"client {n}"
        np.testing.assert_allclose(a.top_probs, b.top_probs, rtol=0, atol=1e-6)
    # Different inputs and seeds really gave different answers.
    assert len({tuple(t.generated) for t in together}) > CLIENTS // 2


async def test_one_step_mixes_chunk_sizes_and_generating_rows(
    client: SeqServeClient, store_root: Path, batch_sizes: list[list[int]]
) -> None:
    sizes = [1, 3, 1, 7, 2, 1, 16, 5]
    rng = np.random.default_rng(9)
    chunks = [[int(t) for t in rng.integers(0, 256, n)] for n in sizes]
    sids = []
    for _ in sizes:
        created = await client.sessions.CreateSession(pb.CreateSessionRequest(model="tok"))
        sids.append(created.session.session_id)
    gen_sid = (
        await client.sessions.CreateSession(pb.CreateSessionRequest(model="tok", seed=4))
    ).session.session_id
    alone_sid = (
        await client.sessions.CreateSession(pb.CreateSessionRequest(model="tok", seed=4))
    ).session.session_id
    batch_sizes.clear()

    call = client.sessions.Stream()
    items = [
        item(sid, f"r{i}", tokens(*chunk), top_k=6, per_position=True)
        for i, (sid, chunk) in enumerate(zip(sids, chunks, strict=True))
    ]
    items.insert(3, item(gen_sid, "gen", generate=make_sampling(temperature=1.0, max_tokens=4)))
    await call.write(pb.StreamRequest(items=items))
    replies = await read_replies(call, [f"r{i}" for i in range(len(sizes))], generate=["gen"])
    await call.done_writing()

    # One step carried single-input rows, chunks of several lengths and a generating row.
    mixed = [rows for rows in batch_sizes if {0, 1} <= set(rows) and len(set(rows) - {0, 1}) >= 2]
    assert mixed, f"no step mixed chunk sizes: {batch_sizes}"
    for i, chunk in enumerate(chunks):
        (reply,) = replies[f"r{i}"]
        outputs = ReferenceSession(store_root, "tok").feed(chunk)
        assert reply.position == len(chunk) and len(reply.per_position) == len(chunk)
        for pred, out in zip(reply.per_position, outputs, strict=True):
            assert_matches_reference(pred, out)
    generated = [r.token.id for r in replies["gen"]]
    alone = [
        r.token.id
        async for r in client.sessions.Generate(
            pb.GenerateRequest(
                session_id=alone_sid, sampling=make_sampling(temperature=1.0, max_tokens=4)
            )
        )
    ]
    assert generated == alone


async def test_same_seed_sessions_generate_alike_side_by_side(client: SeqServeClient) -> None:
    """Each session draws from its own RNG, so batch neighbours never perturb each other."""

    async def run(seed: int) -> list[int]:
        created = await client.sessions.CreateSession(
            pb.CreateSessionRequest(model="tok", seed=seed)
        )
        request = pb.GenerateRequest(
            session_id=created.session.session_id,
            sampling=make_sampling(temperature=1.0, max_tokens=20),
        )
        return [r.token.id async for r in client.sessions.Generate(request)]

    results = await asyncio.gather(*(run(s) for s in [7] * 8 + [8] * 8))
    assert all(r == results[0] for r in results[:8])
    assert all(r == results[8] for r in results[8:])
    assert results[0] != results[8]
    assert results[0] == await run(7)
