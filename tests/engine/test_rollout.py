"""Version rollouts made on disk while serving: new sessions follow the alias, existing ones stay
on their version until they end, broken versions are refused for new sessions only."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from service.errors import DataLoss, DigestMismatch, VersionUnusable
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


async def test_new_sessions_read_the_store_on_its_reader_thread_not_the_loop(
    make_engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = await make_engine()
    await engine.create_session("tok")  # version 1 loaded (the loader reads the store too)
    threads: list[str] = []
    real = engine.versions.store.model

    def model(name: str) -> object:
        threads.append(threading.current_thread().name)
        return real(name)

    monkeypatch.setattr(engine.versions.store, "model", model)
    made = await asyncio.gather(*(engine.create_session("tok") for _ in range(5)))
    assert [s.version for s, _ in made] == [1] * 5
    assert threads == ["store-reader_0"] * 5  # one reading per session, none on the loop
