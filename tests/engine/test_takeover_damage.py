"""Damage in the shared state tier: a session whose journal in Redis holds a damaged record is
refused with DATA_LOSS when taken over (not brought back short of an acknowledged step), and
counted; the tier's other sessions are untouched."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

import pytest
import redis

from service.errors import DataLoss, SeqServeError, WrittenByNewer
from service.security import principal
from service.security.principal import Principal
from tests.newer_records import newer_frame, newer_spill

from .conftest import EngineFactory, toks


async def _two_sessions_three_steps(  # type: ignore[no-untyped-def]
    make_engine: EngineFactory, state_url: str, owner: str = ""
):
    """Two replicas on the tier; on the first, sessions `hurt` and `fine` three steps each
    (made by `owner`, with auth on, when one is named)."""
    if owner:
        principal.current.set(Principal(owner, "client"))
    a = await make_engine(state_url=state_url)
    b = await make_engine(state_url=state_url)
    hurt, _ = await a.create_session("tok", seed=1)
    fine, _ = await a.create_session("tok", seed=2)
    for k in range(3):
        await a.feed(hurt.session_id, toks(k + 1))
        await a.feed(fine.session_id, toks(k + 1))
    return a, b, hurt, fine


async def _not_found_but_to_alice(engine, session_id: str) -> None:  # type: ignore[no-untyped-def]
    """A stranger stepping or reading the session hears NOT_FOUND; alice, its owner, hears
    that a newer server wrote it."""
    principal.current.set(Principal("mallory", "client"))
    with pytest.raises(SeqServeError) as stepped:
        await engine.feed(session_id, toks(9))
    with pytest.raises(SeqServeError) as read:
        await engine.describe_session(session_id)
    assert stepped.value.reason == read.value.reason == "SESSION_NOT_FOUND"
    principal.current.set(Principal("alice", "client"))
    with pytest.raises(WrittenByNewer):
        await engine.feed(session_id, toks(9))


def _rewrite_last_record(state_url: str, session_id: str, change: Callable[[bytes], bytes]) -> None:
    """Replace the session's newest journal record in the tier with `change(record)`."""
    if state_url.startswith("sqlite:"):
        db = sqlite3.connect(state_url.removeprefix("sqlite:"))
        seq, record = db.execute(
            "SELECT seq, record FROM journal WHERE sid = ? ORDER BY seq DESC LIMIT 1",
            (session_id,),
        ).fetchone()
        db.execute("UPDATE journal SET record = ? WHERE seq = ?", (change(bytes(record)), seq))
        db.commit()
        db.close()
        return
    tier = redis.Redis.from_url(state_url)
    key = f"seqserve:j:{session_id}"
    tier.lset(key, -1, change(bytes(tier.lindex(key, -1))))  # type: ignore[arg-type]
    tier.close()


def _rewrite_checkpoint(state_url: str, session_id: str, change: Callable[[bytes], bytes]) -> None:
    """Replace the session's checkpoint in the tier with `change(checkpoint)`."""
    if state_url.startswith("sqlite:"):
        db = sqlite3.connect(state_url.removeprefix("sqlite:"))
        (data,) = db.execute("SELECT data FROM checkpoints WHERE sid = ?", (session_id,)).fetchone()
        db.execute(
            "UPDATE checkpoints SET data = ? WHERE sid = ?", (change(bytes(data)), session_id)
        )
        db.commit()
        db.close()
        return
    tier = redis.Redis.from_url(state_url)
    key = f"seqserve:c:{session_id}"
    tier.set(key, change(bytes(tier.get(key))))  # type: ignore[arg-type]
    tier.close()


def _flip_last_byte(record: bytes) -> bytes:
    """Its token's last byte: the checksum fails."""
    return record[:-1] + bytes([record[-1] ^ 0xFF])


async def test_a_damaged_record_in_the_tiers_journal_refuses_its_session_on_takeover(
    make_engine: EngineFactory, redis_url: str
) -> None:
    """hurt's last step's record is damaged in Redis (one byte flipped). Before, the takeover
    decoded the list as a segment: a whole last record failing its checksum was dropped as a
    power loss's unsynced write, and hurt came back a step short. In Redis every entry was
    written whole, and acknowledged: it is damage."""
    _holder, b, hurt, fine = await _two_sessions_three_steps(make_engine, redis_url)
    _rewrite_last_record(redis_url, hurt.session_id, _flip_last_byte)

    with pytest.raises(DataLoss) as err:
        await b.feed(hurt.session_id, toks(9))
    assert hurt.session_id in err.value.message and "damaged" in err.value.message
    with pytest.raises(DataLoss):  # and again: refused, not half taken
        await b.feed(hurt.session_id, toks(9))
    assert (await b.feed(fine.session_id, toks(9))).position == 4
    assert b.stats().journal_damaged_records == 1  # once, however often it is refused


async def test_a_damaged_checkpoint_in_the_tier_is_refused_and_counted_once(
    make_engine: EngineFactory, redis_url: str
) -> None:
    """A checkpoint in Redis with a flipped byte: the takeover (and GetSession's look, which
    does not take it) refuse the session with DATA_LOSS, counted once in
    `{kind="checkpoint"}` (before, a takeover through the tier counted no damaged checkpoint),
    and the tier's other sessions go on."""
    a = await make_engine(state_url=redis_url)
    b = await make_engine(state_url=redis_url)
    hurt, _ = await a.create_session("tok", seed=1)
    fine, _ = await a.create_session("tok", seed=2)
    for session in (hurt, fine):
        await a.feed(session.session_id, toks(1))
    assert await a.idle_checkpoints.sweep(0.0) == 2  # both checkpointed in the tier
    tier = redis.Redis.from_url(redis_url)
    key = f"seqserve:c:{hurt.session_id}"
    checkpoint = bytearray(tier.get(key))  # type: ignore[arg-type]
    checkpoint[-1] ^= 0xFF  # the state's last byte: the record's checksum fails
    tier.set(key, bytes(checkpoint))
    tier.close()

    for _ in range(2):  # refused, and again
        with pytest.raises(DataLoss):
            await b.feed(hurt.session_id, toks(9))
    with pytest.raises(DataLoss):
        await b.describe_session(hurt.session_id)
    assert (await b.feed(fine.session_id, toks(9))).position == 2
    assert b.stats().damaged_checkpoints == 1


async def test_a_damaged_session_taken_by_its_owner_fences_the_replica_that_held_it(
    make_engine: EngineFactory, state_url: str
) -> None:
    """With auth on, a takeover first looks whose the session is; that look found the damage
    and refused it before the claim, so the replica that held it was never fenced: it went on
    applying alice's steps (position 4) while the other refused the session for good. Now
    the owner's takeover claims it before refusing it, and the holder writes nothing more. A
    stranger's request claims nothing (NOT_FOUND, the holder untouched)."""
    a = await make_engine(state_url=state_url)
    b = await make_engine(state_url=state_url)
    principal.current.set(Principal("alice", "client"))
    made, _ = await a.create_session("tok", seed=1)
    for k in range(3):
        await a.feed(made.session_id, toks(k + 1))
    _rewrite_last_record(state_url, made.session_id, _flip_last_byte)

    principal.current.set(Principal("mallory", "client"))
    with pytest.raises(SeqServeError) as stranger:
        await b.feed(made.session_id, toks(9))
    assert stranger.value.reason == "SESSION_NOT_FOUND"
    principal.current.set(Principal("alice", "client"))
    with pytest.raises(DataLoss):
        await b.feed(made.session_id, toks(9))
    with pytest.raises(SeqServeError):  # fenced: the holder's copy is stale now
        await a.feed(made.session_id, toks(9))


async def test_a_record_a_newer_server_wrote_refuses_the_takeover_and_keeps_the_session(
    make_engine: EngineFactory, redis_url: str
) -> None:
    """A rolling upgrade: the session's last record in Redis was written by a newer seqserve
    (its version byte, its checksum good). It was skipped, and where it stood last nothing
    showed it: the session came back a step short, silently. Now this replica refuses the
    takeover (FAILED_PRECONDITION, VERSION_UNAVAILABLE) and leaves the session as it is; nothing
    is counted as damage, and the tier's other sessions go on."""
    _holder, b, newer, fine = await _two_sessions_three_steps(make_engine, redis_url)
    _rewrite_last_record(redis_url, newer.session_id, newer_frame)

    for _ in range(2):
        with pytest.raises(WrittenByNewer, match="newer seqserve"):
            await b.feed(newer.session_id, toks(9))
    assert (await b.feed(fine.session_id, toks(9))).position == 4
    assert b.stats().journal_damaged_records == 0
    assert newer.session_id not in b.sessions.broken  # not refused for good here


async def test_a_stranger_hears_not_found_for_a_session_a_newer_server_wrote(
    make_engine: EngineFactory, redis_url: str
) -> None:
    """With auth on, the refusal of a newer server's record is the owner's to hear: a stranger
    naming the session, to step it or to read it, gets NOT_FOUND as for any session not its
    own (it got FAILED_PRECONDITION naming the session)."""
    _holder, b, newer, _fine = await _two_sessions_three_steps(make_engine, redis_url, "alice")
    _rewrite_last_record(redis_url, newer.session_id, newer_frame)
    await _not_found_but_to_alice(b, newer.session_id)


async def test_a_checkpoint_a_newer_server_wrote_refuses_the_takeover_and_is_not_damage(
    make_engine: EngineFactory, state_url: str
) -> None:
    """A rolling upgrade: the session's checkpoint in the tier is of a newer format (its magic's
    version byte above this server's, its sha256 good). It was read as not a spill record:
    DATA_LOSS, counted as a damaged checkpoint, and the session refused for good here. Now the
    takeover is refused as for a newer server's journal record (FAILED_PRECONDITION,
    VERSION_UNAVAILABLE), on Redis and on SQLite; nothing is counted as damage, and the tier's
    other sessions go on. (A checkpoint whose checksum fails is still damage: the test above.)"""
    _holder, b, newer, fine = await _two_sessions_three_steps(make_engine, state_url)
    assert await _holder.idle_checkpoints.sweep(0.0) == 2  # both checkpointed in the tier
    _rewrite_checkpoint(state_url, newer.session_id, newer_spill)

    for _ in range(2):
        with pytest.raises(WrittenByNewer, match=r"checkpoint .* newer seqserve") as err:
            await b.feed(newer.session_id, toks(9))
        assert err.value.reason == "VERSION_UNAVAILABLE"
    with pytest.raises(WrittenByNewer):
        await b.describe_session(newer.session_id)
    assert (await b.feed(fine.session_id, toks(9))).position == 4
    assert b.stats().damaged_checkpoints == 0
    assert newer.session_id not in b.sessions.broken  # not refused for good here


async def test_a_stranger_hears_not_found_for_a_checkpoint_a_newer_server_wrote(
    make_engine: EngineFactory, state_url: str
) -> None:
    """With auth on, whose the session is comes from the newer checkpoint's owner block (kept
    by every version after 2): a stranger, stepping or reading, hears NOT_FOUND; the owner
    hears FAILED_PRECONDITION."""
    holder, b, newer, _fine = await _two_sessions_three_steps(make_engine, state_url, "alice")
    assert await holder.idle_checkpoints.sweep(0.0) == 2
    _rewrite_checkpoint(state_url, newer.session_id, newer_spill)
    await _not_found_but_to_alice(b, newer.session_id)
    assert b.stats().damaged_checkpoints == 0


async def test_a_refused_session_is_not_claimed_again_at_each_request(
    make_engine: EngineFactory, state_url: str
) -> None:
    """Once a replica refused a damaged session, its owner's further requests are answered
    from that: before, each one claimed the session in the tier again (a write, and a read of
    all its records) only to refuse it again, and each GetSession read all its records."""
    _holder, b, hurt, fine = await _two_sessions_three_steps(make_engine, state_url)
    _rewrite_last_record(state_url, hurt.session_id, _flip_last_byte)
    state = b.takeover._state
    assert state is not None
    claims: list[str] = []
    claim = state.claim

    def counted(session_id: str):  # type: ignore[no-untyped-def]
        claims.append(session_id)
        return claim(session_id)

    state.claim = counted  # type: ignore[method-assign]
    peek = state.peek
    peeks: list[str] = []

    def peeked(session_id: str):  # type: ignore[no-untyped-def]
        peeks.append(session_id)
        return peek(session_id)

    state.peek = peeked  # type: ignore[method-assign]
    for _ in range(3):
        with pytest.raises(DataLoss):
            await b.feed(hurt.session_id, toks(9))
        with pytest.raises(DataLoss):
            await b.describe_session(hurt.session_id)
    assert claims == [hurt.session_id]
    assert peeks == []  # a read of all its records, each GetSession
    assert (await b.feed(fine.session_id, toks(9))).position == 4
