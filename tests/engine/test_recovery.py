"""Recovery after a crash, in process: the first engine is abandoned without its shutdown (no
spill of the sessions in memory, its files left as a killed process leaves them), and a second
engine on the same directory must bring every session back exactly: position, next prediction
and random stream equal to a reference engine that was never interrupted. (A real SIGKILL of a
real server is in tests/api/test_crash.py.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from service.engine.session_engine import PredictionOptions
from service.errors import DataLoss, FailedPrecondition, SessionClosed, SpillMismatch, VersionGone
from service.registry.store import ModelStore
from service.runtime.sampler import SamplingParams
from service.sessions import journal as journal_module
from service.sessions import journal_record as jr

from .conftest import TOK, EngineFactory, close, crash, frames, publish, toks

SAMPLING = SamplingParams(temperature=1.0, max_tokens=5)


@pytest.mark.parametrize("checkpoint_steps", [1000, 3], ids=["journal-only", "with-checkpoints"])
async def test_every_session_comes_back_exactly(
    make_engine: EngineFactory, tmp_path: Path, checkpoint_steps: int
) -> None:
    spill = tmp_path / "state"
    first = await make_engine(slots=4, spill_dir=spill, checkpoint_steps=checkpoint_steps)
    roomy = await make_engine(durability="shutdown")
    pairs = []
    for i in range(8):  # more than the 4 slots: some are evicted (checkpointed) on the way
        a, _ = await first.create_session("tok", seed=100 + i)
        b, _ = await roomy.create_session("tok", seed=100 + i)
        pairs.append((a.session_id, b.session_id))
    for round_ in range(4):
        for i, (a, b) in enumerate(pairs):
            chunk = toks(*[(i * 13 + round_ * 5 + k) % 256 for k in range(1 + (i + round_) % 3)])
            assert (await first.feed(a, chunk)).position == (await roomy.feed(b, chunk)).position
        a, b = pairs[round_]
        got = [t.token_id async for t in first.generate(a, sampling=SAMPLING)]
        want = [t.token_id async for t in roomy.generate(b, sampling=SAMPLING)]
        assert got == want
    parent, ref_parent = pairs[0]
    child = await first.fork_session(parent)
    ref_child = await roomy.fork_session(ref_parent)
    await first.feed(child.session_id, toks(9))
    await roomy.feed(ref_child.session_id, toks(9))
    frame_s, _ = await first.create_session("frames")
    frame_ref, _ = await roomy.create_session("frames")
    await first.feed(frame_s.session_id, frames(0.5, -1.0, 2.0, 0.25, 0.0, 1.0))
    await roomy.feed(frame_ref.session_id, frames(0.5, -1.0, 2.0, 0.25, 0.0, 1.0))
    never_fed, _ = await first.create_session("tok", seed=7)
    never_fed_ref, _ = await roomy.create_session("tok", seed=7)
    closed = pairs.pop()[0]
    await first.close_session(closed)
    a, b = pairs[1]  # sampled last: its draws are only in the journal, not in a checkpoint
    got = [t.token_id async for t in first.generate(a, sampling=SAMPLING)]
    assert got == [t.token_id async for t in roomy.generate(b, sampling=SAMPLING)]
    assert (first.get_session(a).unsaved_steps > 0) == (checkpoint_steps > 5)

    await crash(first)
    second = await make_engine(slots=4, spill_dir=spill, checkpoint_steps=checkpoint_steps)

    pairs += [(child.session_id, ref_child.session_id),
              (never_fed.session_id, never_fed_ref.session_id)]  # fmt: skip
    for a, b in pairs:
        assert second.get_session(a).position == roomy.get_session(b).position
        got, want = await second.feed(a, toks(42)), await roomy.feed(b, toks(42))
        assert got.position == want.position
        assert close(got.prediction, want.prediction), a
        got_t = [t.token_id async for t in second.generate(a, sampling=SAMPLING)]
        want_t = [t.token_id async for t in roomy.generate(b, sampling=SAMPLING)]
        assert got_t == want_t, "the random stream continues where it was"
    got = await second.feed(frame_s.session_id, frames(1.0, 1.0, 1.0))
    want = await roomy.feed(frame_ref.session_id, frames(1.0, 1.0, 1.0))
    assert got.position == want.position == 3 and close(got.prediction, want.prediction)
    with pytest.raises(SessionClosed):
        second.get_session(closed)


async def test_a_session_whose_records_are_damaged_is_refused_with_data_loss(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    spill = tmp_path / "state"
    first = await make_engine(spill_dir=spill)
    hurt, _ = await first.create_session("tok")
    fine, _ = await first.create_session("tok")
    for k in range(3):
        await first.feed(hurt.session_id, toks(k + 1))
        await first.feed(fine.session_id, toks(k + 1))
    await crash(first)
    journal = spill / "journal"
    (segment,) = sorted(journal.iterdir())
    data = bytearray(segment.read_bytes())
    head = bytes([jr.VERSION, jr.TOKENS, len(hurt.session_id)])
    at = data.find(head + hurt.session_id.encode() + (1).to_bytes(8, "little"))
    assert at > 0, "hurt's record at position 1"
    data[at + 40] ^= 0xFF  # inside that record: its checksum fails
    segment.write_bytes(bytes(data))

    second = await make_engine(spill_dir=spill)
    with pytest.raises(DataLoss) as err:
        await second.feed(hurt.session_id, toks(9))
    assert hurt.session_id in err.value.message and "gap" in err.value.message
    assert (await second.feed(fine.session_id, toks(9))).position == 4


async def test_segments_left_undeleted_by_a_crash_are_read_and_skipped(
    make_engine: EngineFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The journal's janitor deletes segments nobody needs after the fact: a crash before it
    does leaves them, full of records older than the checkpoints that replaced them."""
    spill = tmp_path / "state"
    left: list[Path] = []
    monkeypatch.setattr(journal_module.Journal, "_delete", lambda self, ws: left.extend(ws))
    small = {"checkpoint_steps": 2, "journal_segment_bytes": 300}
    first = await make_engine(spill_dir=spill, **small)
    roomy = await make_engine(durability="shutdown")
    pairs = []
    for i in range(4):
        a, _ = await first.create_session("tok", seed=i)
        b, _ = await roomy.create_session("tok", seed=i)
        pairs.append((a.session_id, b.session_id))
    for k in range(9):  # checkpoints every 2 steps: segment after segment falls free
        for i, (a, b) in enumerate(pairs):
            await first.feed(a, toks((k * 7 + i) % 256))
            await roomy.feed(b, toks((k * 7 + i) % 256))
    first.durability.journal.settle()  # type: ignore[union-attr]
    assert left and all(p.exists() for p in left), "deletions were due, and none was done"
    await crash(first)
    monkeypatch.undo()

    second = await make_engine(spill_dir=spill, **small)
    for a, b in pairs:
        assert second.get_session(a).position == roomy.get_session(b).position == 9
        got, want = await second.feed(a, toks(42)), await roomy.feed(b, toks(42))
        assert got.position == want.position and close(got.prediction, want.prediction)
        got_t = [t.token_id async for t in second.generate(a, sampling=SAMPLING)]
        assert got_t == [t.token_id async for t in roomy.generate(b, sampling=SAMPLING)]


@pytest.mark.parametrize(
    "checkpoint_steps", [1000, 1], ids=["from-the-journal", "from-a-checkpoint"]
)
async def test_a_retry_after_a_crash_gets_the_original_reply(
    make_engine: EngineFactory, tmp_path: Path, checkpoint_steps: int
) -> None:
    """The reply to a session's last request is rebuilt by replay (or read from the checkpoint
    written after it): a retry after the restart gets it and applies nothing; a retried
    generation sends its tokens again and continues with the same random stream."""
    spill = tmp_path / "state"
    first = await make_engine(spill_dir=spill, checkpoint_steps=checkpoint_steps)
    roomy = await make_engine(durability="shutdown")
    fed, _ = await first.create_session("tok")
    await first.feed(fed.session_id, toks(1, 2))
    original = await first.feed(
        fed.session_id, toks(3, 4, 5), PredictionOptions(top_k=7, per_position=True),
        expected_position=2, request_id="r1",
    )  # fmt: skip
    gen, _ = await first.create_session("tok", seed=5)
    twin, _ = await roomy.create_session("tok", seed=5)
    sampling = SamplingParams(temperature=1.0, max_tokens=9)
    stream = first.generate(gen.session_id, toks(8), sampling, expected_position=0, request_id="g")
    early = [await anext(stream) for _ in range(3)]
    await stream.aclose()
    await crash(first)

    second = await make_engine(spill_dir=spill, checkpoint_steps=checkpoint_steps)
    retried = await second.feed(
        fed.session_id, toks(3, 4, 5), PredictionOptions(top_k=7, per_position=True),
        expected_position=2, request_id="r1",
    )  # fmt: skip
    assert retried.position == original.position == 5
    assert second.get_session(fed.session_id).position == 5  # nothing applied again
    assert close(retried.prediction, original.prediction)
    assert len(retried.per_position) == 3
    assert all(
        close(a, b) for a, b in zip(retried.per_position, original.per_position, strict=True)
    )

    again = [
        t
        async for t in second.generate(
            gen.session_id, toks(8), sampling, expected_position=0, request_id="g"
        )
    ]
    assert [t.token_id for t in again[:3]] == [t.token_id for t in early]
    want = [t.token_id async for t in roomy.generate(twin.session_id, toks(8), sampling)]
    assert [t.token_id for t in again] == want
    assert [t.position for t in again] == list(range(2, 11))


async def test_a_session_journaled_for_weights_replaced_since_is_failed_precondition(
    make_engine: EngineFactory, store_root: Path, tmp_path: Path
) -> None:
    """Its records are intact, but tok/1 was rewritten in place with other weights while the
    server was down: FAILED_PRECONDITION naming both fingerprints, as for a spill record."""
    spill = tmp_path / "state"
    first = await make_engine(spill_dir=spill)
    session, _ = await first.create_session("tok", "1")
    await first.feed(session.session_id, toks(1, 2))
    await crash(first)
    store = ModelStore(store_root)
    publish(store, "tok", TOK, seed=77)
    shutil.rmtree(store_root / "tok" / "1")
    (store_root / "tok" / "2").rename(store_root / "tok" / "1")
    manifest = store_root / "tok" / "1" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"version": 2', '"version": 1'))
    second = await make_engine(spill_dir=spill)
    with pytest.raises(SpillMismatch) as err:
        await second.feed(session.session_id, toks(3))
    assert isinstance(err.value, FailedPrecondition)
    assert session.fingerprint in err.value.message


async def test_create_and_fork_retries_after_a_crash_return_what_was_made(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    spill = tmp_path / "state"
    first = await make_engine(spill_dir=spill)
    options = PredictionOptions(top_k=4)
    made, outcome = await first.create_session(
        "tok", prefix=toks(1, 2), options=options, request_id="c"
    )
    child = await first.fork_session(made.session_id, request_id="f")
    await crash(first)
    second = await make_engine(spill_dir=spill)
    again, again_outcome = await second.create_session(
        "tok", prefix=toks(1, 2), options=options, request_id="c"
    )
    assert again.session_id == made.session_id and again.position == 2
    assert outcome is not None and again_outcome is not None
    assert close(again_outcome.prediction, outcome.prediction)  # the reply, rebuilt by replay
    assert (await second.fork_session(made.session_id, request_id="f")).session_id == (
        child.session_id
    )
    assert len(second.sessions) == 2  # nothing made twice


@pytest.mark.parametrize("then", ["crash", "stop"])
async def test_a_version_missing_at_one_recovery_loses_nothing_once_it_is_back(
    make_engine: EngineFactory, store_root: Path, tmp_path: Path, then: str
) -> None:
    """tok/1 is missing from the store at one start after a crash (a mount not ready): the
    session with steps to replay is refused meanwhile, but its checkpoint and journal stay (also
    through that server's own crash or stop), and one whose checkpoint holds all its steps
    needs no replay at all; once the version is back both resume at their positions."""
    spill = tmp_path / "state"
    quiet = {"slots": 1, "spill_dir": spill, "checkpoint_idle_seconds": 3600.0}
    first = await make_engine(**quiet)
    idle, _ = await first.create_session("tok")
    await first.feed(idle.session_id, toks(1, 2))
    busy, _ = await first.create_session("tok")  # evicts idle: checkpointed at 2
    await first.feed(busy.session_id, toks(3))
    await first.feed(idle.session_id, toks(4))  # evicts busy: checkpointed at 1
    await first.feed(busy.session_id, toks(5, 6))  # evicts idle (at 3); journaled only
    await crash(first)
    away = tmp_path / "tok-1-away"
    (store_root / "tok" / "1").rename(away)

    second = await make_engine(**quiet)
    with pytest.raises(VersionGone):
        second.get_session(busy.session_id)
    assert second.get_session(idle.session_id).position == 3
    if then == "crash":
        await crash(second)
    else:
        await second.stop()
    away.rename(store_root / "tok" / "1")

    third = await make_engine(**quiet)
    assert third.get_session(idle.session_id).position == 3
    assert third.get_session(busy.session_id).position == 3
    assert (await third.feed(busy.session_id, toks(7))).position == 4
    assert (await third.feed(idle.session_id, toks(7))).position == 4
