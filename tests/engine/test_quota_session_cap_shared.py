"""The per-principal session cap holds against bursts with a shared state tier: many creates
(or forks) by one principal at once never leave it with more than its cap, however the tier's
reads of its count interleave with the creates that finish meanwhile; and a burst within the
cap is not refused."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from service.engine.session_engine import SessionEngine
from service.errors import QuotaExceeded
from service.security import principal
from service.security.principal import Principal
from service.sessions.session import Session

from .conftest import EngineFactory

CAP = 3
BURST = 30


async def _engine(make_engine: EngineFactory, state_url: str) -> SessionEngine:
    engine = await make_engine(state_url=state_url, security={"sessions_per_principal": CAP})
    principal.current.set(Principal("bob", "client"))
    return engine


async def _burst(make: Callable[[], Awaitable[Session]], n: int = BURST) -> list[Session]:
    """`n` calls of `make` at once: the sessions made (the others refused at the cap)."""
    made = await asyncio.gather(*(make() for _ in range(n)), return_exceptions=True)
    refused = [r for r in made if not isinstance(r, Session)]
    assert all(isinstance(r, QuotaExceeded) for r in refused), refused
    return [r for r in made if isinstance(r, Session)]


async def test_a_burst_of_creates_cannot_pass_the_cap(
    make_engine: EngineFactory, state_url: str
) -> None:
    engine = await _engine(make_engine, state_url)

    async def create() -> Session:
        return (await engine.create_session("tok"))[0]

    for _ in range(3):
        made = await _burst(create)
        assert len(made) == CAP
        for session in made:
            await engine.close_session(session.session_id)
    assert len(await _burst(create, CAP)) == CAP  # a burst within the cap: all made


async def test_a_burst_of_forks_cannot_pass_the_cap(
    make_engine: EngineFactory, state_url: str
) -> None:
    engine = await _engine(make_engine, state_url)
    for _ in range(3):
        base, _ = await engine.create_session("tok")
        forks = await _burst(lambda: engine.fork_session(base.session_id))  # noqa: B023
        assert len(forks) == CAP - 1
        for session in [base, *forks]:
            await engine.close_session(session.session_id)
