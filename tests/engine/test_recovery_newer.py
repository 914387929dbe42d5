"""A downgrade on the local state directory: records or a checkpoint a newer seqserve wrote (a
format version above this server's, whole) are not this server's to read. Its session is
refused as the shared tier refuses one (WrittenByNewer: FAILED_PRECONDITION,
VERSION_UNAVAILABLE; only its owner hears it), not brought back short of the steps it cannot
read, and not counted as damage; what it is made of stays on disk, at every restart, so a
server that reads it (here: the version put back, standing in for the newer seqserve) serves it
whole. The other sessions go on. (A real SIGKILLed server: tests/api/test_newer_records_restart.py;
the shared tier: tests/engine/test_takeover_damage.py.)"""

from __future__ import annotations

import grpc
import pytest

from service.errors import SeqServeError, SessionClosed, SpillDirUnusable, WrittenByNewer
from service.security import principal
from service.security.principal import Principal
from service.sessions import journal_record as jr
from service.sessions import journal_scan as js
from service.sessions import spill_record
from tests.newer_records import NEWER_JOURNAL, NEWER_SPILL, set_journal_version, set_spill_magic

from .conftest import EngineFactory, FakeClock, close, crash, toks

# Checkpoints only when a test writes them; a TTL short enough to pass by hand.
OPTS = {"checkpoint_idle_seconds": 3600.0, "ttl_seconds": 60.0}


async def _refused(engine, session_id: str) -> None:  # type: ignore[no-untyped-def]
    """Stepping and reading the session are refused as a newer server's, twice."""
    for _ in range(2):
        with pytest.raises(WrittenByNewer, match="a newer seqserve") as err:
            await engine.feed(session_id, toks(9))
        assert err.value.reason == "VERSION_UNAVAILABLE"
        assert err.value.status == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(WrittenByNewer):
            await engine.describe_session(session_id)


async def test_a_session_a_newer_server_journaled_is_refused_not_brought_back_short(
    make_engine: EngineFactory, tmp_path
) -> None:
    """Its last step's record is a newer server's. Before, that record was skipped with a
    warning and the session came back at position 2 of 3, answering as if nothing happened."""
    spill = tmp_path / "state"
    first = await make_engine(spill_dir=spill, **OPTS)
    newer, _ = await first.create_session("tok", seed=1)
    fine, _ = await first.create_session("tok", seed=2)
    for k in range(3):
        await first.feed(newer.session_id, toks(k + 1))
        await first.feed(fine.session_id, toks(k + 1))
    await crash(first)
    assert set_journal_version(spill / "journal", newer.session_id, 2, jr.VERSION, NEWER_JOURNAL)

    second = await make_engine(spill_dir=spill, **OPTS)
    await _refused(second, newer.session_id)
    assert (await second.feed(fine.session_id, toks(9))).position == 4
    stats = second.stats()
    assert stats.journal_damaged_records == 0 and stats.damaged_checkpoints == 0


async def test_it_is_kept_across_restarts_and_served_whole_by_a_server_that_reads_it(
    make_engine: EngineFactory, tmp_path
) -> None:
    """Checkpointed at position 2, two steps journaled after it, the last a newer server's.
    The checkpoint stays as it was and the records too: a clean stop (which trims every
    segment) and a start after it still refuse the session, and a server that reads the
    record brings it back at position 4, its next prediction its twin's. Records read twice
    (a copy left beside the segment they were copied to) are kept once."""
    spill = tmp_path / "state"
    first = await make_engine(spill_dir=spill, **OPTS)
    roomy = await make_engine(durability="shutdown")
    newer, _ = await first.create_session("tok", seed=7)
    twin, _ = await roomy.create_session("tok", seed=7)
    for k in range(4):
        if k == 2:
            assert await first.idle_checkpoints.sweep(0.0) == 1
        await first.feed(newer.session_id, toks(k + 1))
        await roomy.feed(twin.session_id, toks(k + 1))
    await crash(first)
    journal = spill / "journal"
    assert set_journal_version(journal, newer.session_id, 3, jr.VERSION, NEWER_JOURNAL) == 1
    checkpoint = spill / f"{newer.session_id}.spill"
    kept = checkpoint.read_bytes()

    second = await make_engine(spill_dir=spill, **OPTS)
    await _refused(second, newer.session_id)
    other, _ = await second.create_session("tok")
    await second.feed(other.session_id, toks(5))
    await second.stop()
    (held,) = journal.glob("*.log")  # all a clean stop leaves: the records kept
    copy = journal / f"{int(held.name.split('.')[0]) + 7:012d}.log"
    copy.write_bytes(held.read_bytes())  # as if a crash had left them twice
    third = await make_engine(spill_dir=spill, **OPTS)
    await _refused(third, newer.session_id)
    await crash(third)
    assert checkpoint.read_bytes() == kept

    assert set_journal_version(journal, newer.session_id, 3, NEWER_JOURNAL, jr.VERSION) == 1
    last = await make_engine(spill_dir=spill, **OPTS)
    assert last.get_session(newer.session_id).position == 4
    got = await last.feed(newer.session_id, toks(5))
    want = await roomy.feed(twin.session_id, toks(5))
    assert got.position == 5 and close(got.prediction, want.prediction)
    assert last.get_session(other.session_id).position == 1


async def test_a_session_a_newer_server_created_is_refused_not_unknown(
    make_engine: EngineFactory, tmp_path
) -> None:
    """Every record of it a newer server's, its creation included: before, all were skipped
    and the session was NOT_FOUND, as if it had never been made."""
    spill = tmp_path / "state"
    first = await make_engine(spill_dir=spill, **OPTS)
    newer, _ = await first.create_session("tok")
    await first.feed(newer.session_id, toks(1))
    await crash(first)
    journal = spill / "journal"  # its CREATE and its step, both at position 0:
    assert set_journal_version(journal, newer.session_id, 0, jr.VERSION, NEWER_JOURNAL) == 2

    second = await make_engine(spill_dir=spill, **OPTS)
    await _refused(second, newer.session_id)


async def test_a_newer_record_older_than_the_checkpoint_changes_nothing(
    make_engine: EngineFactory, tmp_path
) -> None:
    """A segment not deleted yet holds a newer server's record that the session's checkpoint is
    past: that step is in the checkpoint, so the session comes back whole, not refused."""
    spill = tmp_path / "state"
    first = await make_engine(spill_dir=spill, **OPTS)
    made, _ = await first.create_session("tok")
    for k in range(3):
        await first.feed(made.session_id, toks(k + 1))
    await first.idle_checkpoints.sweep(0.0)  # at 3; the segment holding its steps stays
    await crash(first)
    assert set_journal_version(spill / "journal", made.session_id, 1, jr.VERSION, NEWER_JOURNAL)

    second = await make_engine(spill_dir=spill, **OPTS)
    assert second.get_session(made.session_id).position == 3
    assert (await second.feed(made.session_id, toks(4))).position == 4


async def test_only_its_owner_hears_it_and_the_sweeper_never_expires_it(
    make_engine: EngineFactory, tmp_path
) -> None:
    """With auth on, a stranger hears NOT_FOUND. Past its TTL the refused-session sweeper,
    which ends other refused sessions and deletes what they kept, leaves it as it is: its last
    use and TTL are in the record this server cannot read. Its owner can close it: its END is
    journaled, what it kept is deleted, and a later start hears it closed."""
    spill = tmp_path / "state"
    clock = FakeClock()
    principal.current.set(Principal("alice", "client"))
    first = await make_engine(spill_dir=spill, clock=clock, **OPTS)
    newer, _ = await first.create_session("tok")
    for k in range(3):
        await first.feed(newer.session_id, toks(k + 1))
    await first.idle_checkpoints.sweep(0.0)
    await first.feed(newer.session_id, toks(4))
    await crash(first)
    assert set_journal_version(spill / "journal", newer.session_id, 3, jr.VERSION, NEWER_JOURNAL)

    second = await make_engine(spill_dir=spill, clock=clock, **OPTS)
    principal.current.set(Principal("mallory", "client"))
    with pytest.raises(SeqServeError) as stranger:
        await second.feed(newer.session_id, toks(9))
    assert stranger.value.reason == "SESSION_NOT_FOUND"
    principal.current.set(Principal("alice", "client"))
    await _refused(second, newer.session_id)
    clock.advance(3600.0)  # far past its 60 s TTL
    assert await second.sweep_expired() == 0
    assert (spill / f"{newer.session_id}.spill").exists()
    await _refused(second, newer.session_id)

    await second.close_session(newer.session_id)
    assert not (spill / f"{newer.session_id}.spill").exists()
    second.durability.journal.settle()  # type: ignore[union-attr]
    await crash(second)
    journal = spill / "journal"  # its records went with its close
    assert set_journal_version(journal, newer.session_id, 3, NEWER_JOURNAL, jr.VERSION) == 0
    third = await make_engine(spill_dir=spill, clock=clock, **OPTS)
    with pytest.raises(SessionClosed):
        third.get_session(newer.session_id)


async def _checkpointed_then_stepped(make_engine: EngineFactory, spill, clock, **opts):  # type: ignore[no-untyped-def]
    """A session (and its twin on a roomy engine) checkpointed at 2 and stepped once more, a
    second session stepped once, then the engine crashed: (newer, twin, fine, roomy)."""
    first = await make_engine(spill_dir=spill, clock=clock, **OPTS, **opts)
    roomy = await make_engine(durability="shutdown")
    newer, _ = await first.create_session("tok", seed=3)
    twin, _ = await roomy.create_session("tok", seed=3)
    for k in range(3):
        if k == 2:
            await first.idle_checkpoints.sweep(0.0)  # at 2
        await first.feed(newer.session_id, toks(k + 1))
        await roomy.feed(twin.session_id, toks(k + 1))
    fine, _ = await first.create_session("tok", ttl_seconds=7200.0)
    await first.feed(fine.session_id, toks(1))
    first.durability.journal.settle()  # type: ignore[union-attr]
    await crash(first)
    return newer, twin, fine, roomy


def _kinds(spill, session_id: str) -> list[int]:  # type: ignore[no-untyped-def]
    """The kinds of the session's records the journal's segments hold, readable or not."""
    return [
        r.kind
        for segment in sorted((spill / "journal").glob("*.log"))
        for r in js.read_stream(segment.read_bytes())
        if r.session_id == session_id
    ]


async def test_a_checkpoint_a_newer_server_wrote_is_refused_as_such_and_kept(
    make_engine: EngineFactory, tmp_path
) -> None:
    """Its spill record's magic a newer format's (`SQSPILL4`), its sha256 good, a step of it
    journaled after it, the segments before trimmed. Before, it was refused as damaged
    (DATA_LOSS, counted in damaged_checkpoints), its journal record trimmed, and the
    refused-session sweeper deleted the record a TTL after its file's time. Now it is
    FAILED_PRECONDITION as in the shared tier, nothing is counted, and record and journal
    record stay, through restarts and past its TTL, for a server that reads them: it serves
    the session at position 3."""
    spill = tmp_path / "state"
    clock = FakeClock()
    small = {"journal_segment_bytes": 256}
    newer, twin, fine, roomy = await _checkpointed_then_stepped(make_engine, spill, clock, **small)
    assert jr.CREATE not in _kinds(spill, newer.session_id)  # its creation's segment: gone
    checkpoint = spill / f"{newer.session_id}.spill"
    set_spill_magic(checkpoint, NEWER_SPILL)
    kept = checkpoint.read_bytes()

    second = await make_engine(spill_dir=spill, clock=clock, **OPTS, **small)
    await _refused(second, newer.session_id)
    assert (await second.feed(fine.session_id, toks(9))).position == 2
    assert second.stats().damaged_checkpoints == 0
    clock.advance(3600.0)
    assert await second.sweep_expired() == 0
    await second.stop()  # a clean stop trims every segment it does not keep
    third = await make_engine(spill_dir=spill, clock=clock, **OPTS, **small)
    await _refused(third, newer.session_id)
    await crash(third)
    assert checkpoint.read_bytes() == kept

    set_spill_magic(checkpoint, spill_record.MAGIC)
    last = await make_engine(spill_dir=spill, clock=clock, **OPTS, **small)
    assert last.get_session(newer.session_id).position == 3
    got = await last.feed(newer.session_id, toks(4))
    want = await roomy.feed(twin.session_id, toks(4))
    assert got.position == 4 and close(got.prediction, want.prediction)


async def test_a_newer_checkpoint_whose_whole_history_is_readable_is_rebuilt_from_it(
    make_engine: EngineFactory, tmp_path
) -> None:
    """The journal still holds its creation and every step, in records this server reads: as
    for a damaged checkpoint, the session is rebuilt from them, nothing lost (as before)."""
    spill = tmp_path / "state"
    newer, twin, _fine, roomy = await _checkpointed_then_stepped(make_engine, spill, FakeClock())
    assert _kinds(spill, newer.session_id)[0] == jr.CREATE
    set_spill_magic(spill / f"{newer.session_id}.spill", NEWER_SPILL)

    second = await make_engine(spill_dir=spill, **OPTS)
    got = await second.feed(newer.session_id, toks(4))
    want = await roomy.feed(twin.session_id, toks(4))
    assert got.position == 4 and close(got.prediction, want.prediction)


async def test_a_newer_checkpoint_with_a_newer_record_after_it_is_refused_not_rebuilt_short(
    make_engine: EngineFactory, tmp_path
) -> None:
    """Its whole history is journaled, but its last step's record is a newer server's too.
    Before, that record was skipped and the session rebuilt from the rest: a step short."""
    spill = tmp_path / "state"
    newer, *_ = await _checkpointed_then_stepped(make_engine, spill, FakeClock())
    set_spill_magic(spill / f"{newer.session_id}.spill", NEWER_SPILL)
    assert set_journal_version(spill / "journal", newer.session_id, 2, jr.VERSION, NEWER_JOURNAL)

    second = await make_engine(spill_dir=spill, **OPTS)
    await _refused(second, newer.session_id)


def _damage_step(journal, session_id: str, position: int) -> int:  # type: ignore[no-untyped-def]
    """Flip the last byte of the session's step record at `position` (its CRC left failing),
    in every segment of `journal`; how many were damaged."""
    head = bytes([len(session_id)]) + session_id.encode() + position.to_bytes(8, "little")
    damaged = 0
    for segment in sorted(journal.glob("*.log")):
        data = bytearray(segment.read_bytes())
        at = 0
        while at + 8 <= len(data):
            size = 8 + int.from_bytes(data[at : at + 4], "little")
            body = at + 8
            if data[body + 1] == jr.TOKENS and data[body + 2 : body + 2 + len(head)] == head:
                data[at + size - 1] ^= 0xFF
                damaged += 1
            at += size
        segment.write_bytes(bytes(data))
    return damaged


async def test_a_newer_record_right_after_a_damaged_one_still_refuses_its_session(
    make_engine: EngineFactory, tmp_path
) -> None:
    """Another session's damaged record, then this one's last step a newer server's record.
    Before, reading on after the damage looked only for a readable record, so the newer one
    was passed over unseen: the session came back at position 2 of 3, answering as if nothing
    had happened. The damaged one's session is lost, as any is."""
    spill = tmp_path / "state"
    first = await make_engine(spill_dir=spill, **OPTS)
    damaged, _ = await first.create_session("tok", seed=1)
    newer, _ = await first.create_session("tok", seed=2)
    await first.feed(newer.session_id, toks(1))
    await first.feed(newer.session_id, toks(2))
    await first.feed(damaged.session_id, toks(1))
    await first.feed(newer.session_id, toks(3))  # right after the damaged record
    await first.feed(damaged.session_id, toks(2))
    await crash(first)
    journal = spill / "journal"
    assert set_journal_version(journal, newer.session_id, 2, jr.VERSION, NEWER_JOURNAL) == 1
    assert _damage_step(journal, damaged.session_id, 0) == 1

    second = await make_engine(spill_dir=spill, **OPTS)
    await _refused(second, newer.session_id)
    with pytest.raises(SeqServeError) as lost:
        await second.feed(damaged.session_id, toks(9))
    assert lost.value.status == grpc.StatusCode.DATA_LOSS


async def test_a_start_without_the_journal_says_the_records_kept_stay_until_closed(
    make_engine: EngineFactory, tmp_path
) -> None:
    """The records kept for a refused session stay through a clean stop with the journal, so a
    start without it is refused again and again. Before, the refusal said that a start with
    the journal recovers them and its clean stop deletes them: an operator who did so was
    refused again, with the same advice."""
    spill = tmp_path / "state"
    first = await make_engine(spill_dir=spill, **OPTS)
    newer, _ = await first.create_session("tok")
    await first.feed(newer.session_id, toks(1))
    await crash(first)
    assert set_journal_version(spill / "journal", newer.session_id, 0, jr.VERSION, NEWER_JOURNAL)
    second = await make_engine(spill_dir=spill, **OPTS)
    await second.stop()  # as the refusal advises: a start with the journal, a clean stop
    with pytest.raises(SpillDirUnusable, match="stay until their owners close them"):
        await make_engine(spill_dir=spill, durability="shutdown", **OPTS)
