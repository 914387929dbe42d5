"""A generation is charged up front (its prompt, and the most it may generate) and reconciled
when it ends, however it ends: the caller keeps paying for its prompt, once its step ran, and
for the tokens generated; the rest is given back. What a generation kept shows as the tokens
a one-token step is then told are still owed (its wait times the rate). The rate is an eighth
of a token a second, so the bounds (half a token of slack at least) hold through 4 s of refill
between the charge and that step: a loaded host stalls for seconds. An eighth is exact in
binary: a charge given back whole leaves the bucket exactly full, and a one-token step goes
through (a full bucket lets through a request larger than itself)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import pytest

from service.engine.session_engine import SessionEngine
from service.engine.session_lease import SessionLeases
from service.engine.session_line import Entry, Line
from service.errors import Internal, QuotaExceeded
from service.runtime.sampler import SamplingParams
from service.runtime.step_batch import StepBatch
from service.security import principal
from service.security.principal import Principal

from .conftest import EngineFactory, slow_takes, toks, wait_idle

TOKENS_PER_SECOND = 0.125  # a bucket of an eighth of a token: a charge of 52 leaves 52 owed
RATE = {"tokens_per_second": TOKENS_PER_SECOND}
PROMPT = toks(1, 2)
MAX_TOKENS = 50  # charged 2 + 50


async def _engine(make_engine: EngineFactory, **kw: object) -> tuple[SessionEngine, str]:
    engine = await make_engine(security=RATE, **kw)
    principal.current.set(Principal("alice", "client"))
    session, _ = await engine.create_session("tok")
    return engine, session.session_id


async def _owed(engine: SessionEngine, session_id: str) -> float:
    """The tokens a one-token step is told the bucket still owes (its wait times the rate:
    what was kept, less what refilled since, plus the wait's 0.01 s margin), or 0 when the
    step went through (nothing was owed)."""
    try:
        await engine.feed(session_id, toks(1))
    except QuotaExceeded as exc:
        assert exc.retry_after is not None
        return exc.retry_after * TOKENS_PER_SECOND
    return 0.0


def _greedy(**kw: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, **kw)  # type: ignore[arg-type]


async def test_a_generation_stopped_early_keeps_its_prompt_and_its_token(
    make_engine: EngineFactory,
) -> None:
    engine, sid = await _engine(make_engine)
    every_token = _greedy(stop_token_ids=tuple(range(256)))  # the first token stops it
    got = [t async for t in engine.generate(sid, PROMPT, every_token)]
    assert len(got) == 1 and got[0].finish_reason == "stop_token"
    assert 2.0 < await _owed(engine, sid) <= 3.01  # 2 + 1 kept; 49 given back


async def test_a_generation_cancelled_after_its_first_token_keeps_what_it_generated(
    make_engine: EngineFactory,
) -> None:
    engine, sid = await _engine(make_engine)
    async with contextlib.aclosing(engine.generate(sid, PROMPT, _greedy())) as tokens:
        async for _ in tokens:
            break  # the client goes away
    session = engine.sessions.get(sid)
    await wait_idle(session)
    generated = session.position - 2  # what ran ahead of the reader counts too
    assert generated < MAX_TOKENS
    kept = 2 + generated
    assert kept - 1.5 < await _owed(engine, sid) <= kept + 0.01  # one step may end later


@contextlib.contextmanager
def _failing_step(engine: SessionEngine, nth: int) -> Iterator[None]:
    """The `nth` step of `tok` v1 from now on fails (applies nothing); the others run."""
    served = engine.versions.find("tok", 1)
    assert served is not None
    execute = served.runner.execute
    steps = 0

    def counted(batch: StepBatch):  # type: ignore[no-untyped-def]
        nonlocal steps
        steps += 1
        if steps == nth:
            raise RuntimeError("the step failed")
        return execute(batch)

    served.runner.execute = counted  # type: ignore[method-assign]
    try:
        yield
    finally:
        served.runner.execute = execute  # type: ignore[method-assign]


@pytest.mark.parametrize(("failing", "kept"), [(1, 0), (2, 2), (4, 4)])
async def test_a_generation_that_fails_keeps_only_what_ran(
    make_engine: EngineFactory, failing: int, kept: int
) -> None:
    """Step 1 is the prompt's (it fails: nothing ran, nothing kept); step 2 makes the first
    token (it fails: the prompt ran, no token); step 4 fails after two tokens."""
    engine, sid = await _engine(make_engine, engine={"inline_max_rows": 0})
    got = []
    failure = RuntimeError if failing == 1 else Internal  # the prompt's step: as a feed's
    with _failing_step(engine, failing), pytest.raises(failure):
        async for token in engine.generate(sid, PROMPT, _greedy()):
            got.append(token)
    assert len(got) == max(0, failing - 2)
    await wait_idle(engine.sessions.get(sid))
    owed = await _owed(engine, sid)
    assert (owed == 0.0) if kept == 0 else kept - 1.0 < owed <= kept + 0.01


@pytest.fixture
def lease_taken(monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """Set once a request has taken its lease, or its place in the line for it."""
    taken = asyncio.Event()
    take = SessionLeases.take

    def spy(self: SessionLeases, session_id: str, line: Line | None = None):  # type: ignore[no-untyped-def]
        lease = take(self, session_id, line)
        taken.set()
        return lease

    monkeypatch.setattr(SessionLeases, "take", spy)
    return taken


async def test_a_generation_cancelled_waiting_for_its_session_keeps_nothing(
    make_engine: EngineFactory, lease_taken: asyncio.Event
) -> None:
    """A Stream's generation queued behind the stream's earlier request on its session."""
    engine, sid = await _engine(make_engine)
    line = Line()
    async with engine.leases.hold(sid, line):  # the earlier request, running
        lease_taken.clear()
        waiting = asyncio.create_task(_drain(engine, sid, line))
        await lease_taken.wait()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
    assert await _owed(engine, sid) == 0.0  # all 52 given back


async def test_a_generation_cancelled_in_its_streams_line_keeps_nothing(
    make_engine: EngineFactory, state_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a shared tier a Stream's generation charges the tier, then waits in the stream's
    line (`Entry.turn`) behind an earlier item that has not taken its lease yet."""
    in_line = asyncio.Event()
    turn = Entry.turn

    async def spy(self: Entry) -> None:
        in_line.set()
        await turn(self)

    monkeypatch.setattr(Entry, "turn", spy)
    engine, sid = await _engine(make_engine, state_url=state_url)
    line = Line()
    earlier = line.enter([sid])  # an item still charging, say
    waiting = asyncio.create_task(_drain(engine, sid, line))
    await in_line.wait()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    earlier.leave()
    assert await _owed(engine, sid) == 0.0  # all 52 given back


async def _drain(engine: SessionEngine, session_id: str, line: Line) -> None:
    async for _ in engine.generate(session_id, PROMPT, _greedy(), line):
        pass


async def test_a_generation_cancelled_while_the_tier_takes_its_charge_keeps_nothing(
    make_engine: EngineFactory, state_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shared tier's take runs in a thread, which the cancel does not stop: the tier takes
    the charge anyway, and it is given back once taken (the generation never ran)."""
    taking, taken = slow_takes(monkeypatch, lambda tokens: tokens >= MAX_TOKENS)  # 2 + 50
    engine, sid = await _engine(make_engine, state_url=state_url)
    generating = asyncio.create_task(_drain(engine, sid, Line()))
    await asyncio.to_thread(taking.wait, 5)
    generating.cancel()
    with pytest.raises(asyncio.CancelledError):
        await generating
    await asyncio.to_thread(taken.wait, 5)  # the thread took the charge, whatever the fix does
    assert engine.sessions.get(sid).position == 0  # nothing ran
    assert await _owed(engine, sid) == 0.0  # all 52 given back


async def test_a_generation_queued_in_its_streams_line_keeps_its_prompt_once_it_ran(
    make_engine: EngineFactory, lease_taken: asyncio.Event
) -> None:
    """A Stream's generation waits for its session behind the stream's earlier request; then
    its prompt's step runs and its first token's step fails: the prompt is kept."""
    engine, sid = await _engine(make_engine, engine={"inline_max_rows": 0})
    line = Line()
    with _failing_step(engine, 2):  # 1: the prompt's step (runs); 2: the first token's
        async with engine.leases.hold(sid, line):  # the earlier request, running
            lease_taken.clear()
            queued = asyncio.create_task(_drain(engine, sid, line))
            await lease_taken.wait()
        with pytest.raises(Internal):
            await queued
    await wait_idle(engine.sessions.get(sid))
    assert engine.sessions.get(sid).position == 2  # the prompt ran
    assert 1.0 < await _owed(engine, sid) <= 2.01  # the prompt kept; 50 given back


async def test_a_retry_of_a_finished_generation_keeps_nothing(
    make_engine: EngineFactory,
) -> None:
    """A retry (same request id and expected position) sends the first call's tokens again
    from its log: nothing it applies, nothing it keeps."""
    engine, sid = await _engine(make_engine)
    params = SamplingParams(temperature=0.0, max_tokens=5)
    first = [t async for t in engine.generate(sid, PROMPT, params, request_id="r1")]
    await engine.quotas.refund(10**6)  # the first call's 7 paid off: a full bucket
    again = [
        t async for t in engine.generate(sid, PROMPT, params, expected_position=0, request_id="r1")
    ]
    assert again == first and engine.sessions.get(sid).position == 7  # nothing applied again
    assert await _owed(engine, sid) == 0.0  # all 7 given back


async def test_a_retry_that_goes_on_keeps_only_the_tokens_it_generated(
    make_engine: EngineFactory,
) -> None:
    """The first call is cancelled after its first token; its retry sends what it applied
    again, then generates the rest: only the rest is kept (the prompt ran in the first)."""
    engine, sid = await _engine(make_engine)
    first = engine.generate(sid, PROMPT, _greedy(), expected_position=0, request_id="r1")
    async with contextlib.aclosing(first) as tokens:
        async for _ in tokens:
            break  # the client goes away
    session = engine.sessions.get(sid)
    await wait_idle(session)
    applied = session.position
    await engine.quotas.refund(10**6)  # the first call's charge paid off: a full bucket
    again = engine.generate(sid, PROMPT, _greedy(), expected_position=0, request_id="r1")
    got = [t async for t in again]
    assert got[-1].position == 2 + MAX_TOKENS  # resent, then generated to the end
    kept = 2 + MAX_TOKENS - applied
    assert kept - 1.0 < await _owed(engine, sid) <= kept + 0.01
