"""Version rollouts made on disk while serving: new sessions follow the alias, existing ones stay
on their version until they end, broken versions are refused for new sessions only."""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path

import pytest

from service.engine.session_engine import SessionEngine
from service.errors import (
    DataLoss,
    DigestMismatch,
    ModelNotFound,
    SeqServeError,
    VersionUnusable,
)
from service.registry.store import ModelStore

from .conftest import TOK, EngineFactory, publish, same, toks


@pytest.fixture
def store(store_root: Path) -> ModelStore:
    return ModelStore(store_root)


async def test_alias_flip_moves_new_sessions_only(
    make_engine: EngineFactory, store: ModelStore
) -> None:
    engine = await make_engine()
    pinned = await make_engine()  # a reference that only ever runs version 1
    old, _ = await engine.create_session("tok")
    ref, _ = await pinned.create_session("tok", "1")
    assert old.version == 1
    publish(store, "tok", TOK, seed=2)  # version 2: `latest` moves on disk
    store.set_alias("tok", "production", 2)
    new, _ = await engine.create_session("tok")
    assert new.version == 2
    # The old session still answers with version 1's weights, the new one with version 2's.
    got = await engine.feed(old.session_id, toks(4, 5))
    want = await pinned.feed(ref.session_id, toks(4, 5))
    assert same(got.prediction, want.prediction)
    other = await engine.feed(new.session_id, toks(4, 5))
    assert not same(other.prediction, want.prediction)
    assert engine.versions.find("tok", 1) is not None
    # Flip back and forth: only new sessions follow.
    store.set_alias("tok", "production", 1)
    assert (await engine.create_session("tok"))[0].version == 1
    assert (await engine.create_session("tok", "2"))[0].version == 2
    assert engine.get_session(new.session_id).version == 2


async def test_old_version_unloads_after_its_last_session(
    make_engine: EngineFactory, store: ModelStore
) -> None:
    engine = await make_engine()
    a, _ = await engine.create_session("tok")
    b, _ = await engine.create_session("tok")
    publish(store, "tok", TOK, seed=2)
    await engine.create_session("tok")  # on version 2
    await engine.close_session(a.session_id)
    await engine.settle()
    assert engine.versions.find("tok", 1) is not None  # `b` still runs on it
    await engine.close_session(b.session_id)
    await engine.settle()
    assert engine.versions.find("tok", 1) is None
    assert engine.versions.find("tok", 2) is not None


async def test_poll_unloads_a_version_nothing_resolves_to_and_warms_the_new_one(
    make_engine: EngineFactory, store: ModelStore
) -> None:
    engine = await make_engine()
    s, _ = await engine.create_session("tok")
    await engine.close_session(s.session_id)
    await engine.settle()
    assert engine.versions.find("tok", 1) is not None  # still what new sessions get
    await engine.watcher.poll()
    publish(store, "tok", TOK, seed=2)
    await engine.watcher.poll()
    assert engine.versions.find("tok", 1) is None
    assert engine.versions.find("tok", 2) is not None  # warm before its first session


async def test_version_whose_files_vanish_takes_no_new_sessions(
    make_engine: EngineFactory, store: ModelStore, store_root: Path
) -> None:
    engine = await make_engine()
    publish(store, "tok", TOK, seed=2)
    running, _ = await engine.create_session("tok", "2")
    await engine.feed(running.session_id, toks(1))
    (store_root / "tok" / "2" / "weights.safetensors").unlink()
    with pytest.raises(VersionUnusable, match="missing"):
        await engine.create_session("tok", "2")
    assert (await engine.create_session("tok"))[0].version == 1  # latest is 1 again
    assert (await engine.feed(running.session_id, toks(2))).position == 2
    await engine.fork_session(running.session_id)  # an existing session's branch is fine


async def test_version_failing_its_digest_takes_no_new_sessions(
    make_engine: EngineFactory, store: ModelStore, store_root: Path
) -> None:
    engine = await make_engine()
    publish(store, "tok", TOK, seed=2)
    store.set_alias("tok", "production", 2)
    running, _ = await engine.create_session("tok")
    weights = store_root / "tok" / "2" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(DigestMismatch) as err:
        await engine.create_session("tok")
    assert isinstance(err.value, DataLoss)
    assert (await engine.feed(running.session_id, toks(3))).position == 1
    await engine.watcher.poll()  # still has a session: stays loaded
    assert engine.versions.find("tok", 2) is not None


def _count_readings(engine: SessionEngine, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The threads new sessions read the store's model folder on, one entry per reading, from
    now (a version's load reads it too, on a thread of its own: not counted)."""
    threads: list[str] = []
    real = engine.versions.store.model

    def model(name: str) -> object:
        thread = threading.current_thread().name
        assert thread != "MainThread"  # never on the event loop
        if thread.startswith("store-reader"):
            threads.append(thread)
        return real(name)

    monkeypatch.setattr(engine.versions.store, "model", model)
    return threads


async def test_new_sessions_read_the_store_on_its_reader_thread_and_again_only_after_a_change(
    make_engine: EngineFactory, store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = await make_engine()
    # The first reading (the loader reads the store too) watches the store's folders first.
    await engine.create_session("tok")
    threads = _count_readings(engine, monkeypatch)
    made = await asyncio.gather(*(engine.create_session("tok") for _ in range(5)))
    assert [s.version for s, _ in made] == [1] * 5
    assert threads == []  # nothing changed on disk: nothing read again
    publish(store, "tok", TOK, seed=2)  # a new folder in the model's folder
    assert (await engine.create_session("tok"))[0].version == 2
    assert threads == ["store-reader_0"]  # read again, on the reader thread
    store.set_alias("tok", "production", 1)  # aliases.json replaced
    assert (await engine.create_session("tok"))[0].version == 1
    (store.root / "tok" / "1" / "manifest.json").touch()  # its times only: read again all the same
    assert (await engine.create_session("tok"))[0].version == 1
    assert threads == ["store-reader_0"] * 3
    assert (await engine.create_session("tok"))[0].version == 1
    assert (await engine.create_session("tok", "2"))[
        0
    ].version == 2  # another spec: its own reading
    assert (await engine.create_session("tok", "2"))[0].version == 2
    assert threads == ["store-reader_0"] * 4


async def test_spellings_of_one_spec_share_one_reading(
    make_engine: EngineFactory, store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store strips a spec and reads digits as a number: "2", "02" and " 2 " are one kept
    reading; "latest" and "" (no production alias: the latest too) are readings of their own."""
    engine = await make_engine()
    publish(store, "tok", TOK, seed=2)
    await engine.create_session("tok", "2")
    threads = _count_readings(engine, monkeypatch)
    for spec in ("2", "02", " 2 ", "0002"):
        assert (await engine.create_session("tok", spec))[0].version == 2
    assert threads == []
    for spec in ("latest", " latest", ""):
        assert (await engine.create_session("tok", spec))[0].version == 2
    assert len(threads) == 2  # "latest" once (stripped), "" once


async def test_with_registry_notify_off_every_new_session_reads_the_store(
    make_engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = await make_engine(notify=False)
    await engine.create_session("tok")
    threads = _count_readings(engine, monkeypatch)
    made = await asyncio.gather(*(engine.create_session("tok") for _ in range(5)))
    assert [s.version for s, _ in made] == [1] * 5
    assert threads == ["store-reader_0"] * 5  # one reading per session, none on the loop


async def test_a_reading_during_which_the_store_changed_is_not_kept(
    make_engine: EngineFactory, store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = await make_engine()
    await engine.create_session("tok")  # kept
    (store.root / "tok" / "1" / "manifest.json").touch()  # no longer
    threads: list[str] = []
    real = engine.versions.store.model

    def model(name: str) -> object:
        entry = real(name)  # what this reading found: version 1 only
        if not threads:
            publish(store, "tok", TOK, seed=2)  # published just after it was read
        threads.append(threading.current_thread().name)
        return entry

    monkeypatch.setattr(engine.versions.store, "model", model)
    assert (await engine.create_session("tok"))[0].version == 1  # asked before the publish ended
    assert (await engine.create_session("tok"))[0].version == 2  # not the reading kept above
    assert threads.count("store-reader_0") == 2  # (a version's load reads it too)


async def test_a_store_whose_weights_are_symbolic_links_is_read_for_every_new_session(
    make_engine: EngineFactory, store_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = store_root / "tok" / "1" / "weights.safetensors"
    elsewhere = store_root.parent / "weights-elsewhere.safetensors"
    weights.rename(elsewhere)
    weights.symlink_to(elsewhere)  # a write to it changes no watched folder
    engine = await make_engine()
    await engine.create_session("tok")
    threads = _count_readings(engine, monkeypatch)
    await engine.create_session("tok")
    await engine.create_session("tok")
    assert threads == ["store-reader_0"] * 2


@pytest.mark.parametrize("name", ["..", "/tmp", "a\x00b"])
async def test_a_name_that_is_no_model_s_is_not_found_and_watches_nothing(
    make_engine: EngineFactory, name: str
) -> None:
    engine = await make_engine()
    await engine.create_session("tok")  # the store is watched
    with pytest.raises(ModelNotFound):
        await engine.create_session(name)
    assert (await engine.create_session("tok"))[0].version == 1


@pytest.mark.parametrize("how", ["changed", "deleted"])
async def test_a_create_refused_for_weights_changed_on_disk_names_them_within_the_store(
    make_engine: EngineFactory, store_root: Path, how: str
) -> None:
    """A loaded version whose weights changed or went since: the create is refused naming the
    file within the store, not where the store is on the server (the check of a served
    version's files passed its path through; a load's refusal did not)."""
    engine = await make_engine()
    await engine.create_session("tok")  # tok:1 loaded
    weights = store_root / "tok" / "1" / "weights.safetensors"
    if how == "changed":
        weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    else:
        weights.unlink()
    with pytest.raises(SeqServeError) as err:
        await engine.create_session("tok")
    assert "tok/1/weights.safetensors" in err.value.message
    assert str(store_root) not in err.value.message


def _republish(store: ModelStore, seed: int) -> str:
    """`tok` deleted from the store and published again: version 1 once more, other weights
    (a retrained model under the same number). Returns its fingerprint on disk."""
    shutil.rmtree(store.root / "tok")
    assert publish(store, "tok", TOK, seed=seed) == 1
    manifest = store.model("tok").usable(1).manifest
    assert manifest is not None
    return manifest.fingerprint()


async def test_a_version_republished_under_its_number_is_loaded_again_by_the_next_session(
    make_engine: EngineFactory, store: ModelStore
) -> None:
    """The loaded copy of the default version no session runs on, its model deleted and
    published again as version 1: the next new session unloads the copy and loads the files on
    disk, without a poll of the store (it was refused until the watcher unloaded the copy)."""
    engine = await make_engine()
    s, _ = await engine.create_session("tok")
    await engine.close_session(s.session_id)
    await engine.settle()
    old = engine.versions.find("tok", 1)
    assert old is not None  # the default version: kept loaded
    fingerprint = _republish(store, seed=9)
    assert fingerprint != old.fingerprint
    new, _ = await engine.create_session("tok")
    assert (new.version, new.fingerprint) == (1, fingerprint)
    served = engine.versions.find("tok", 1)
    assert served is not None and served is not old and served.fingerprint == fingerprint
    reference = await make_engine()  # started on the republished files
    ref, _ = await reference.create_session("tok")
    got = await engine.feed(new.session_id, toks(4, 5))
    want = await reference.feed(ref.session_id, toks(4, 5))
    assert same(got.prediction, want.prediction)


async def test_a_republished_version_with_sessions_serves_them_refuses_new_ones_then_reloads(
    make_engine: EngineFactory, store: ModelStore
) -> None:
    """A session still runs on the copy loaded: it keeps its weights, new sessions are refused
    (they would run on weights the store no longer holds); when it ends the copy is unloaded,
    though it is the default version, and the next session gets the files on disk."""
    engine = await make_engine()
    pinned = await make_engine()  # a reference that only ever runs the first version 1
    running, _ = await engine.create_session("tok")
    ref, _ = await pinned.create_session("tok")
    old = engine.versions.find("tok", 1)
    assert old is not None
    fingerprint = _republish(store, seed=9)
    with pytest.raises(VersionUnusable, match="manifest on disk changed"):
        await engine.create_session("tok")
    got = await engine.feed(running.session_id, toks(4, 5))
    want = await pinned.feed(ref.session_id, toks(4, 5))
    assert same(got.prediction, want.prediction)
    assert engine.versions.find("tok", 1) is old
    await engine.close_session(running.session_id)
    await engine.settle()
    assert engine.versions.find("tok", 1) is None  # outdated: kept for nothing
    new, _ = await engine.create_session("tok")
    assert (new.version, new.fingerprint) == (1, fingerprint)
