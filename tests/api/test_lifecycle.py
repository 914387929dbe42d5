"""Session lifecycle over real gRPC: a pool far smaller than the sessions, spill records refused
when damaged, idle expiry, fork, a restart on the same spill directory, alias flips."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc

from service.api.server import SeqServeServer
from service.client.client import SeqServeClient
from service.pb.seqserve.v1 import model_registry_pb2 as reg
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import types_pb2 as types
from service.registry.store import ModelStore

from .conftest import TOKEN_CONFIG, ServerFactory, publish_random
from .support import code_value, expect_status, item, read_replies, tokens

SLOT_BYTES = 4 * TOKEN_CONFIG.state_numel()  # a slot holds h and c, nothing else


def _tiny(slots: int, **sessions: object) -> dict[str, object]:
    return {"pool_bytes": slots * SLOT_BYTES, "pool_initial_slots": slots, **sessions}


def _client(srv: SeqServeServer) -> SeqServeClient:
    return SeqServeClient(f"127.0.0.1:{srv.port}")


async def _create(client: SeqServeClient, **fields: object) -> str:
    request = pb.CreateSessionRequest(model="tok", **fields)  # type: ignore[arg-type]
    return (await client.sessions.CreateSession(request)).session.session_id


async def _step(client: SeqServeClient, sid: str, *ids: int) -> pb.StepResponse:
    request = pb.StepRequest(session_id=sid, input=tokens(*ids))
    return await client.sessions.Step(request)


async def _state(client: SeqServeClient, sid: str) -> types.Session:
    return (await client.sessions.GetSession(pb.GetSessionRequest(session_id=sid))).session


def _close(a: types.Prediction, b: types.Prediction, tol: float = 1e-6) -> bool:
    ta, tb = a.tokens.top, b.tokens.top
    return [x.id for x in ta] == [x.id for x in tb] and all(
        abs(x.prob - y.prob) <= tol for x, y in zip(ta, tb, strict=True)
    )


def _chunk(i: int, round_: int) -> list[int]:
    return [(i * 37 + round_ * 11 + k) % 256 for k in range(1 + (i + round_) % 3)]


async def test_many_more_sessions_than_slots_answer_like_never_evicted(
    server_factory: ServerFactory,
) -> None:
    tiny = await server_factory(sessions=_tiny(4))
    roomy = await server_factory()
    async with _client(tiny) as t, _client(roomy) as r:
        pairs = [(await _create(t, seed=i), await _create(r, seed=i)) for i in range(24)]
        for round_ in range(2):  # one request at a time
            for i, (a, b) in enumerate(pairs):
                got, want = (
                    await _step(t, a, *_chunk(i, round_)),
                    await _step(r, b, *_chunk(i, round_)),
                )
                assert got.position == want.position
                assert got.prediction == want.prediction, f"session {i}"
        states = [(await _state(t, a)).state for a, _ in pairs]
        assert states.count(types.SESSION_STATE_SPILLED) == 20
        assert states.count(types.SESSION_STATE_ACTIVE) == 4

        # All 24 in one Stream message: restores wait for slots as steps finish.
        call = t.sessions.Stream()
        await call.write(
            pb.StreamRequest(
                items=[item(a, str(i), tokens(*_chunk(i, 2))) for i, (a, _) in enumerate(pairs)]
            )
        )
        replies = await read_replies(call, [str(i) for i in range(len(pairs))])
        await call.done_writing()
        for i, (_, b) in enumerate(pairs):
            (reply,) = replies[str(i)]
            assert reply.error.code == 0, reply.error.message
            want = await _step(r, b, *_chunk(i, 2))
            assert reply.position == want.position
            # Batched with others here, alone there: equal up to float rounding.
            assert _close(reply.prediction, want.prediction), f"session {i}"


async def test_damaged_spill_record_is_data_loss(server_factory: ServerFactory) -> None:
    srv = await server_factory(sessions=_tiny(1))
    async with _client(srv) as client:
        victim = await _create(client)
        await _step(client, victim, 1, 2)
        await _create(client)  # evicts `victim`
        assert (await _state(client, victim)).state == types.SESSION_STATE_SPILLED
        path = srv.engine.spill.path(victim)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        await expect_status(_step(client, victim, 3), grpc.StatusCode.DATA_LOSS, "checksum")
        call = client.sessions.Stream()  # in-band on a stream, which goes on
        await call.write(pb.StreamRequest(items=[item(victim, "x", tokens(3))]))
        (reply,) = (await read_replies(call, ["x"]))["x"]
        await call.done_writing()
        assert reply.error.code == code_value(grpc.StatusCode.DATA_LOSS)


async def test_idle_session_expires_with_not_found_saying_so(server: SeqServeServer) -> None:
    now = [1000.0]
    server.engine.sessions.clock = lambda: now[0]
    async with _client(server) as client:
        sid = await _create(client, ttl={"seconds": 30})
        await _step(client, sid, 1)
        now[0] += 31.0
        await expect_status(_step(client, sid, 2), grpc.StatusCode.NOT_FOUND, "expired")
        await expect_status(
            client.sessions.GetSession(pb.GetSessionRequest(session_id=sid)),
            grpc.StatusCode.NOT_FOUND,
            "expired",
        )


async def test_fork_diverges_from_its_parent(client: SeqServeClient) -> None:
    parent = await _create(client, seed=5)
    await _step(client, parent, 10, 11, 12)
    child = (await client.sessions.ForkSession(pb.ForkSessionRequest(session_id=parent))).session
    assert (child.position, child.parent_session_id) == (3, parent)
    twin = await _create(client, seed=5)
    await _step(client, twin, 10, 11, 12)
    c = await _step(client, child.session_id, 200)
    p = await _step(client, parent, 1)
    t = await _step(client, twin, 1)
    assert c.position == p.position == 4
    assert [x.id for x in c.prediction.tokens.top] != [x.id for x in p.prediction.tokens.top]
    assert [x.id for x in p.prediction.tokens.top] == [x.id for x in t.prediction.tokens.top]


async def test_restart_on_the_same_spill_directory_keeps_every_session(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    spill = {"spill_dir": tmp_path / "shared-spill"}
    first = await server_factory(sessions=_tiny(3, **spill))
    roomy = await server_factory()
    async with _client(first) as f, _client(roomy) as r:
        pairs = [(await _create(f, seed=i), await _create(r, seed=i)) for i in range(6)]
        for i, (a, b) in enumerate(pairs):
            await _step(f, a, *_chunk(i, 0))
            await _step(r, b, *_chunk(i, 0))
    await first.stop()
    second = await server_factory(sessions=_tiny(3, **spill))
    async with _client(second) as s, _client(roomy) as r:
        for i, (a, b) in enumerate(pairs):
            assert (await _state(s, a)).position == len(_chunk(i, 0))
            got, want = await _step(s, a, 99), await _step(r, b, 99)
            assert (got.position, got.prediction) == (want.position, want.prediction)


async def test_alias_flip_under_live_sessions(
    server_factory: ServerFactory, store_root: Path
) -> None:
    srv = await server_factory()
    async with _client(srv) as client:
        old = await _create(client)
        publish_random(ModelStore(store_root), "tok", TOKEN_CONFIG, seed=7)  # version 2
        await client.registry.SetAlias(
            reg.SetAliasRequest(name="tok", alias="production", version=1)
        )
        assert (await _state(client, await _create(client))).version == 1
        await client.registry.SetAlias(
            reg.SetAliasRequest(name="tok", alias="production", version=2)
        )
        new = await _create(client)
        assert ((await _state(client, old)).version, (await _state(client, new)).version) == (1, 2)
        await _step(client, old, 1, 2)  # the old session finishes on its own version
        model = (await client.registry.GetModel(reg.GetModelRequest(name="tok"))).model
        live = {v.version: (v.loaded, v.live_sessions) for v in model.versions}
        assert live == {1: (True, 2), 2: (True, 1)}
        for sid in (
            old,
            *[s.session_id for s in srv.engine.sessions if s.version == 1 and s.session_id != old],
        ):
            await client.sessions.CloseSession(pb.CloseSessionRequest(session_id=sid))
        await srv.engine.settle()
        model = (await client.registry.GetModel(reg.GetModelRequest(name="tok"))).model
        assert {v.version: v.loaded for v in model.versions} == {1: False, 2: True}


async def test_many_concurrent_sessions_on_a_tiny_pool_all_answer(
    server_factory: ServerFactory,
) -> None:
    """Concurrent clients, four slots: requests wait for slots, none fails or deadlocks."""
    tiny = await server_factory(sessions=_tiny(4))
    async with _client(tiny) as client:
        ids = [await _create(client, seed=i) for i in range(16)]

        async def drive(sid: str) -> int:
            for k in range(3):
                await _step(client, sid, k)
            return (await _state(client, sid)).position

        assert await asyncio.gather(*(drive(s) for s in ids)) == [3] * 16
