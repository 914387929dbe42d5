"""Fixtures for tests over real gRPC on loopback: a store of small random models and an
in-process server bound to port 0.

`server_factory` starts servers with other settings (small limits, another store); every server
it starts is stopped at teardown. Servers here run without the metrics HTTP endpoint (shutting
it down costs ~0.5 s per test); pass `server={"metrics_port": 0}` to get one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from service.api.server import SeqServeServer
from service.client.client import SeqServeClient
from service.models import ModelConfig, SequenceModel
from service.registry.manifest import Training
from service.registry.store import ModelStore
from service.settings import (
    EngineSettings,
    SecuritySettings,
    ServerSettings,
    SessionSettings,
    Settings,
)

from .certs import Certs, make_certs

TOKEN_CONFIG = ModelConfig(
    cell="lstm", num_layers=2, hidden_size=24, input_kind="tokens", input_dim=256,
    embed_dim=12, head_kind="classification", output_dim=256,
)  # fmt: skip
FRAME_CONFIG = ModelConfig(
    cell="gru", num_layers=2, hidden_size=16, input_kind="features", input_dim=3,
    embed_dim=8, head_kind="regression", output_dim=2, reset_after=False,
)  # fmt: skip

ServerFactory = Callable[..., Awaitable[SeqServeServer]]


def publish_random(store: ModelStore, name: str, config: ModelConfig, seed: int) -> None:
    torch.manual_seed(seed)
    model = SequenceModel(config)
    store.publish(
        name, config, model.state_dict(), description=f"random {name}",
        training=Training(data="random init", steps=0, seed=seed),
    )  # fmt: skip


@pytest.fixture
def store_root(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    store = ModelStore(root)
    publish_random(store, "tok", TOKEN_CONFIG, seed=1)
    publish_random(store, "frames", FRAME_CONFIG, seed=2)
    return root


def make_settings(
    store_root: Path,
    tmp_path: Path,
    *,
    server: dict[str, Any] | None = None,
    sessions: dict[str, Any] | None = None,
    security: dict[str, Any] | None = None,
    **engine: object,
) -> Settings:
    """Test settings: port 0, no metrics endpoint, no store polling; `server`, `sessions`,
    `security` and the keyword arguments (engine settings) override single fields."""
    return Settings(
        model_store=store_root,
        registry_poll_seconds=0,
        server=ServerSettings(
            **{"port": 0, "metrics_port": -1, "http_port": -1, "grace_seconds": 2.0,
               **(server or {})}
        ),
        engine=EngineSettings(**engine),  # type: ignore[arg-type]
        sessions=SessionSettings(**{"spill_dir": tmp_path / "spill", **(sessions or {})}),
        security=SecuritySettings(**(security or {})),
    )  # fmt: skip


@pytest.fixture
async def server_factory(store_root: Path, tmp_path: Path) -> AsyncIterator[ServerFactory]:
    """`await server_factory(store_root=..., server={...}, sessions={...}, **engine)`."""
    started: list[SeqServeServer] = []

    async def start(
        *,
        store_root: Path = store_root,
        server: dict[str, Any] | None = None,
        sessions: dict[str, Any] | None = None,
        security: dict[str, Any] | None = None,
        **engine: object,
    ) -> SeqServeServer:
        work = tmp_path / f"server{len(started)}"
        settings = make_settings(
            store_root, work, server=server, sessions=sessions, security=security, **engine
        )
        srv = SeqServeServer(settings)
        await srv.start()
        started.append(srv)
        return srv

    try:
        yield start
    finally:
        for srv in reversed(started):
            await srv.stop()


@pytest.fixture
async def server(server_factory: ServerFactory) -> SeqServeServer:
    return await server_factory()


@pytest.fixture
async def client(server: SeqServeServer) -> AsyncIterator[SeqServeClient]:
    async with SeqServeClient(f"127.0.0.1:{server.port}") as c:
        yield c


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """Certificates for TLS tests (see `certs.py`)."""
    return make_certs(tmp_path_factory.mktemp("certs"))
