"""Recovery after a crash, in process: the first engine is abandoned without its shutdown (no
spill of the sessions in memory, its files left as a killed process leaves them), and a second
engine on the same directory must bring every session back exactly: position, next prediction
and random stream equal to a reference engine that was never interrupted. (A real SIGKILL of a
real server is in tests/api/test_crash.py.)"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from service.engine.recovery import Recovery
from service.engine.replay_plan import replay_of
from service.engine.session_engine import PredictionOptions, SessionEngine
from service.errors import (
    DataLoss,
    FailedPrecondition,
    JournalUnavailable,
    SessionClosed,
    SessionNotFound,
    SpillMismatch,
    VersionGone,
)
from service.registry.store import ModelStore
from service.runtime.sampler import SamplingParams
from service.sessions import journal as journal_module
from service.sessions import journal_record as jr
from service.sessions import journal_scan as js

from .conftest import TOK, EngineFactory, close, crash, frames, publish, same, toks

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


async def _hurt_and_fine(
    make_engine: EngineFactory, spill: Path, *, hurt_last: bool
) -> tuple[str, str, Path]:
    """Sessions hurt and fine fed three steps each, in turns (hurt's last, or fine's, the
    journal's last record), then a crash: their ids and the journal's one segment."""
    first = await make_engine(spill_dir=spill)
    hurt, _ = await first.create_session("tok")
    fine, _ = await first.create_session("tok")
    order = (fine, hurt) if hurt_last else (hurt, fine)
    for k in range(3):
        for session in order:
            await first.feed(session.session_id, toks(k + 1))
    await crash(first)
    (segment,) = sorted((spill / "journal").iterdir())
    return hurt.session_id, fine.session_id, segment


def _damage_last_step_of(data: bytearray, hurt: str, fine: str) -> None:
    """Flip a byte of hurt's last record, which fine's last record follows."""
    fine_last = data.rindex(fine.encode())  # fine's last record's session id
    hurt_last = data.rindex(hurt.encode(), 0, fine_last)
    data[hurt_last + len(hurt) + 8] ^= 0xFF  # just past its position: its token


@pytest.mark.parametrize("tail", ["damaged", "torn"])
async def test_a_hurt_last_record_of_a_segment_is_dropped_and_its_session_comes_back_before_it(
    make_engine: EngineFactory, tmp_path: Path, tail: str
) -> None:
    """The segment's last record is hurt's third step. Cut short, it is a crash's torn write.
    Whole but failing its checksum, it is what a power loss leaves of a write not yet synced
    (whose step was never acknowledged) as much as damage: dropped as well, but counted. Either
    way hurt comes back before it, and fine is untouched."""
    spill = tmp_path / "state"
    hurt, fine, segment = await _hurt_and_fine(make_engine, spill, hurt_last=True)
    data = bytearray(segment.read_bytes())
    if tail == "damaged":
        data[-1] ^= 0xFF  # its token's last byte: the length still fits, the checksum fails
    else:
        del data[-3:]
    segment.write_bytes(bytes(data))

    second = await make_engine(spill_dir=spill)
    assert (await second.feed(fine, toks(9))).position == 4
    assert (await second.feed(hurt, toks(9))).position == 3
    assert second.stats().journal_damaged_records == (1 if tail == "damaged" else 0)


async def test_a_damaged_last_record_of_a_session_that_whole_records_follow_refuses_it(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    """hurt's third step is damaged and only fine's records follow it: no later record of hurt
    shows a gap, but those whole records were written after it, so its step was synced and
    acknowledged. hurt is refused with DATA_LOSS, not brought back a step short; counted."""
    spill = tmp_path / "state"
    hurt, fine, segment = await _hurt_and_fine(make_engine, spill, hurt_last=False)
    data = bytearray(segment.read_bytes())
    _damage_last_step_of(data, hurt, fine)
    segment.write_bytes(bytes(data))

    second = await make_engine(spill_dir=spill)
    assert (await second.feed(fine, toks(9))).position == 4
    with pytest.raises(DataLoss) as err:
        await second.feed(hurt, toks(9))
    assert hurt in err.value.message and "damaged" in err.value.message
    assert second.stats().journal_damaged_records == 1


async def test_a_damaged_last_step_is_not_hidden_by_its_sessions_generation_start(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    """hurt's third step is damaged, whole records follow, and the last of them is hurt's own
    GEN_START (a generate began, then the crash): a GEN_START shows no gap in a replay, so it
    must not count as the record after the damage. hurt is refused, not back a step short."""
    spill = tmp_path / "state"
    hurt, fine, segment = await _hurt_and_fine(make_engine, spill, hurt_last=False)
    data = bytearray(segment.read_bytes())
    _damage_last_step_of(data, hurt, fine)
    data += jr.generation_start(hurt, 3, "req-1", {"temperature": 1.0})
    segment.write_bytes(bytes(data))

    second = await make_engine(spill_dir=spill)
    with pytest.raises(DataLoss, match="damaged"):
        await second.feed(hurt, toks(9))
    assert (await second.feed(fine, toks(9))).position == 4


async def test_a_damaged_create_of_a_session_checkpointed_before_its_first_step_is_harmless(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    """hurt was created and evicted before its first feed (its checkpoint at position 0), then
    its CREATE record is damaged, whole records after it: the checkpoint holds all a creation
    did, so hurt comes back from it, and the checkpoint is kept (not lost, not deleted)."""
    spill = tmp_path / "state"
    first = await make_engine(spill_dir=spill, slots=1)
    hurt, _ = await first.create_session("tok")
    other, _ = await first.create_session("tok")  # evicts hurt: its checkpoint at 0 written
    await first.feed(other.session_id, toks(1))
    assert (spill / f"{hurt.session_id}.spill").exists()
    await crash(first)
    (segment,) = sorted((spill / "journal").iterdir())
    data = bytearray(segment.read_bytes())
    meta = data.index(b"{", data.index(hurt.session_id.encode()))
    data[meta + 5] ^= 0x01  # inside hurt's CREATE's settings: its head still reads
    segment.write_bytes(bytes(data))
    assert [u.what for u in js.read_stream(bytes(data)) if isinstance(u, js.Unreadable)] == [
        js.DAMAGED
    ]

    second = await make_engine(spill_dir=spill, slots=1)
    assert (spill / f"{hurt.session_id}.spill").exists()
    assert (await second.feed(hurt.session_id, toks(9))).position == 1
    assert second.stats().journal_damaged_records == 1


def _step_read_as_create(spill: Path, session_id: str, position: int) -> None:
    """Damage the kind byte of the session's step record at `position` in the one journal
    segment, so that its checksum fails and its head reads as a CREATE."""
    (segment,) = sorted((spill / "journal").iterdir())
    data = bytearray(segment.read_bytes())
    head = bytes([jr.VERSION, jr.TOKENS, len(session_id)]) + session_id.encode()
    at = data.index(head + position.to_bytes(8, "little"))
    data[at + 1] = jr.CREATE
    segment.write_bytes(bytes(data))
    bad = [u for u in js.read_stream(bytes(data)) if isinstance(u, js.Unreadable)]
    assert [(u.what, u.kind, u.position) for u in bad] == [(js.DAMAGED, jr.CREATE, position)]


async def test_a_damaged_step_whose_head_reads_as_a_create_is_not_taken_for_one(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    """hurt is checkpointed at position 2, then steps once more; that step's record is damaged
    in its kind byte, so its head reads as a CREATE at position 2, and whole records follow.
    A damaged CREATE is harmless behind a checkpoint only at position 0, where a creation is:
    before, any record whose head said CREATE was, and hurt came back a step short."""
    spill = tmp_path / "state"
    first = await make_engine(spill_dir=spill, slots=2)
    hurt, _ = await first.create_session("tok")
    await first.feed(hurt.session_id, toks(1, 2))
    await first.create_session("tok")
    other, _ = await first.create_session("tok")  # evicts hurt: its checkpoint at 2 written
    await first.feed(hurt.session_id, toks(3))  # restored: a step at 2 (not evicted again)
    await first.feed(other.session_id, toks(1))  # whole records after it
    assert first.get_session(hurt.session_id).position == 3
    assert first.get_session(hurt.session_id).unsaved_steps == 1
    await crash(first)
    _step_read_as_create(spill, hurt.session_id, 2)

    second = await make_engine(spill_dir=spill, slots=2)
    with pytest.raises(DataLoss, match="damaged"):
        await second.feed(hurt.session_id, toks(9))
    assert (await second.feed(other.session_id, toks(9))).position == 2


async def test_a_damaged_first_step_whose_head_reads_as_a_create_is_not_taken_for_one(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    """A session's first step is at position 0 too, where creations are: hurt's, damaged in its
    kind byte, reads as a CREATE at 0 behind hurt's own whole CREATE. A session has one
    creation, so that is a step, and it is lost: before, hurt came back at position 0."""
    spill = tmp_path / "state"
    first = await make_engine(spill_dir=spill)
    hurt, _ = await first.create_session("tok")
    other, _ = await first.create_session("tok")
    await first.feed(hurt.session_id, toks(1))
    await first.feed(other.session_id, toks(1))  # whole records after it
    await crash(first)
    _step_read_as_create(spill, hurt.session_id, 0)

    second = await make_engine(spill_dir=spill)
    with pytest.raises(DataLoss, match="damaged"):
        await second.feed(hurt.session_id, toks(9))
    assert (await second.feed(other.session_id, toks(9))).position == 2


@pytest.mark.parametrize("hurt_end", ["damaged", "torn"])
async def test_a_hurt_last_record_in_an_older_segment_is_damage(
    make_engine: EngineFactory, tmp_path: Path, hurt_end: str
) -> None:
    """With fsync=batch, a record that newer segments follow was synced and acknowledged:
    its segment's whole last record failing its checksum there is damage, not a power loss's
    unsynced write, and so is one cut short there (before, that was dropped as a crash's torn
    write, uncounted). hurt, whose last step it was, is refused, not back a step short."""
    spill = tmp_path / "state"
    opts: dict[str, object] = {"spill_dir": spill, "fsync": "batch", "journal_segment_bytes": 256}
    first = await make_engine(**opts)
    hurt, _ = await first.create_session("tok")
    fine, _ = await first.create_session("tok")
    journal = first.durability.journal
    steps = 0
    while not steps or journal._size < 256:  # hurt's steps until its segment is full
        await first.feed(hurt.session_id, toks(steps % 200 + 1))
        steps += 1
    for k in range(10):  # fine's records fill newer segments
        await first.feed(fine.session_id, toks(k + 1))
    await crash(first)
    segments = sorted((spill / "journal").iterdir())
    (older,) = [
        p for p in segments
        if (r := list(js.decode_stream(p.read_bytes())))
        and (r[-1].session_id, r[-1].position) == (hurt.session_id, steps - 1)
    ]  # fmt: skip
    assert older != segments[-1]
    data = bytearray(older.read_bytes())
    if hurt_end == "damaged":
        data[-1] ^= 0xFF
    else:
        del data[-3:]
    older.write_bytes(bytes(data))

    second = await make_engine(**opts)
    with pytest.raises(DataLoss, match="damaged"):
        await second.feed(hurt.session_id, toks(9))
    assert (await second.feed(fine.session_id, toks(9))).position == 11
    assert second.stats().journal_damaged_records == 1


async def test_the_newest_segments_cut_end_is_cut_off_so_a_later_start_finds_it_clean(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    """The newest segment's whole last record fails its checksum (a power loss's unsynced
    write): dropped and cut off at the first start, so at a second start, when the first
    start's own segments follow it, it is not taken for damage that newer records follow."""
    spill = tmp_path / "state"
    first = await make_engine(spill_dir=spill)
    hurt, _ = await first.create_session("tok")
    for k in range(3):
        await first.feed(hurt.session_id, toks(k + 1))
    await crash(first)
    (segment,) = sorted((spill / "journal").iterdir())
    data = bytearray(segment.read_bytes())
    data[-1] ^= 0xFF
    segment.write_bytes(bytes(data))

    second = await make_engine(spill_dir=spill)
    assert second.stats().journal_damaged_records == 1
    assert segment.stat().st_size < len(data)  # the cut end is gone from the disk
    assert (await second.feed(hurt.session_id, toks(9))).position == 3  # back before it
    await crash(second)
    third = await make_engine(spill_dir=spill)
    assert third.stats().journal_damaged_records == 0
    assert (await third.feed(hurt.session_id, toks(10))).position == 4


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


@pytest.mark.parametrize("model", ["tok", "frames"])
async def test_a_replay_after_one_input_steps_is_bit_exact(
    make_engine: EngineFactory, tmp_path: Path, model: str
) -> None:
    """Steps of one input run the fused one-row step, steps of more the whole-chunk kernel; a
    replay of the journal runs each through the kernel its live step ran, so a retry of the
    last request gets the original reply bit for bit, and the next step predicts bit for bit
    what an uninterrupted twin does (each step here ran alone, as its replay does)."""
    spill = tmp_path / "state"
    first = await make_engine(spill_dir=spill, checkpoint_steps=1000)
    roomy = await make_engine(durability="shutdown")
    if model == "tok":
        steps = [toks(1), toks(2, 3), toks(4), toks(5), toks(6, 7, 8), toks(9), toks(10)]
        after = toks(11)
    else:
        steps = [frames(0.1 * k, -0.2, 0.3 * k) for k in range(1, 4)]
        steps[1:1] = [frames(0.5, 0.4, -0.3, 0.2, -0.1, 0.9)]
        after = frames(0.7, -0.7, 0.2)
    options = PredictionOptions(top_k=5)
    a, _ = await first.create_session(model, seed=3)
    b, _ = await roomy.create_session(model, seed=3)
    position = 0
    for k, step in enumerate(steps):
        if model == "tok" and k == 4:  # a generation: each token a one-input step
            got_t = [t.token_id async for t in first.generate(a.session_id, sampling=SAMPLING)]
            want_t = [t.token_id async for t in roomy.generate(b.session_id, sampling=SAMPLING)]
            assert got_t == want_t
            position += len(got_t)
        before = position
        original = await first.feed(
            a.session_id, step, options, expected_position=position, request_id=f"r{k}"
        )
        twin = await roomy.feed(b.session_id, step, options)
        assert same(original.prediction, twin.prediction)
        position = original.position
    await crash(first)

    second = await make_engine(spill_dir=spill, checkpoint_steps=1000)
    retried = await second.feed(
        a.session_id, steps[-1], options, expected_position=before, request_id=f"r{k}"
    )
    assert retried.position == position == second.get_session(a.session_id).position
    assert same(retried.prediction, original.prediction), (retried.prediction, original.prediction)
    got = await second.feed(a.session_id, after, options)
    want = await roomy.feed(b.session_id, after, options)
    assert same(got.prediction, want.prediction), (got.prediction, want.prediction)


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


_SMALL_SEGMENTS = {"slots": 1, "checkpoint_idle_seconds": 3600.0, "checkpoint_steps": 4}


async def _steps(engine: SessionEngine, session_id: str, n: int) -> None:
    for _ in range(n):
        await engine.feed(session_id, frames(0.1, 0.2, 0.3))
    journal = engine.durability.journal
    assert isinstance(journal, journal_module.Journal)
    journal.settle()  # its deletions done


def _segment_files(spill: Path) -> list[str]:
    """The journal's segments (not its `ended` file)."""
    return sorted(p.name for p in (spill / "journal").iterdir() if p.name != "ended")


async def test_a_held_session_keeps_only_its_records_and_they_go_when_it_is_closed(
    make_engine: EngineFactory, store_root: Path, tmp_path: Path
) -> None:
    """Two sessions held (tok/1 missing at a recovery) keep their records, not the journal:
    another session's steps are trimmed as usual (pinning the segments read kept every later
    one: 52 segments became 253). Closing one drops its records, so it does not come back once
    the version is; closing the other deletes what was held."""
    spill = tmp_path / "state"
    opts = {**_SMALL_SEGMENTS, "spill_dir": spill, "journal_segment_bytes": 256, "slots": 2}
    first = await make_engine(**opts)
    one, _ = await first.create_session("tok")
    await first.feed(one.session_id, toks(1, 2))  # journaled only
    two, _ = await first.create_session("tok")
    await first.feed(two.session_id, toks(3))  # journaled only
    await crash(first)
    away = tmp_path / "tok-1-away"
    (store_root / "tok" / "1").rename(away)

    second = await make_engine(**opts)
    for held in (one, two):
        with pytest.raises(VersionGone):
            second.get_session(held.session_id)
    busy, _ = await second.create_session("frames")
    counts = []
    for _ in range(3):
        await _steps(second, busy.session_id, 150)
        counts.append(len(_segment_files(spill)))
    assert max(counts) <= 8, counts
    await second.close_session(one.session_id)
    await _steps(second, busy.session_id, 150)  # its END's segment is trimmed
    await crash(second)
    away.rename(store_root / "tok" / "1")

    third = await make_engine(**opts)
    # Closed: its records went before its END did, and its END's segment is gone, but the
    # journal kept why it ended (its `ended` file).
    with pytest.raises(SessionClosed):
        third.get_session(one.session_id)
    assert third.get_session(two.session_id).position == 1
    await third.close_session(two.session_id)
    await _steps(third, busy.session_id, 20)
    assert len(_segment_files(spill)) <= 2  # what the busy session needs now, no more


async def test_a_session_held_at_two_recoveries_comes_back_at_its_position(
    make_engine: EngineFactory, store_root: Path, tmp_path: Path
) -> None:
    """Its records are copied again at each recovery that holds it, while the journal moves
    on; once the version is back it resumes where it was."""
    spill = tmp_path / "state"
    opts = {**_SMALL_SEGMENTS, "spill_dir": spill, "journal_segment_bytes": 256}
    first = await make_engine(**opts)
    held, _ = await first.create_session("tok", seed=7)
    await first.feed(held.session_id, toks(1, 2, 3))
    await crash(first)
    away = tmp_path / "tok-1-away"
    (store_root / "tok" / "1").rename(away)
    for _ in range(2):
        engine = await make_engine(**opts)
        await engine.leases.replays.wait()  # the last run's frames session: replayed, unpinned
        busy, _ = await engine.create_session("frames")
        await _steps(engine, busy.session_id, 100)
        assert len(_segment_files(spill)) <= 6
        await crash(engine)
    away.rename(store_root / "tok" / "1")

    last = await make_engine(**opts)
    roomy = await make_engine(durability="shutdown")
    ref, _ = await roomy.create_session("tok", seed=7)
    await roomy.feed(ref.session_id, toks(1, 2, 3))
    assert last.get_session(held.session_id).position == 3
    got = await last.feed(held.session_id, toks(4))
    want = await roomy.feed(ref.session_id, toks(4))
    assert got.position == 4 and close(got.prediction, want.prediction)


async def test_a_torn_segment_found_at_a_restart_is_trimmed_and_brings_nothing_back(
    make_engine: EngineFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed append could not cut its segment back, so it was renamed to carry its valid
    length. The next start reads it and trims it like any other segment: left behind, its
    CREATE record brought back, after a later crash, a session closed meanwhile."""
    spill = tmp_path / "state"
    first = await make_engine(spill_dir=spill, checkpoint_idle_seconds=3600.0)
    closed, _ = await first.create_session("tok")
    await first.feed(closed.session_id, toks(1, 2))
    other, _ = await first.create_session("tok")
    journal = first.durability.journal
    assert isinstance(journal, journal_module.Journal)
    torn_fd = journal._fd
    write, cut = os.write, os.ftruncate
    monkeypatch.setattr(
        os, "write", lambda fd, d: write(fd, d[: len(d) // 2] if fd == torn_fd else d)
    )
    monkeypatch.setattr(os, "ftruncate", lambda fd, n: _eio() if fd == torn_fd else cut(fd, n))
    with pytest.raises(JournalUnavailable):
        await first.feed(other.session_id, toks(9, 9, 9))
    monkeypatch.undo()
    await crash(first)
    torn = [name for name in _segment_files(spill) if name.count(".") == 2]
    assert torn

    opts = {**_SMALL_SEGMENTS, "spill_dir": spill, "journal_segment_bytes": 256}
    second = await make_engine(**opts)
    assert second.get_session(closed.session_id).position == 2
    await second.close_session(closed.session_id)
    busy, _ = await second.create_session("frames")
    await _steps(second, busy.session_id, 100)
    assert not set(torn) & set(_segment_files(spill))
    await crash(second)

    third = await make_engine(**opts)
    with pytest.raises((SessionClosed, SessionNotFound)):  # not back from its CREATE record
        third.get_session(closed.session_id)


def _eio() -> None:
    raise OSError(errno.EIO, "Input/output error")


async def test_records_read_twice_are_planned_once(make_engine: EngineFactory) -> None:
    """A held session's records are copied into a segment of their own; a crash before the
    segments they came from are trimmed leaves both to read at the next start. Planned twice,
    they doubled at each restart and the replay then found a gap (DATA_LOSS)."""
    engine = await make_engine()
    session, _ = await engine.create_session("tok")
    sid = session.session_id
    steps = [
        jr.tokens(sid, 0, np.array([1, 2, 3])),
        jr.generated(sid, 3, 7, draws=1, request_id="g"),
        jr.generated(sid, 4, 9, draws=1, request_id="g"),
    ]
    records = list(js.decode_stream(b"".join(steps + steps)))  # the originals, then the copy
    recovery = Recovery(engine.sessions, engine.versions, engine.residency, engine.leases.replays)
    base = dataclasses.replace(session, position=0)
    plans = recovery._plan(records, {sid: base})
    kept = plans[sid].records
    assert [(r.kind, r.position) for r in kept] == [
        (jr.TOKENS, 0),
        (jr.GENERATED, 3),
        (jr.GENERATED, 4),
    ]
    assert replay_of(kept, 0, "tokens", TOK.input_dim).problem is None
