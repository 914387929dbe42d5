"""Fixtures for engine tests: a store of tiny random models, engines with small pools and a
controllable clock, and a reference engine whose pool never fills (so nothing is evicted)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import torch

from benchmarks.real_services import RedisServer
from service.engine.served_version import VersionObserver
from service.engine.session_engine import ModelInput, SessionEngine
from service.models import ModelConfig, SequenceModel
from service.registry.manifest import Training
from service.registry.store import ModelStore
from service.runtime.step_batch import Prediction, StepBatch
from service.sessions.redis_state import RedisState
from service.sessions.session import Session
from service.sessions.session_store import SessionStore
from service.sessions.sqlite_state import SqliteState
from service.settings import EngineSettings, SecuritySettings, SessionSettings, Settings
from service.wiring import build_engine
from tests.polling import until

TOK = ModelConfig(
    cell="lstm", num_layers=2, hidden_size=8, input_kind="tokens", input_dim=256,
    embed_dim=6, head_kind="classification", output_dim=256,
)  # fmt: skip
FRAMES = ModelConfig(
    cell="gru", num_layers=1, hidden_size=6, input_kind="features", input_dim=3,
    embed_dim=4, head_kind="regression", output_dim=2, reset_after=False,
)  # fmt: skip
TOK_SLOT_BYTES = 4 * TOK.state_numel()  # one session's state in the pool (h and c)


class FakeClock:
    """Both clocks a SessionStore reads (monotonic and wall), moved by hand."""

    def __init__(self, start: float = 1_000.0, wall: float = 1.7e9) -> None:
        self.now = start
        self.wall_now = wall

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.wall_now

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.wall_now += seconds


class RecordingObserver(VersionObserver):
    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []

    def on_session_event(self, event: str, model: str, version: str) -> None:
        self.events.append((event, model, version))

    def count(self, event: str) -> int:
        return sum(1 for e in self.events if e[0] == event)


def publish(store: ModelStore, name: str, config: ModelConfig, seed: int) -> int:
    torch.manual_seed(seed)
    model = SequenceModel(config)
    manifest = store.publish(
        name, config, model.state_dict(), description=f"random {name} seed {seed}",
        training=Training(data="random init", steps=0, seed=seed),
    )  # fmt: skip
    return manifest.version


@pytest.fixture
def store_root(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    store = ModelStore(root)
    publish(store, "tok", TOK, seed=1)
    publish(store, "frames", FRAMES, seed=2)
    return root


EngineFactory = Callable[..., Awaitable[SessionEngine]]


@pytest.fixture
async def make_engine(store_root: Path, tmp_path: Path) -> AsyncIterator[EngineFactory]:
    """`await make_engine(slots=N, spill_dir=..., clock=FakeClock(), observer=..., notify=...,
    **sessions)`: a started engine whose pool holds `slots` TOK sessions (None: plenty).
    Stopped at teardown unless the test stopped it."""
    started: list[SessionEngine] = []

    async def start(
        *,
        slots: int | None = None,
        spill_dir: Path | None = None,
        clock: FakeClock | None = None,
        observer: VersionObserver | None = None,
        engine: dict[str, Any] | None = None,
        security: dict[str, Any] | None = None,
        notify: bool = True,
        **sessions: Any,
    ) -> SessionEngine:
        if slots is not None:
            sessions.setdefault("pool_bytes", slots * TOK_SLOT_BYTES)
            sessions.setdefault("pool_initial_slots", slots)
        sessions.setdefault("spill_dir", spill_dir or tmp_path / f"spill{len(started)}")
        settings = Settings(
            model_store=store_root,
            registry_poll_seconds=0,
            registry_notify=notify,
            engine=EngineSettings(**(engine or {})),
            sessions=SessionSettings(**sessions),
            security=SecuritySettings(**(security or {})),
        )
        store = (
            SessionStore(settings.sessions.max_sessions, clock=clock, wall_clock=clock.wall)
            if clock is not None
            else None
        )
        eng = build_engine(settings, observer=observer, sessions=store)
        await eng.start()
        started.append(eng)
        return eng

    try:
        yield start
    finally:
        for eng in reversed(started):
            await eng.stop()


async def crash(engine: SessionEngine) -> None:
    """What a SIGKILL leaves: the steps in flight finish or not, nothing is spilled, the
    journal's writes are in the OS, and the directory lock goes with the process."""
    replays = engine.leases.replays
    for task in [*engine._loops, *replays._tasks, *([replays._drain] if replays._drain else [])]:
        task.cancel()
    await engine.versions.stop_schedulers()
    assert engine.durability.journal is not None
    engine.durability.journal.close()
    engine.spill.close()
    engine._stopped = True  # the fixture must not stop (spill) it


async def wait_idle(*sessions: Session) -> None:
    """Until the scheduler has retired cancelled generations (it does so between steps)."""
    await until(  # a loaded host may take seconds
        lambda: not any(s.busy for s in sessions), 60, "the sessions to be idle", interval=0.001
    )


def toks(*ids: int) -> ModelInput:
    return ModelInput(tokens=list(ids))


def frames(*values: float) -> ModelInput:
    """Feature frames for FRAMES (a multiple of 3 values)."""
    return ModelInput(frames=list(values))


def same(a: Prediction, b: Prediction) -> bool:
    """Bit-identical predictions (same ids, same probabilities, same values)."""
    return (a.top_ids, a.top_probs, a.values) == (b.top_ids, b.top_probs, b.values)


def close(a: Prediction, b: Prediction, tol: float = 1e-5) -> bool:
    """Equal up to float rounding: for the same history fed in other chunkings (a chunk runs
    the whole-sequence kernel, a single token the fused step)."""
    return (
        a.top_ids == b.top_ids
        and all(abs(x - y) <= tol for x, y in zip(a.top_probs, b.top_probs, strict=True))
        and all(abs(x - y) <= tol for x, y in zip(a.values, b.values, strict=True))
        and len(a.values) == len(b.values)
    )


@contextlib.contextmanager
def slow_steps(
    engine: SessionEngine, seconds: float = 0.3, *, fail: bool = False
) -> Iterator[asyncio.Event]:
    """Each step of `tok` v1 takes `seconds` longer (on the runner thread: build the engine
    with `engine={"inline_max_rows": 0}`), and with `fail` then fails (applies nothing); the
    event is set when one starts, so a test can cancel a call while its row is in a step."""
    served = engine.versions.find("tok", 1)
    assert served is not None
    execute = served.runner.execute
    started = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow(batch: StepBatch):  # type: ignore[no-untyped-def]
        loop.call_soon_threadsafe(started.set)
        time.sleep(seconds)
        if fail:
            raise RuntimeError("the step failed")
        return execute(batch)

    served.runner.execute = slow  # type: ignore[method-assign]
    try:
        yield started
    finally:
        served.runner.execute = execute  # type: ignore[method-assign]


async def settled(session: Session, position: int) -> None:
    """Until `session` is at `position` and no step holds it (a cancelled call's step)."""
    await until(  # a loaded host may take seconds
        lambda: session.position == position and not session.busy,
        60,
        f"the session to be at {position} and not busy",
        detail=lambda: f"session at {session.position}, busy {session.busy}",
    )


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server on 127.0.0.1, one per test module."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.kill()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis.Redis.from_url(redis_server.url).flushall()
    return redis_server.url


@pytest.fixture(params=["redis", "sqlite"])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each shared backend: Redis (replicas), SQLite in the state directory (workers)."""
    if request.param == "redis":
        return str(request.getfixturevalue("redis_url"))
    return f"sqlite:{tmp_path / 'shared' / 'state.db'}"


def slow_takes(
    monkeypatch: pytest.MonkeyPatch, slowed: Callable[[int], bool]
) -> tuple[threading.Event, threading.Event]:
    """The shared tiers' quota takes (Redis and SQLite) of a charge `slowed` picks take 0.2 s,
    on their thread, as a slow round trip: a cancel comes meanwhile. → (set when such a take
    begins, set when it is done)."""
    taking, taken = threading.Event(), threading.Event()
    for tier in (RedisState, SqliteState):
        take = tier.take_tokens

        def slow(self, owner: str, tokens: int, rate: float, take=take) -> float:  # type: ignore[no-untyped-def]
            if not slowed(tokens):
                return take(self, owner, tokens, rate)
            taking.set()
            time.sleep(0.2)
            try:
                return take(self, owner, tokens, rate)
            finally:
                taken.set()

        monkeypatch.setattr(tier, "take_tokens", slow)
    return taking, taken
