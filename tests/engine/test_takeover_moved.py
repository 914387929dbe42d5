"""The shared tier's `moved` set (copies known stale) holds a session only while this replica
has a copy of it: a long-running replica must not keep every id it was ever fenced on."""

from __future__ import annotations

import pytest

from service.engine.session_engine import SessionEngine
from service.errors import SessionMoved
from service.sessions.shared_tier import SharedState

from .conftest import EngineFactory, FakeClock, toks


def _moved(engine: SessionEngine) -> set[str]:
    state = engine.takeover._state
    assert isinstance(state, SharedState)
    return state.moved


async def test_a_fenced_copy_leaves_the_set_when_taken_back(
    make_engine: EngineFactory, state_url: str
) -> None:
    a = await make_engine(state_url=state_url)
    b = await make_engine(state_url=state_url)
    s, _ = await a.create_session("tok")
    await a.feed(s.session_id, toks(1))
    await b.feed(s.session_id, toks(2))  # b takes it over
    with pytest.raises(SessionMoved):
        await a.feed(s.session_id, toks(3))
    assert _moved(a) == {s.session_id}
    assert (await a.feed(s.session_id, toks(3))).position == 3  # the retry takes it back
    assert _moved(a) == set()


async def test_a_fenced_copy_leaves_the_set_when_it_ends_here(
    make_engine: EngineFactory, state_url: str
) -> None:
    """a's copy is fenced, then the session is closed on b and a never hears of it again: a's
    stale copy ends at its TTL (its END refused: not a's to write). Before, its id stayed in
    `moved` for the life of the process."""
    clock = FakeClock()
    a = await make_engine(state_url=state_url, clock=clock)
    b = await make_engine(state_url=state_url)
    s, _ = await a.create_session("tok", ttl_seconds=60)
    await a.feed(s.session_id, toks(1))
    await b.feed(s.session_id, toks(2))
    with pytest.raises(SessionMoved):
        await a.feed(s.session_id, toks(3))
    await b.close_session(s.session_id)
    clock.advance(120)
    assert await a.sweep_expired() == 1
    assert a.sessions.peek(s.session_id) is None
    assert _moved(a) == set()


async def test_a_copy_let_go_when_its_eviction_is_fenced_leaves_the_set(
    make_engine: EngineFactory, state_url: str
) -> None:
    """a evicts a copy another replica took over: its checkpoint is refused and a lets the copy
    go. Before, its id stayed in `moved`."""
    a = await make_engine(state_url=state_url, slots=1)
    b = await make_engine(state_url=state_url)
    x, _ = await a.create_session("tok")
    await a.feed(x.session_id, toks(1))
    await b.feed(x.session_id, toks(2))  # b takes it over; a does not know yet
    await a.create_session("tok")  # evicts x: its checkpoint is fenced, the copy let go
    assert a.sessions.peek(x.session_id) is None
    assert _moved(a) == set()
