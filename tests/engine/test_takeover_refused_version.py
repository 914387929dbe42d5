"""A session a replica refused only for what it lacks now (its version cannot be loaded there:
FAILED_PRECONDITION, VersionGone) is not refused for good, as a damaged one is: its next request
asks the tier again. So it is taken over once the store holds the version again, and a close on
another replica is heard as such (a real redis-server and the SQLite file, two engines in
process)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from service.errors import FailedPrecondition, SessionClosed, SessionMoved

from .conftest import EngineFactory, toks


async def _refused_on_b_until_the_version_is_back(  # type: ignore[no-untyped-def]
    make_engine: EngineFactory, state_url: str, store_root: Path
):
    """Replicas a and b; a session made and fed on a; b refuses it while tok 1 is away from
    the store (FAILED_PRECONDITION), then tok 1 is back."""
    a = await make_engine(state_url=state_url)
    b = await make_engine(state_url=state_url)
    s, _ = await a.create_session("tok")
    await a.feed(s.session_id, toks(1, 2))
    away = store_root.parent / "tok-1-away"
    (store_root / "tok" / "1").rename(away)
    with pytest.raises(FailedPrecondition):
        await asyncio.wait_for(b.feed(s.session_id, toks(3)), 30)
    away.rename(store_root / "tok" / "1")
    return a, b, s


async def test_a_session_refused_for_its_version_is_taken_over_once_the_version_is_back(
    make_engine: EngineFactory, state_url: str, store_root: Path
) -> None:
    _a, b, s = await _refused_on_b_until_the_version_is_back(make_engine, state_url, store_root)
    assert (await asyncio.wait_for(b.feed(s.session_id, toks(3)), 30)).position == 3
    assert (await b.describe_session(s.session_id)).position == 3


async def test_a_session_refused_for_its_version_then_closed_elsewhere_is_closed(
    make_engine: EngineFactory, state_url: str, store_root: Path
) -> None:
    a, b, s = await _refused_on_b_until_the_version_is_back(make_engine, state_url, store_root)
    with pytest.raises(SessionMoved):  # b's claim fenced a's copy: a client retries
        await a.feed(s.session_id, toks(3))
    await a.feed(s.session_id, toks(3))  # a takes it back (a loaded the version)
    await a.close_session(s.session_id)
    with pytest.raises(SessionClosed):
        await b.describe_session(s.session_id)
    with pytest.raises(SessionClosed):
        await b.feed(s.session_id, toks(4))
