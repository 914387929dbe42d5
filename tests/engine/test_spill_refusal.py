"""A spill record that is damaged, missing or from other weights is refused, never used."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from service.errors import DataLoss, FailedPrecondition, SpillCorrupted, SpillMismatch
from service.registry.store import ModelStore
from service.sessions import spill_record

from .conftest import TOK, EngineFactory, publish, same, toks


def _flip_byte_in_state(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-40] ^= 0x01  # the last float of the state, just before the checksum
    path.write_bytes(bytes(data))


def _flip_byte_in_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    at = data.index(b'"position":') + len(b'"position":')
    data[at] = ord("7") if data[at] != ord("7") else ord("8")
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00not a spill record at all" * 20)


def _delete(path: Path) -> None:
    path.unlink()


DAMAGE: dict[str, Callable[[Path], None]] = {
    "state byte flipped": _flip_byte_in_state,
    "header byte flipped": _flip_byte_in_header,
    "truncated": _truncate,
    "garbage": _garbage,
    "deleted": _delete,
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=list(DAMAGE))
async def test_damaged_record_is_data_loss_while_running(
    make_engine: EngineFactory, damage: Callable[[Path], None]
) -> None:
    engine = await make_engine(slots=1)
    roomy = await make_engine()
    victim, _ = await engine.create_session("tok", seed=1)
    await engine.feed(victim.session_id, toks(1, 2, 3))
    other, _ = await engine.create_session("tok", seed=2)  # evicts `victim`
    ref, _ = await roomy.create_session("tok", seed=2)
    damage(engine.spill.path(victim.session_id))
    with pytest.raises(SpillCorrupted) as err:
        await engine.feed(victim.session_id, toks(4))
    assert isinstance(err.value, DataLoss)
    with pytest.raises(SpillCorrupted):  # refused every time, not used on a retry
        await engine.fork_session(victim.session_id)
    # Nothing else is disturbed, and the refused session can still be closed.
    got, want = (
        await engine.feed(other.session_id, toks(9)),
        await roomy.feed(ref.session_id, toks(9)),
    )
    assert same(got.prediction, want.prediction)
    await engine.close_session(victim.session_id)
    assert not engine.spill.path(victim.session_id).exists()


@pytest.mark.parametrize(
    "damage", [_flip_byte_in_state, _truncate, _garbage], ids=["state", "truncated", "garbage"]
)
async def test_damaged_record_is_data_loss_after_a_restart(
    make_engine: EngineFactory, tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    spill = tmp_path / "shared-spill"
    first = await make_engine(spill_dir=spill)
    bad, _ = await first.create_session("tok", seed=1)
    good, _ = await first.create_session("tok", seed=2)
    await first.feed(bad.session_id, toks(5))
    await first.stop()
    damage(spill / f"{bad.session_id}.spill")
    second = await make_engine(spill_dir=spill)
    with pytest.raises(DataLoss):
        await second.feed(bad.session_id, toks(6))
    assert (await second.feed(good.session_id, toks(6))).position == 1


async def test_record_from_other_weights_is_failed_precondition(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    """An intact record (valid checksum) whose fingerprint is not the version's."""
    engine = await make_engine(slots=1)
    victim, _ = await engine.create_session("tok", seed=1)
    await engine.create_session("tok", seed=2)  # evicts `victim`
    path = engine.spill.path(victim.session_id)
    record = spill_record.decode(path.read_bytes(), str(path))
    forged = record.header.model_copy(update={"fingerprint": "0123456789abcdef"})
    path.write_bytes(spill_record.encode(spill_record.SpillRecord(forged, record.state)))
    with pytest.raises(SpillMismatch) as err:
        await engine.feed(victim.session_id, toks(1))
    assert isinstance(err.value, FailedPrecondition)
    assert "0123456789abcdef" in err.value.message


async def test_version_replaced_on_disk_refuses_its_spilled_sessions_after_restart(
    make_engine: EngineFactory, store_root: Path, tmp_path: Path
) -> None:
    """Someone rewrote tok/1 in place with other weights while the server was down."""
    spill = tmp_path / "shared-spill"
    first = await make_engine(spill_dir=spill)
    session, _ = await first.create_session("tok", "1")
    await first.feed(session.session_id, toks(1))
    await first.stop()
    store = ModelStore(store_root)
    publish(store, "tok", TOK, seed=77)  # version 2, other weights
    shutil.rmtree(store_root / "tok" / "1")
    (store_root / "tok" / "2").rename(store_root / "tok" / "1")
    manifest = store_root / "tok" / "1" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"version": 2', '"version": 1'))
    second = await make_engine(spill_dir=spill)
    with pytest.raises(SpillMismatch):
        await second.feed(session.session_id, toks(2))
