"""The journal's replay after kill -9 of a real `seqserve serve`, in the two cases the engine
tests crash in-process (tests/engine/test_recovery.py, tests/engine/test_replay.py): a retried
Step answered from the journal bit for bit, and the replay's checkpoints written with the spill
tier at its cap."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.client.client import SeqServeClient, make_sampling
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import types_pb2 as types

from .support import ReferenceSession, assert_matches_reference, frames, tokens
from .test_lifecycle_restart import ServerProcess

pytestmark = pytest.mark.integration

NO_CHECKPOINTS = {  # every session's state after the kill is in the journal alone
    "SEQSERVE_SESSIONS__CHECKPOINT_IDLE_SECONDS": "3600",
    "SEQSERVE_SESSIONS__CHECKPOINT_STEPS": "1000",
}
OPTIONS = types.PredictionOptions(top_k=5, per_position=True)
TOKEN_STEPS = [(1,), (2, 3), (4,), "generate", (5,), (6, 7, 8), (9,), (10,)]
FRAME_STEPS = [(0.1, -0.2, 0.3), (0.5, 0.4, -0.3, 0.2, -0.1, 0.9), (0.2, -0.2, 0.6), (0.3, 0, 1)]


async def _feed(
    client: SeqServeClient, sid: str, model: str, steps: list[object], position: int = 0
) -> tuple[int, pb.StepResponse, pb.StepRequest]:
    """`steps` fed one at a time, each with a request id; the last reply and its request."""
    for k, step in enumerate(steps):
        if step == "generate":  # each token a one-input step
            sampling = make_sampling(temperature=1.0, max_tokens=5)
            generate = pb.GenerateRequest(session_id=sid, sampling=sampling)
            position += len([r async for r in client.sessions.Generate(generate)])
            continue
        assert isinstance(step, tuple)
        data = tokens(*step) if model == "tok" else frames(step)
        request = pb.StepRequest(
            session_id=sid, input=data, options=OPTIONS, request_id=f"r{k}",
            expected_position=position,
        )  # fmt: skip
        reply = await client.sessions.Step(request)
        position = reply.position
    return position, reply, request


@pytest.mark.parametrize("model", ["tok", "frames"])
async def test_a_step_retried_after_sigkill_gets_its_reply_from_the_journal_bit_for_bit(
    store_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: str
) -> None:
    """Steps of one input and of several, each alone, then SIGKILL with no checkpoint written:
    the restarted server rebuilds the session from the journal, and a retry of the last Step
    gets the original reply, every float equal (per-position predictions too); the next step
    then predicts exactly what a twin fed the same inputs on the restarted server predicts."""
    for name, value in NO_CHECKPOINTS.items():
        monkeypatch.setenv(name, value)
    state = tmp_path / "state"
    server = ServerProcess(store_root, state, tmp_path)
    steps = TOKEN_STEPS if model == "tok" else FRAME_STEPS
    after: list[object] = [(11,)] if model == "tok" else [(0.7, -0.7, 0.2)]
    try:
        await server.start()
        async with SeqServeClient(f"127.0.0.1:{server.port}") as client:
            made = await client.sessions.CreateSession(pb.CreateSessionRequest(model=model, seed=3))
            sid = made.session.session_id
            position, original, last = await _feed(client, sid, model, steps)
        assert not list(state.glob("*.spill")), "the case: no checkpoint, the journal alone"
        server.kill()
        await server.start()
        async with SeqServeClient(f"127.0.0.1:{server.port}") as client:
            retried = await client.sessions.Step(last)
            got = await client.sessions.GetSession(pb.GetSessionRequest(session_id=sid))
            _, next_reply, _ = await _feed(client, sid, model, after, position)
            made = await client.sessions.CreateSession(pb.CreateSessionRequest(model=model, seed=3))
            twin = made.session.session_id
            twin_position, twin_last, _ = await _feed(client, twin, model, steps)
            _, twin_next, _ = await _feed(client, twin, model, after, twin_position)
    finally:
        server.kill()
    assert retried == original  # the same reply, every field, bit for bit
    assert got.session.position == position  # applied once
    assert twin_last.prediction == original.prediction
    assert next_reply.prediction == twin_next.prediction


async def test_sessions_replayed_after_sigkill_with_the_spill_tier_at_its_cap_are_served(
    store_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pool of three sessions full, a fourth evicted to the spill tier, then SIGKILL; the
    restarted server's tier is capped at one and a half records. The three that were in memory
    come back from the journal, and their replay writes their checkpoints past the cap (the
    pool they held bounds how far): each is served at its position with the reference's
    prediction, and the evicted one keeps its checkpoint. Refused as "spill tier full", each
    request for them was RESOURCE_EXHAUSTED and the background replay retried forever."""
    for name, value in NO_CHECKPOINTS.items():
        monkeypatch.setenv(name, value)
    state = tmp_path / "state"
    server = ServerProcess(store_root, state, tmp_path, slots=3)
    fed: dict[str, list[int]] = {}
    try:
        await server.start()
        async with SeqServeClient(f"127.0.0.1:{server.port}") as client:
            for _ in range(4):  # the fourth evicts the first
                made = await client.sessions.CreateSession(pb.CreateSessionRequest(model="tok"))
                fed[made.session.session_id] = []
            spilled = list(state.glob("*.spill"))
            assert len(spilled) == 1, spilled
            evicted = spilled[0].name.removesuffix(".spill")
            for k, sid in enumerate(s for s in fed if s != evicted):
                fed[sid] = [k + 1, k + 2, k + 3]
                await client.sessions.Step(pb.StepRequest(session_id=sid, input=tokens(*fed[sid])))
        record = spilled[0].stat().st_size
        server.kill()
        monkeypatch.setenv("SEQSERVE_SESSIONS__SPILL_MAX_BYTES", str(record * 3 // 2))
        await server.start()
        async with SeqServeClient(f"127.0.0.1:{server.port}") as client:
            for sid, inputs in fed.items():
                if sid == evicted:  # in the tier all along (a step would need an eviction)
                    got = await client.sessions.GetSession(pb.GetSessionRequest(session_id=sid))
                    assert got.session.position == 0
                    continue
                reference = ReferenceSession(store_root, "tok")
                reference.feed(inputs)
                reply = await client.sessions.Step(
                    pb.StepRequest(session_id=sid, input=tokens(7), expected_position=len(inputs))
                )
                assert reply.position == len(inputs) + 1
                assert_matches_reference(reply.prediction, reference.feed([7])[-1])
    finally:
        server.kill()
    assert sum(p.stat().st_size for p in state.glob("*.spill")) > record * 3 // 2, "past the cap"
