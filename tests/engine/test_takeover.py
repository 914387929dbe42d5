"""Sessions in the shared state tier — a real redis-server, and the SQLite file the workers of
`serve --workers` share — in process: two engines stand for two replicas. A session stepped
through either is one session: the other takes it over (its epoch fences the first), every
acknowledged step is there once, the next prediction and the random stream continue as if never
moved; GetSession reads without moving."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import redis

from benchmarks.real_services import RedisServer
from service.engine.feed import Feed, FeedOutcome, PredictionOptions
from service.engine.session_engine import SessionEngine
from service.engine.session_line import Line
from service.errors import (
    FailedPrecondition,
    InvalidArgument,
    QuotaExceeded,
    SeqServeError,
    SessionClosed,
    SessionExpired,
    SessionMoved,
    SessionNotFound,
    StateTierUnusable,
    Unavailable,
)
from service.registry.store import ModelStore
from service.runtime.sampler import SamplingParams
from service.security import principal
from service.security.principal import Principal
from service.sessions.shared_tier import Write

from .conftest import TOK, EngineFactory, close, crash, publish, same, slow_steps, toks

SAMPLING = SamplingParams(temperature=1.0, max_tokens=4)


async def _replicas(make_engine: EngineFactory, url: str) -> tuple[SessionEngine, SessionEngine]:
    return await make_engine(state_url=url), await make_engine(state_url=url)


async def test_a_session_moves_between_replicas_and_stays_one_session(
    make_engine: EngineFactory, state_url: str
) -> None:
    a, b = await _replicas(make_engine, state_url)
    roomy = await make_engine(durability="shutdown")
    s, _ = await a.create_session("tok", seed=3)
    ref, _ = await roomy.create_session("tok", seed=3)
    sid, rid = s.session_id, ref.session_id
    await a.feed(sid, toks(1, 2, 3))
    await roomy.feed(rid, toks(1, 2, 3))
    got = [t.token_id async for t in a.generate(sid, sampling=SAMPLING)]
    assert got == [t.token_id async for t in roomy.generate(rid, sampling=SAMPLING)]

    moved, want = await b.feed(sid, toks(4)), await roomy.feed(rid, toks(4))  # takes it over
    assert moved.position == want.position == 8 and close(moved.prediction, want.prediction)
    with pytest.raises(SessionMoved):  # a's copy is fenced: refused, nothing applied
        await a.feed(sid, toks(5))
    back, want = await a.feed(sid, toks(5)), await roomy.feed(rid, toks(5))  # the retry
    assert back.position == want.position == 9 and close(back.prediction, want.prediction)
    with pytest.raises(SessionMoved):  # b's copy is stale now: its first write is refused
        _ = [t async for t in b.generate(sid, sampling=SAMPLING)]
    got = [t.token_id async for t in b.generate(sid, sampling=SAMPLING)]  # retried: taken back
    assert got == [t.token_id async for t in roomy.generate(rid, sampling=SAMPLING)]


async def test_a_session_moved_after_one_token_steps_goes_on_bit_for_bit(
    make_engine: EngineFactory, state_url: str
) -> None:
    """A takeover replays the journal each step through the kernel its live step ran (one
    token: the fused one-row step), so a session moved between replicas predicts bit for bit
    what one never moved does, and a retry of its last Step gets the original reply."""
    a, b = await _replicas(make_engine, state_url)
    roomy = await make_engine(durability="shutdown")
    s, _ = await a.create_session("tok", seed=3)
    ref, _ = await roomy.create_session("tok", seed=3)
    sid, rid = s.session_id, ref.session_id
    options = PredictionOptions(top_k=5)

    async def step(replica: SessionEngine, token: int, k: int) -> FeedOutcome:
        try:
            return await replica.feed(
                sid, toks(token), options, expected_position=k, request_id=f"r{k}"
            )
        except SessionMoved:  # a stale copy's first write is refused; the retry takes it back
            return await replica.feed(
                sid, toks(token), options, expected_position=k, request_id=f"r{k}"
            )

    moves = [a, a, b, b, a, b]  # the replica each Step reaches
    for k, (replica, token) in enumerate(zip(moves, [65, 67, 68, 69, 70, 71], strict=True)):
        got = await step(replica, token, k)
        want = await roomy.feed(rid, toks(token), options)
        assert got.position == want.position == k + 1
        assert same(got.prediction, want.prediction), (k, got.prediction, want.prediction)
    retried = await step(a, 71, 5)  # the retry of b's last Step, on a
    assert retried.position == 6 and same(retried.prediction, got.prediction)


async def test_a_replica_killed_loses_no_acknowledged_step(
    make_engine: EngineFactory, state_url: str
) -> None:
    a, b = await _replicas(make_engine, state_url)
    roomy = await make_engine(durability="shutdown")
    pairs = []
    for i in range(6):
        s, _ = await a.create_session("tok", seed=i)
        r, _ = await roomy.create_session("tok", seed=i)
        for k in range(1 + i % 3):
            await a.feed(s.session_id, toks(i, k))
            await roomy.feed(r.session_id, toks(i, k))
        pairs.append((s.session_id, r.session_id))
    await crash(a)
    for sid, rid in pairs:
        got, want = await b.feed(sid, toks(9)), await roomy.feed(rid, toks(9))
        assert got.position == want.position and close(got.prediction, want.prediction), sid


async def test_a_stale_copy_never_answers_failed_precondition(
    make_engine: EngineFactory, state_url: str
) -> None:
    """b takes the session over; a (which has not written it since) is asked for the new
    position: it learns from the tier that its copy is stale and takes the session back."""
    a, b = await _replicas(make_engine, state_url)
    roomy = await make_engine(durability="shutdown")
    s, _ = await a.create_session("tok", seed=5)
    r, _ = await roomy.create_session("tok", seed=5)
    for engine, sid in ((a, s.session_id), (roomy, r.session_id)):
        await engine.feed(sid, toks(1), expected_position=0)
    await b.feed(s.session_id, toks(2), expected_position=1)
    await roomy.feed(r.session_id, toks(2), expected_position=1)
    got = await a.feed(s.session_id, toks(3), expected_position=2)
    want = await roomy.feed(r.session_id, toks(3), expected_position=2)
    assert got.position == want.position == 3 and close(got.prediction, want.prediction)
    with pytest.raises(FailedPrecondition):  # a real mismatch still is one
        await a.feed(s.session_id, toks(4), expected_position=7)


async def test_get_session_reads_without_moving_and_ends_are_seen_everywhere(
    make_engine: EngineFactory, state_url: str
) -> None:
    a, b = await _replicas(make_engine, state_url)
    s, _ = await a.create_session("tok")
    await a.feed(s.session_id, toks(1, 2))
    seen = await b.describe_session(s.session_id)
    assert seen.position == 2 and b.sessions.peek(s.session_id) is None
    assert (await a.feed(s.session_id, toks(3))).position == 3  # still a's: not fenced
    await a.close_session(s.session_id)
    with pytest.raises(SessionClosed):
        await b.feed(s.session_id, toks(4))
    with pytest.raises(SessionNotFound):
        await b.feed("s_nobody.nothing", toks(4))


async def test_a_tier_that_would_lose_sessions_stops_the_start(
    make_engine: EngineFactory, redis_url: str
) -> None:
    client = redis.Redis.from_url(redis_url)
    client.config_set("maxmemory-policy", "allkeys-lru")
    try:
        with pytest.raises(StateTierUnusable) as err:
            await make_engine(state_url=redis_url)
        assert "noeviction" in err.value.message
    finally:
        client.config_set("maxmemory-policy", "noeviction")
    with pytest.raises(StateTierUnusable) as err:
        await make_engine(state_url="redis://127.0.0.1:1/0")
    assert "unreachable" in err.value.message


async def test_a_fork_lives_in_the_tier_and_moves_like_any_session(
    make_engine: EngineFactory, state_url: str
) -> None:
    a, b = await _replicas(make_engine, state_url)
    roomy = await make_engine(durability="shutdown")
    s, _ = await a.create_session("tok", seed=1)
    r, _ = await roomy.create_session("tok", seed=1)
    await a.feed(s.session_id, toks(1, 2, 3))
    await roomy.feed(r.session_id, toks(1, 2, 3))
    child = await a.fork_session(s.session_id)  # its first checkpoint makes it in the tier
    ref_child = await roomy.fork_session(r.session_id)
    got, want = (
        await b.feed(child.session_id, toks(4)),
        await roomy.feed(ref_child.session_id, toks(4)),
    )
    assert got.position == want.position == 4 and close(got.prediction, want.prediction)


async def _retried(call):  # type: ignore[no-untyped-def]
    """What a client does: once more after UNAVAILABLE (a stale copy was dropped)."""
    try:
        return await call()
    except SessionMoved:
        return await call()


async def test_a_stale_spilled_copy_is_dropped_not_data_loss(
    make_engine: EngineFactory, state_url: str
) -> None:
    """a spilled the session; b took it over and checkpointed past a's checkpoint: a's restore
    finds the tier's epoch is not its own and answers UNAVAILABLE, and the retry is exact."""
    a = await make_engine(state_url=state_url)
    b = await make_engine(state_url=state_url, checkpoint_steps=1)
    roomy = await make_engine(durability="shutdown")
    s, _ = await a.create_session("tok", seed=1)
    r, _ = await roomy.create_session("tok", seed=1)
    await a.feed(s.session_id, toks(1, 2, 3))
    await roomy.feed(r.session_id, toks(1, 2, 3))
    a.residency.spill(a.sessions.get(s.session_id))
    await b.feed(s.session_id, toks(4))
    await roomy.feed(r.session_id, toks(4))
    got = await _retried(lambda: a.feed(s.session_id, toks(5)))
    want = await roomy.feed(r.session_id, toks(5))
    assert got.position == want.position == 5 and close(got.prediction, want.prediction)


async def test_a_retry_reaching_a_stale_copy_gets_the_original_reply(
    make_engine: EngineFactory, state_url: str
) -> None:
    a, b = await _replicas(make_engine, state_url)
    s, _ = await a.create_session("tok", seed=1)
    sid = s.session_id
    await a.feed(sid, toks(1), expected_position=0, request_id="r0")
    await b.feed(sid, toks(2), expected_position=1, request_id="r1")
    first = await b.feed(sid, toks(3), expected_position=2, request_id="r2")  # reply lost
    again = await _retried(lambda: a.feed(sid, toks(3), expected_position=2, request_id="r2"))
    assert again.position == first.position == 3 and close(again.prediction, first.prediction)
    assert (await a.describe_session(sid)).position == 3  # nothing applied twice


async def test_one_fenced_session_fails_only_its_own_row(
    make_engine: EngineFactory, state_url: str
) -> None:
    a, b = await _replicas(make_engine, state_url)
    x, _ = await a.create_session("tok", seed=1)
    y, _ = await a.create_session("tok", seed=2)
    await a.feed(x.session_id, toks(1))
    await a.feed(y.session_id, toks(1))
    await b.feed(x.session_id, toks(2))  # b takes x over; a does not know yet
    out = await a.feed_many([Feed(x.session_id, toks(3)), Feed(y.session_id, toks(3))])
    assert isinstance(out[0], SessionMoved)
    assert not isinstance(out[1], SeqServeError) and out[1].position == 2


async def test_a_replay_fenced_by_a_takeover_leaves_nothing_pending(
    make_engine: EngineFactory, state_url: str
) -> None:
    c = await make_engine(state_url=state_url)
    a = await make_engine(state_url=state_url)
    b = await make_engine(state_url=state_url)
    x, _ = await c.create_session("tok", seed=1, ttl_seconds=60)
    await c.feed(x.session_id, toks(1, 2))
    await a.takeover.ensure(x.session_id)  # a takes it: its replay pending
    await b.takeover.ensure(x.session_id)  # b takes it before a's replay writes
    with pytest.raises(SessionMoved):
        await a.feed(x.session_id, toks(3))  # a's replay write is refused: a lets go
    assert len(a.leases.replays) == 0 and a.sessions.peek(x.session_id) is None
    assert a.versions.pinned("tok", 1) == 0
    got = await a.feed(x.session_id, toks(3))  # the retry takes it back
    assert got.position == 3


async def test_an_alias_flip_during_a_takeover_keeps_the_session_on_its_version(
    make_engine: EngineFactory, state_url: str, store_root: Path
) -> None:
    """Both replicas read one store. The alias moves to a new version set through a's store;
    b sees it at its next poll: new sessions there get the new version, while a session a made
    on the old one, taken over by b, loads and runs the old one (exactly)."""
    store = ModelStore(store_root)
    store.set_alias("tok", "production", 1)
    a, b = await _replicas(make_engine, state_url)
    roomy = await make_engine(durability="shutdown")
    s, _ = await a.create_session("tok", "production")
    r, _ = await roomy.create_session("tok", "1", seed=s.seed)
    assert s.version == 1
    await a.feed(s.session_id, toks(1, 2))
    await roomy.feed(r.session_id, toks(1, 2))
    new = publish(store, "tok", TOK, seed=99)
    store.set_alias("tok", "production", new)  # on the shared store, as a's registry would
    await b.watcher.poll()
    fresh, _ = await b.create_session("tok", "production")
    assert fresh.version == new
    got = await b.feed(s.session_id, toks(3))  # taken over mid-flip
    want = await roomy.feed(r.session_id, toks(3))
    assert b.get_session(s.session_id).version == 1
    assert got.position == want.position == 3 and close(got.prediction, want.prediction)


async def test_a_session_whose_version_left_the_store_is_failed_precondition_on_takeover(
    make_engine: EngineFactory, state_url: str, store_root: Path
) -> None:
    a, b = await _replicas(make_engine, state_url)
    store = ModelStore(store_root)
    two = publish(store, "tok", TOK, seed=5)
    s, _ = await a.create_session("tok", str(two))
    await a.feed(s.session_id, toks(1))
    shutil.rmtree(store_root / "tok" / str(two))  # gone while a still holds the session
    with pytest.raises(FailedPrecondition) as err:
        await asyncio.wait_for(b.feed(s.session_id, toks(2)), 30)  # an answer, not a hang
    assert f"tok:{two}" in err.value.message


async def test_create_and_fork_retries_reaching_another_replica_make_nothing_twice(
    make_engine: EngineFactory, state_url: str
) -> None:
    a, b = await _replicas(make_engine, state_url)
    options = PredictionOptions(top_k=4)
    made, outcome = await a.create_session(
        "tok", prefix=toks(1, 2), options=options, request_id="c"
    )
    child = await a.fork_session(made.session_id, request_id="f")
    await crash(a)  # the replies were lost with it: the client retries elsewhere
    again, again_outcome = await b.create_session(
        "tok", prefix=toks(1, 2), options=options, request_id="c"
    )
    assert again.session_id == made.session_id and again.position == 2
    assert outcome is not None and again_outcome is not None
    assert close(again_outcome.prediction, outcome.prediction)
    forked = await b.fork_session(made.session_id, request_id="f")
    assert forked.session_id == child.session_id
    assert len(b.sessions) == 2


async def test_quotas_hold_across_replicas(make_engine: EngineFactory, state_url: str) -> None:
    """A principal's live sessions and its tokens per second are counted in the tier: what it
    has on one replica counts on the other."""
    limits = {"sessions_per_principal": 2, "tokens_per_second": 10}
    a = await make_engine(state_url=state_url, security=limits)
    b = await make_engine(state_url=state_url, security=limits)
    principal.current.set(Principal("alice", "client"))
    first, _ = await a.create_session("tok")
    await b.create_session("tok")
    with pytest.raises(QuotaExceeded) as err:
        await a.create_session("tok")  # two already, one on each replica
    assert err.value.retry_after is not None
    await b.close_session(first.session_id)  # a's session, closed through b
    third, _ = await a.create_session("tok")

    await a.feed(third.session_id, toks(*range(50)))  # five seconds' worth, on a
    # A second's worth next: refused unless 5 s passed between the two, b's takeover of the
    # session included (with only a second's worth fed first, 0.1 s of refill let one token
    # through on a loaded host).
    with pytest.raises(QuotaExceeded) as err:
        await b.feed(third.session_id, toks(*range(10)))  # b sees the same bucket
    assert err.value.retry_after is not None and 0 < err.value.retry_after <= 5.1
    principal.current.set(Principal("bob", "client"))
    other, _ = await b.create_session("tok")
    assert (await b.feed(other.session_id, toks(1))).position == 1  # bob's own share


async def test_a_refused_request_is_given_its_charge_back_in_the_tier(
    make_engine: EngineFactory, state_url: str
) -> None:
    """Eight seconds' worth, refused: kept, the charge would refuse the next step on either
    replica for seven seconds. Applied, it does: unless 7 s pass, the applied feed's own step
    and a's takeover included."""
    limits = {"tokens_per_second": 500}
    a = await make_engine(state_url=state_url, security=limits)
    b = await make_engine(state_url=state_url, security=limits)
    principal.current.set(Principal("alice", "client"))
    s, _ = await a.create_session("tok")
    with pytest.raises(SessionNotFound):
        await a.feed("no-such-session", toks(*([1] * 4000)))
    assert (await b.feed(s.session_id, toks(1))).position == 1
    await asyncio.sleep(0.01)
    await b.feed(s.session_id, toks(*([1] * 4000)))  # applied: the charge stays
    with pytest.raises(QuotaExceeded):
        await a.feed(s.session_id, toks(1))


async def test_another_principal_neither_sees_nor_moves_a_session(
    make_engine: EngineFactory, state_url: str
) -> None:
    """Ownership is checked before a takeover: bob probing alice's id through the other replica
    gets NOT_FOUND, and the session stays where it was (alice's next step is not fenced)."""
    a, b = await _replicas(make_engine, state_url)
    principal.current.set(Principal("alice", "client"))
    s, _ = await a.create_session("tok")
    await a.feed(s.session_id, toks(1))
    principal.current.set(Principal("bob", "client"))
    with pytest.raises(SessionNotFound):
        await b.feed(s.session_id, toks(2))
    with pytest.raises(SessionNotFound):
        await b.describe_session(s.session_id)
    assert b.sessions.peek(s.session_id) is None
    principal.current.set(Principal("alice", "client"))
    assert (await a.feed(s.session_id, toks(2))).position == 2  # still a's: not fenced
    assert (await b.feed(s.session_id, toks(3))).position == 3  # alice may move it


async def test_an_ended_session_is_told_only_to_its_owner_on_another_replica(
    make_engine: EngineFactory, state_url: str
) -> None:
    a, b = await _replicas(make_engine, state_url)
    principal.current.set(Principal("alice", "client"))
    s, _ = await a.create_session("tok")
    await a.close_session(s.session_id)
    principal.current.set(Principal("bob", "client"))
    with pytest.raises(SessionNotFound):  # not "was closed": bob never learns it existed
        await b.feed(s.session_id, toks(1))
    principal.current.set(Principal("alice", "client"))
    with pytest.raises(SessionClosed):
        await b.feed(s.session_id, toks(1))


async def test_a_burst_of_creates_does_not_pass_the_session_cap(
    make_engine: EngineFactory,
) -> None:
    engine = await make_engine(security={"sessions_per_principal": 1})
    principal.current.set(Principal("alice", "client"))
    made = await asyncio.gather(
        *(engine.create_session("tok") for _ in range(8)), return_exceptions=True
    )
    assert sum(not isinstance(m, BaseException) for m in made) == 1
    assert all(isinstance(m, QuotaExceeded) for m in made if isinstance(m, BaseException))


async def test_generations_and_prefixes_are_charged_their_real_size(
    make_engine: EngineFactory,
) -> None:
    engine = await make_engine(security={"tokens_per_second": 2})
    principal.current.set(Principal("alice", "client"))
    s, _ = await engine.create_session("tok")
    _ = [t async for t in engine.generate(s.session_id)]  # the session default: 16 tokens
    # In debt after those 16 (14 below empty): refused unless 7.5 s passed since the charge.
    with pytest.raises(QuotaExceeded):
        await engine.feed(s.session_id, toks(1))
    principal.current.set(Principal("bob", "client"))
    await engine.create_session("tok", prefix=toks(*range(50)))  # a full bucket allows it
    with pytest.raises(QuotaExceeded):
        await engine.create_session("tok", prefix=toks(1))


async def test_a_fork_on_a_stale_copy_forks_the_state_the_tier_holds(
    make_engine: EngineFactory, state_url: str
) -> None:
    """b moved the session on since a last wrote it; a fork through a checks a's copy against
    the tier first and takes the session back: the child starts at b's position and state."""
    a, b = await _replicas(make_engine, state_url)
    roomy = await make_engine(durability="shutdown")
    s, _ = await a.create_session("tok", seed=2)
    r, _ = await roomy.create_session("tok", seed=2)
    for engine, sid in ((a, s.session_id), (roomy, r.session_id)):
        await engine.feed(sid, toks(1, 2))
    await b.feed(s.session_id, toks(3, 4))
    await roomy.feed(r.session_id, toks(3, 4))
    child = await a.fork_session(s.session_id)
    ref_child = await roomy.fork_session(r.session_id)
    assert child.position == ref_child.position == 4
    got, want = (
        await a.feed(child.session_id, toks(5)),
        await roomy.feed(ref_child.session_id, toks(5)),
    )
    assert got.position == want.position == 5 and close(got.prediction, want.prediction)


async def test_a_session_only_forked_stays_alive_in_the_tier(
    make_engine: EngineFactory, state_url: str
) -> None:
    """A template forked per request writes nothing of itself: each fork restarts its TTL in
    the tier as a write would, so the tier keeps it as long as its holder does."""
    a, b = await _replicas(make_engine, state_url)
    ttl = 2.0
    s, _ = await a.create_session("tok", seed=1, ttl_seconds=ttl)
    await a.feed(s.session_id, toks(1, 2))
    written = time.monotonic()
    # Forks only, 0.1 s apart, for one and a half TTLs after its last write. A loaded host's
    # stall between two forks is taken out of the TTL: up to some 1.8 s is fine (with forks
    # 0.4 s apart and a 1 s TTL, a 0.6 s stall let it lapse).
    while time.monotonic() - written < 1.5 * ttl:
        await asyncio.sleep(0.1)
        child = await a.fork_session(s.session_id)
        await a.close_session(child.session_id)
    assert (await b.describe_session(s.session_id)).position == 2  # still in the tier
    assert (await a.feed(s.session_id, toks(3))).position == 3


def _lapse_in_tier(state_url: str, session_id: str) -> None:
    """What a TTL lapsed in the tier leaves of a session: neither its record nor a tombstone."""
    if state_url.startswith("redis"):
        redis.Redis.from_url(state_url).delete(*(f"seqserve:{k}:{session_id}" for k in "hjc"))
        return
    db = sqlite3.connect(state_url.removeprefix("sqlite:"))
    with db:
        for table in ("holders", "checkpoints", "journal"):
            db.execute(f"DELETE FROM {table} WHERE sid = ?", (session_id,))
    db.close()


async def test_a_session_gone_from_the_tier_is_expired_not_moved(
    make_engine: EngineFactory, state_url: str
) -> None:
    """No record and no tombstone in the tier: nobody holds the session, so a replica that let
    its copy go answers NOT_FOUND (expired), every time — not UNAVAILABLE "retry" forever."""
    a, b = await _replicas(make_engine, state_url)
    held, _ = await a.create_session("tok")  # a holds it when it lapses
    moved, _ = await a.create_session("tok")  # b took it over; a's copy is stale
    await a.feed(held.session_id, toks(1))
    await a.feed(moved.session_id, toks(1))
    await b.feed(moved.session_id, toks(2))
    _lapse_in_tier(state_url, held.session_id)
    _lapse_in_tier(state_url, moved.session_id)
    with pytest.raises(SessionExpired):  # the refused write, then the client's retry
        await _retried(lambda: a.feed(held.session_id, toks(2)))
    with pytest.raises(SessionExpired):  # a asks the tier (another position) and learns it
        await a.feed(moved.session_id, toks(3), expected_position=2)
    for sid in (held.session_id, moved.session_id):
        with pytest.raises(SessionExpired):
            await a.feed(sid, toks(4))


async def test_a_session_refused_for_its_version_is_not_closed_where_it_cannot_be(
    make_engine: EngineFactory, state_url: str, store_root: Path
) -> None:
    """b cannot load the session's version: closing it there is FAILED_PRECONDITION naming
    the version, every time, not UNAVAILABLE (its END, fenced by the epoch of a replica that
    holds the session, was refused, and each retry took the session over again, for ever). A
    replica that can load the version closes it."""
    a, b = await _replicas(make_engine, state_url)
    s, _ = await a.create_session("tok")
    await a.feed(s.session_id, toks(1, 2))
    away = store_root.parent / "tok-1-away"
    (store_root / "tok" / "1").rename(away)
    for _ in range(2):
        with pytest.raises(FailedPrecondition) as err:
            await asyncio.wait_for(b.close_session(s.session_id), 30)
        assert "tok:1" in err.value.message
    away.rename(store_root / "tok" / "1")
    assert (await _retried(lambda: a.feed(s.session_id, toks(3)))).position == 3
    await a.close_session(s.session_id)
    with pytest.raises(SessionClosed):
        await a.feed(s.session_id, toks(4))


async def test_a_step_the_tier_did_not_answer_in_time_is_applied_once(
    make_engine: EngineFactory, redis_server: RedisServer, redis_url: str
) -> None:
    """Redis frozen (SIGSTOP) while a step is written: after the client's 2 s the step is
    refused UNAVAILABLE, and Redis, woken, runs the write it had queued. Before, the replica's
    copy stayed a step behind the tier: another input at the same position was applied too,
    and the tier's journal held two steps at one position (a takeover refused the session,
    DATA_LOSS). Now the copy is taken over again from the tier at its next request: the other
    input is a position mismatch, the retry with the same request id gets the step's reply,
    and another replica takes the session over where the client left it."""
    a, b = await _replicas(make_engine, redis_url)
    roomy = await make_engine(durability="shutdown")
    s, _ = await a.create_session("tok", seed=2)
    r, _ = await roomy.create_session("tok", seed=2)
    sid = s.session_id
    await a.feed(sid, toks(1), expected_position=0, request_id="r0")
    await roomy.feed(r.session_id, toks(1))
    tier = redis.Redis.from_url(redis_url)
    journal = f"seqserve:j:{sid}"
    before = tier.llen(journal)
    assert redis_server.proc is not None
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        with pytest.raises(Unavailable, match="may or may not have been applied"):
            await a.feed(sid, toks(2), expected_position=1, request_id="r1")
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    assert tier.llen(journal) == before + 1  # woken, Redis ran the queued write
    with pytest.raises(FailedPrecondition):  # not a second step at position 1
        await a.feed(sid, toks(9), expected_position=1, request_id="other")
    again = await a.feed(sid, toks(2), expected_position=1, request_id="r1")  # the retry
    want = await roomy.feed(r.session_id, toks(2))
    assert again.position == want.position == 2 and close(again.prediction, want.prediction)
    got, want = (
        await b.feed(sid, toks(3), expected_position=2),
        await roomy.feed(r.session_id, toks(3)),
    )
    assert got.position == want.position == 3 and close(got.prediction, want.prediction)
    tier.close()


async def test_a_create_retried_on_another_replica_with_a_new_prefix_is_refused(
    make_engine: EngineFactory, state_url: str
) -> None:
    """The first call carried no prefix; its retry, reaching another replica, adds one. That
    replica takes the session over from its creation record in the tier, which says so: the
    retry is refused, and the session is left as it was. Before, the prefix was fed."""
    a, b = await _replicas(make_engine, state_url)
    made, _ = await a.create_session("tok", request_id="c1")
    with pytest.raises(InvalidArgument, match="was used for a create without a prefix"):
        await b.create_session("tok", prefix=toks(1, 2), request_id="c1")
    again, outcome = await b.create_session("tok", request_id="c1")
    assert again.session_id == made.session_id and again.position == 0 and outcome is None


async def test_a_create_the_tier_did_not_answer_in_time_gets_its_prefix_once_on_retry(
    make_engine: EngineFactory, redis_server: RedisServer, redis_url: str
) -> None:
    """Redis frozen (SIGSTOP) while a create with a prefix writes its session: after the
    client's 2 s the create is refused UNAVAILABLE before its prefix ran, and Redis, woken,
    runs the write it had queued, so the session exists in the tier at position 0. Before,
    the retry with the same request id found it and returned it as made, at position 0 with
    no prediction: the prefix was never applied. Now the retry applies the prefix, once, and
    answers what the first call would have; a second retry gets the same reply."""
    a, b = await _replicas(make_engine, redis_url)
    roomy = await make_engine(durability="shutdown")
    options = PredictionOptions(top_k=4)
    want_session, want = await roomy.create_session(
        "tok", seed=2, prefix=toks(1, 2, 3), options=options
    )
    assert want is not None
    await a.create_session("tok")  # Redis has the scripts (a frozen EVALSHA's would be lost)
    tier = redis.Redis.from_url(redis_url)
    state = a.takeover._state
    assert state is not None and redis_server.proc is not None
    pid, append = redis_server.proc.pid, state.append

    def frozen_at_create(writes: list[Write]) -> list[str]:  # after the request id's lookup
        if writes[0].op == "create":
            os.kill(pid, signal.SIGSTOP)
        return append(writes)

    state.append = frozen_at_create  # type: ignore[method-assign]
    try:
        with pytest.raises(Unavailable, match="may or may not have been applied"):
            await a.create_session(
                "tok", seed=2, prefix=toks(1, 2, 3), options=options, request_id="c1"
            )
    finally:
        state.append = append  # type: ignore[method-assign]
        os.kill(pid, signal.SIGCONT)
    assert tier.keys("seqserve:m:*")  # woken, Redis ran the queued create
    for _ in range(2):  # the retry, and a retry of the retry: one prefix, one reply
        made, outcome = await a.create_session(
            "tok", seed=2, prefix=toks(1, 2, 3), options=options, request_id="c1"
        )
        assert made.position == 3 and outcome is not None and outcome.position == 3
        assert close(outcome.prediction, want.prediction)
    got = await b.feed(made.session_id, toks(4))  # taken over where the client left it
    assert got.position == 4
    assert close(got.prediction, (await roomy.feed(want_session.session_id, toks(4))).prediction)
    tier.close()


async def test_a_request_queued_behind_a_write_the_tier_did_not_answer_writes_nothing(
    make_engine: EngineFactory, redis_server: RedisServer, redis_url: str
) -> None:
    """Two feeds of one session on one Stream line: the second is admitted while the first
    steps, and waits for the lease. The first's write meets a frozen Redis (SIGSTOP) and times
    out; Redis, woken, runs it. The second must not then write at the old epoch and the same
    position (found by a review: the tier's journal held two steps at one position and a
    takeover refused the session): it is refused SESSION_MOVED, and another replica takes the
    session over after the first step, which landed."""
    a = await make_engine(state_url=redis_url, engine={"inline_max_rows": 0})
    b = await make_engine(state_url=redis_url)
    s, _ = await a.create_session("tok", seed=2)
    sid = s.session_id
    await a.feed(sid, toks(1), request_id="r0")
    state = a.takeover._state
    assert state is not None and redis_server.proc is not None
    pid = redis_server.proc.pid

    def wake() -> None:  # SIGCONT once the first write is marked unsure
        deadline = time.monotonic() + 30
        while sid not in state.moved and time.monotonic() < deadline:
            time.sleep(0.001)
        os.kill(pid, signal.SIGCONT)

    line = Line()
    try:
        with slow_steps(a, 0.3) as started:
            os.kill(pid, signal.SIGSTOP)
            threading.Thread(target=wake, daemon=True).start()
            first = asyncio.create_task(a.feed(sid, toks(2), line=line, request_id="r1"))
            await started.wait()
            second = asyncio.create_task(a.feed(sid, toks(3), line=line, request_id="r2"))
            with pytest.raises(Unavailable, match="may or may not have been applied"):
                await first
            with pytest.raises(SessionMoved):
                await second
    finally:
        os.kill(pid, signal.SIGCONT)
    got = await b.feed(sid, toks(4))
    assert got.position == 3  # r0, then r1 (landed late), then this: r2 never written


async def test_a_step_whose_tier_connection_fails_is_retried_by_request_id(
    make_engine: EngineFactory, redis_server: RedisServer, redis_url: str
) -> None:
    """A write whose connection fails cannot tell a Redis that never saw it from one that ran
    it and lost only the answer (a reset after the script): the step is UNAVAILABLE "may or may
    not have been applied", the copy is taken over again once Redis is back, and the retry
    with the same request id is applied once."""
    a = await make_engine(state_url=redis_url)
    s, _ = await a.create_session("tok", seed=2)
    sid = s.session_id
    await a.feed(sid, toks(1), expected_position=0, request_id="r0")
    await asyncio.sleep(1.2)  # appendfsync everysec: on Redis's disk
    redis_server.kill()
    try:
        with pytest.raises(Unavailable, match="may or may not have been applied"):
            await a.feed(sid, toks(2), expected_position=1, request_id="r1")
    finally:
        redis_server.start()
    assert a.takeover.moved(sid)  # taken over again at its next request
    got = await a.feed(sid, toks(2), expected_position=1, request_id="r1")
    assert got.position == 2
    assert (await a.feed(sid, toks(3), expected_position=2)).position == 3


async def test_with_redis_down_every_session_call_is_unavailable_getsession_on_its_holder_too(
    make_engine: EngineFactory, redis_server: RedisServer, redis_url: str
) -> None:
    """What the README says fails while Redis is down (a real redis-server killed): every call
    that names or makes a session, GetSession included, on the replica that holds the session
    as on any other. The holder does not answer GetSession from its own copy: only the tier's
    epoch says that copy is current (another replica may have taken the session over before
    Redis went down, and this one learns it at its next write), and a GetSession answer is
    always current. Once Redis is back, both answer, nothing changed."""
    a, b = await _replicas(make_engine, redis_url)
    s, _ = await a.create_session("tok", seed=2)
    sid = s.session_id
    await a.feed(sid, toks(1, 2), request_id="r0")
    await asyncio.sleep(1.2)  # appendfsync everysec: on Redis's disk
    redis_server.kill()
    try:
        calls = {
            "GetSession on its holder": lambda: a.describe_session(sid),
            "GetSession elsewhere": lambda: b.describe_session(sid),
            "CreateSession": lambda: a.create_session("tok", request_id="c"),
            "ForkSession": lambda: a.fork_session(sid),
            "Generate": lambda: _generated(a, sid),
            "Step": lambda: a.feed(sid, toks(3), expected_position=2, request_id="r1"),
            "CloseSession": lambda: a.close_session(sid),
        }
        for name, call in calls.items():
            with pytest.raises(Unavailable, match="SEQSERVE_SESSIONS__STATE_URL"):
                await call()
                pytest.fail(f"{name} answered with Redis down")
    finally:
        redis_server.start()
    assert (await b.describe_session(sid)).position == 2
    assert (await a.describe_session(sid)).position == 2  # its copy taken over again
    assert (await a.feed(sid, toks(3), expected_position=2, request_id="r1")).position == 3


async def _generated(engine: SessionEngine, session_id: str) -> list[int]:
    return [t.token_id async for t in engine.generate(session_id, sampling=SAMPLING)]


async def test_a_replay_whose_tier_is_unreachable_stays_pending_not_lost(
    make_engine: EngineFactory, redis_server: RedisServer, redis_url: str
) -> None:
    """a takes a checkpointed session over (its replay pending) and Redis goes down before the
    replay reads the checkpoint: the request gets UNAVAILABLE and the session stays pending
    (before, it was refused for good, DATA_LOSS, intact as it was). Once Redis is back on its
    append-only file, the retry replays it and goes on where the client left it."""
    c = await make_engine(state_url=redis_url, slots=1)
    a = await make_engine(state_url=redis_url)
    x, _ = await c.create_session("tok", seed=4)
    await c.feed(x.session_id, toks(1, 2))
    await c.create_session("tok")  # evicts x: its checkpoint (at 2) in the tier
    await c.feed(x.session_id, toks(3))  # brought back; a step journaled after it
    await asyncio.sleep(1.2)  # appendfsync everysec: on Redis's disk
    await a.takeover.ensure(x.session_id)  # a takes it: its replay pending
    redis_server.kill()
    try:
        with pytest.raises(Unavailable, match="unreachable; nothing was applied or changed"):
            await a.feed(x.session_id, toks(4), expected_position=3)
        assert len(a.leases.replays) == 1  # still pending, not lost
    finally:
        redis_server.start()
    got = await a.feed(x.session_id, toks(4), expected_position=3)
    assert got.position == 4


async def test_a_replay_whose_checkpoint_another_replica_took_lets_the_session_go(
    make_engine: EngineFactory, redis_url: str
) -> None:
    """a takes a checkpointed session over, then b takes it before a's replay reads the
    checkpoint: a's copy is stale, not lost. a's request gets SESSION_MOVED (before:
    DATA_LOSS, for good) and its retry takes the session back."""
    c = await make_engine(state_url=redis_url, slots=1)
    a = await make_engine(state_url=redis_url)
    b = await make_engine(state_url=redis_url)
    x, _ = await c.create_session("tok", seed=4)
    await c.feed(x.session_id, toks(1, 2))
    await c.create_session("tok")  # evicts x: its checkpoint (at 2) in the tier
    await c.feed(x.session_id, toks(3))
    await a.takeover.ensure(x.session_id)  # a takes it: its replay pending
    await b.takeover.ensure(x.session_id)  # b takes it before a's replay reads
    with pytest.raises(SessionMoved):
        await a.feed(x.session_id, toks(4), expected_position=3)
    assert len(a.leases.replays) == 0
    got = await a.feed(x.session_id, toks(4), expected_position=3)  # the retry
    assert got.position == 4


async def test_a_create_made_anew_after_its_prefix_failed_is_its_request_ids_on_every_replica(
    make_engine: EngineFactory, redis_url: str
) -> None:
    """A create whose prefix's step failed ends its session; its retry makes the session anew,
    and that one is the request id's answer everywhere: a retry on another replica finds it
    (the tier's request-id key, kept over any session that still exists, kept the ended one
    for a while, and the other replica made a third session)."""
    a = await make_engine(state_url=redis_url, engine={"inline_max_rows": 0})
    b = await make_engine(state_url=redis_url)
    await a.create_session("tok")  # the version loaded
    with slow_steps(a, seconds=0.01, fail=True), pytest.raises(RuntimeError, match="step failed"):
        await a.create_session("tok", prefix=toks(1, 2, 3), request_id="c1")
    again, _ = await a.create_session("tok", prefix=toks(1, 2, 3), request_id="c1")
    assert again.position == 3
    elsewhere, _ = await b.create_session("tok", prefix=toks(1, 2, 3), request_id="c1")
    assert elsewhere.session_id == again.session_id
