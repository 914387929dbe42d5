"""SessionMaker: creates and forks exactly once per request id."""

from __future__ import annotations

import asyncio

from .conftest import EngineFactory, toks


async def test_concurrent_creates_with_one_request_id_make_one_session(
    make_engine: EngineFactory,
) -> None:
    engine = await make_engine()
    made = await asyncio.gather(
        *(engine.create_session("tok", prefix=toks(1, 2), request_id="same") for _ in range(4))
    )
    assert len({session.session_id for session, _ in made}) == 1
    assert len(engine.sessions) == 1
    assert all(outcome is not None and outcome.position == 2 for _, outcome in made)
