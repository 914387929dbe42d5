"""Damage in the shared state tier: a session whose journal in Redis holds a damaged record is
refused with DATA_LOSS when taken over (not brought back short of an acknowledged step), and
counted; the tier's other sessions are untouched."""

from __future__ import annotations

import pytest
import redis

from service.errors import DataLoss

from .conftest import EngineFactory, toks


async def test_a_damaged_record_in_the_tiers_journal_refuses_its_session_on_takeover(
    make_engine: EngineFactory, redis_url: str
) -> None:
    """hurt's last step's record is damaged in Redis (one byte flipped). Before, the takeover
    decoded the list as a segment: a whole last record failing its checksum was dropped as a
    power loss's unsynced write, and hurt came back a step short. In Redis every entry was
    written whole, and acknowledged: it is damage."""
    a = await make_engine(state_url=redis_url)
    b = await make_engine(state_url=redis_url)
    hurt, _ = await a.create_session("tok", seed=1)
    fine, _ = await a.create_session("tok", seed=2)
    for k in range(3):
        await a.feed(hurt.session_id, toks(k + 1))
        await a.feed(fine.session_id, toks(k + 1))
    tier = redis.Redis.from_url(redis_url)
    key = f"seqserve:j:{hurt.session_id}"
    entry = bytearray(tier.lindex(key, -1))  # type: ignore[arg-type]
    entry[-1] ^= 0xFF  # its token's last byte: the checksum fails
    tier.lset(key, -1, bytes(entry))
    tier.close()

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
