"""A replica that refused a damaged session of the shared tier (DATA_LOSS to its owner) lifts
that refusal once the tier no longer holds the session: its owner then hears what every other
replica says of a session whose TTL lapsed in the tier (NOT_FOUND, "expired after its idle
TTL"), anyone else the plain NOT_FOUND; on Redis and on SQLite."""

from __future__ import annotations

import logging

import pytest

from service.engine.background import Slices
from service.engine.shared_refusals import SharedRefusals
from service.errors import DataLoss, SeqServeError, SessionClosed, SessionExpired, SpillCorrupted
from service.security import principal
from service.security.principal import Principal
from service.sessions.session_store import SessionStore
from service.sessions.shared_tier import Claimed, Write
from tests.polling import until

from .conftest import EngineFactory, FakeClock, toks
from .test_takeover_damage import _flip_last_byte, _rewrite_checkpoint


async def test_a_damaged_sessions_refusal_ends_once_its_ttl_lapses_in_the_tier(
    make_engine: EngineFactory, state_url: str
) -> None:
    """alice's session (TTL 3 s) has its checkpoint damaged in the tier; a second replica
    refuses it to her (DATA_LOSS). Its keys lapse in the tier, leaving nothing, not even a
    tombstone. Before, that replica answered DATA_LOSS for ever (until a restart), and kept the
    refusal in memory, while every other replica said it expired."""
    a = await make_engine(state_url=state_url, sweep_interval_seconds=0.05)
    b = await make_engine(state_url=state_url, sweep_interval_seconds=0.05)
    principal.current.set(Principal("alice", "client"))
    # Its TTL must not lapse before b refuses it (some 10 ms after its step here): at 1 s, a
    # loaded host's stall of a second did that, and b found nothing to refuse (NOT_FOUND).
    hurt, _ = await a.create_session("tok", seed=1, ttl_seconds=3.0)
    sid = hurt.session_id
    await a.feed(sid, toks(1))
    assert await a.idle_checkpoints.sweep(0.0) == 1  # its checkpoint in the tier
    _rewrite_checkpoint(state_url, sid, _flip_last_byte)
    with pytest.raises(DataLoss):
        await b.feed(sid, toks(2))
    assert sid in b.sessions.broken

    await until(  # a look every 2 s, however late a loaded host is
        lambda: sid not in b.sessions.broken, 60, "b to drop its refusal", interval=0.1
    )
    state = b.takeover._state
    assert state is not None
    gone = state.peek(sid)
    # Nothing of it left in the tier, but for the tombstone its first holder, a, writes if
    # its own sweeper ends its (stale) copy at its TTL after the tier's lapsed.
    assert gone.epoch == 0 and gone.ended in ("", "expired")

    for replica in (b, a):
        with pytest.raises(SessionExpired, match="expired after its idle TTL"):
            await replica.feed(sid, toks(3))
        with pytest.raises(SessionExpired):
            await replica.describe_session(sid)
    assert sid not in b.sessions.broken  # nothing of the refusal kept
    principal.current.set(Principal("mallory", "client"))
    with pytest.raises(SeqServeError) as stranger:
        await b.feed(sid, toks(3))
    assert stranger.value.reason == "SESSION_NOT_FOUND"
    assert "expired" not in stranger.value.message


async def test_a_damaged_sessions_refusal_ends_with_what_its_tombstone_says(
    make_engine: EngineFactory, state_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same refused session ended in the tier another way, leaving a tombstone that says
    it was closed: that replica answers its owner so, where it answered DATA_LOSS for ever.
    Meanwhile the tier is asked about it every few seconds, not at each sweep."""
    a = await make_engine(state_url=state_url, sweep_interval_seconds=0.05)
    b = await make_engine(state_url=state_url, sweep_interval_seconds=0.05)
    principal.current.set(Principal("alice", "client"))
    hurt, _ = await a.create_session("tok", seed=1)
    sid = hurt.session_id
    await a.feed(sid, toks(1))
    assert await a.idle_checkpoints.sweep(0.0) == 1
    _rewrite_checkpoint(state_url, sid, _flip_last_byte)
    with pytest.raises(DataLoss):
        await b.feed(sid, toks(2))
    state = b.takeover._state
    assert state is not None
    asked: list[str] = []
    epoch_of = state.epoch_of

    def counted(session_id: str) -> int:
        asked.append(session_id)
        return epoch_of(session_id)

    state.epoch_of = counted  # type: ignore[method-assign]
    sweeps = 0
    sweep = SharedRefusals.sweep

    async def counted_sweep(self: SharedRefusals, slices: Slices) -> int:
        nonlocal sweeps
        sweeps += self._state is state  # b's sweeps
        return await sweep(self, slices)

    monkeypatch.setattr(SharedRefusals, "sweep", counted_sweep)
    # Some sweeps (0.05 s apart), well inside the first look's 2 s: a fixed second of them
    # left a loaded host's stall 1 s before the look came, and the test saw it.
    await until(lambda: sweeps >= 5, 60, "five sweeps")
    assert asked == []  # the first look comes a few seconds after the refusal
    end = Write(sid, epoch_of(sid), 600_000, "end", [b"closed\nalice"], owner="alice")
    assert state.append([end]) == []  # its END at its epoch, as its holder writes one

    await until(  # a look every 2 s, however late a loaded host is
        lambda: sid not in b.sessions.broken, 60, "b to drop its refusal", interval=0.1
    )
    with pytest.raises(SessionClosed, match="was closed"):
        await b.feed(sid, toks(3))
    assert 1 <= len(asked) <= 2  # one look found it gone
    principal.current.set(Principal("mallory", "client"))
    with pytest.raises(SeqServeError) as stranger:
        await b.feed(sid, toks(3))
    assert stranger.value.reason == "SESSION_NOT_FOUND"


class _Tier:
    """The two questions the sweeper asks of the tier, answered from a set of held ids (the
    real tiers' answers are the tests above'); the ids asked about, in order."""

    def __init__(self, held: set[str]) -> None:
        self.held = held
        self.asked: list[str] = []

    def epoch_of(self, session_id: str) -> int:
        self.asked.append(session_id)
        return 1 if session_id in self.held else 0

    def peek(self, session_id: str) -> Claimed:
        return Claimed(epoch=0, checkpoint=None)


async def test_every_refused_session_gets_its_turn_however_many_there_are() -> None:
    """40 refused sessions, the first 16 held in the tier for ever, the rest lapsed, swept once
    a second (the default): each sweep looks at 8, each session again 2 s after its look.
    Before, the sweep took the first 8 due in the order they were refused, so the first 16
    took every turn and the lapsed ones stayed refused (DATA_LOSS) for ever."""
    clock = FakeClock()
    sessions = SessionStore(100, clock=clock, wall_clock=clock.wall)
    ids = [f"s_r.{k:04d}" for k in range(40)]
    for sid in ids:
        sessions.mark_broken(sid, "its checkpoint is damaged", SpillCorrupted, "alice")
    tier = _Tier(held=set(ids[:16]))
    refusals = SharedRefusals(tier, sessions)  # type: ignore[arg-type]
    for _ in range(30):  # 30 s of sweeps
        await refusals.sweep(Slices())
        clock.now += 1.0
    assert set(sessions.broken) == set(ids[:16])  # only the held ones are still refused
    assert set(tier.asked) == set(ids)


async def test_a_tier_answer_that_cannot_be_read_fails_that_look_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before, anything but a SeqServeError (a corrupt hash field) went up through the sweep,
    and the sweeper's other work (idle checkpoints, the takeover purge) was skipped with it."""

    class Garbled(_Tier):
        def epoch_of(self, session_id: str) -> int:
            if session_id == "s_r.bad0":
                raise ValueError("invalid literal for int() with base 10: b'x'")
            return super().epoch_of(session_id)

    clock = FakeClock()
    sessions = SessionStore(100, clock=clock, wall_clock=clock.wall)
    for sid in ("s_r.bad0", "s_r.gone"):
        sessions.mark_broken(sid, "its checkpoint is damaged", SpillCorrupted, "alice")
    refusals = SharedRefusals(Garbled(held=set()), sessions)  # type: ignore[arg-type]
    await refusals.sweep(Slices())
    clock.now += 3.0
    assert await refusals.sweep(Slices()) == 1
    assert set(sessions.broken) == {"s_r.bad0"}
    assert "s_r.bad0" in caplog.text


async def test_a_tier_answer_that_cannot_be_read_is_logged_with_its_traceback_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before, each look (every 2 s) logged the whole traceback again until the session's TTL
    lapsed in the tier: a minute of one garbled session was 30 tracebacks. Now the first look
    logs it, later ones only at debug level; a session whose answer reads again and then fails
    once more is logged again."""

    class Garbled(_Tier):
        garbled = True

        def epoch_of(self, session_id: str) -> int:
            if self.garbled:
                raise ValueError("invalid literal for int() with base 10: b'x'")
            return super().epoch_of(session_id)

    clock = FakeClock()
    sessions = SessionStore(100, clock=clock, wall_clock=clock.wall)
    sessions.mark_broken("s_r.bad0", "its checkpoint is damaged", SpillCorrupted, "alice")
    tier = Garbled(held={"s_r.bad0"})
    refusals = SharedRefusals(tier, sessions)  # type: ignore[arg-type]
    caplog.set_level(logging.DEBUG, logger="service.engine.shared_refusals")

    async def sweeps(n: int) -> list[logging.LogRecord]:
        caplog.clear()
        for _ in range(n):
            clock.now += 3.0
            await refusals.sweep(Slices())
        return [r for r in caplog.records if r.levelno >= logging.ERROR]

    errors = await sweeps(20)
    assert len(errors) == 1 and errors[0].exc_info is not None
    assert len([r for r in caplog.records if r.levelno == logging.DEBUG]) == 18  # 19 looks
    tier.garbled = False
    assert await sweeps(2) == []  # read again: still held, still refused
    tier.garbled = True
    assert len(await sweeps(5)) == 1  # failing anew: logged anew
    assert set(sessions.broken) == {"s_r.bad0"}
