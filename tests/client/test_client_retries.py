"""The Python client across a server crash: an app feeding and generating in a loop while a
real `seqserve serve` is killed with SIGKILL and restarted on the same port, twice, sees every
input applied exactly once (position and next prediction equal the NumPy reference over exactly
its inputs) and every generated token once."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from service.client.client import RetryPolicy, SeqServeClient
from service.pb.seqserve.v1 import session_service_pb2 as pb
from tests.api.conftest import store_root  # noqa: F401 - the fixture
from tests.api.support import ReferenceSession, assert_matches_reference, tokens
from tests.api.test_lifecycle_restart import ServerProcess
from tests.ports import free_port

pytestmark = pytest.mark.integration


async def _crashes(server: ServerProcess, rng: random.Random, times: int) -> None:
    for _ in range(times):
        await asyncio.sleep(rng.uniform(0.3, 0.8))
        server.kill()
        await asyncio.sleep(0.2)
        await server.start()


async def test_feeds_and_generations_apply_exactly_once_across_crashes(
    store_root: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    rng = random.Random(7)
    server = ServerProcess(store_root, tmp_path / "state", tmp_path, slots=8,
                           port=free_port())  # fmt: skip
    try:
        await server.start()
        target = f"127.0.0.1:{server.port}"
        async with SeqServeClient(target, retry=RetryPolicy(deadline_seconds=90)) as client:
            session = await client.create_session("tok", seed=3)
            inputs: list[int] = []
            crashes = asyncio.create_task(_crashes(server, rng, times=2))
            rounds = 0
            while not crashes.done() or rounds < 5:
                chunk = [rng.randrange(256) for _ in range(rng.randint(1, 3))]
                await session.feed(tokens=chunk)
                inputs += chunk
                if rounds % 4 == 0:  # now and then a generation, its tokens fed back in
                    pieces = [p async for p in session.generate(max_tokens=5, temperature=1.0)]
                    assert len(pieces) == 5
                    inputs += [p.token_id for p in pieces]
                    assert [p.position for p in pieces] == list(
                        range(len(inputs) - 4, len(inputs) + 1)
                    )
                rounds += 1
            await crashes
            got = await client.sessions.GetSession(
                pb.GetSessionRequest(session_id=session.session_id)
            )
            assert got.session.position == len(inputs)
            reply = await client.sessions.Step(
                pb.StepRequest(session_id=session.session_id, input=tokens(9))
            )
        reference = ReferenceSession(store_root, "tok")
        reference.feed(inputs)
        assert_matches_reference(reply.prediction, reference.feed([9])[-1])
    finally:
        server.kill()
    assert server.log.read_text().count("seqserve listening") == 3  # two kills, two restarts
