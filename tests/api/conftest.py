"""Fixtures for tests over real gRPC on loopback: a store of small random models and an
in-process server bound to port 0."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from service.api.server import SeqServeServer
from service.client.client import SeqServeClient
from service.models import ModelConfig, SequenceModel
from service.registry.manifest import Training
from service.registry.store import ModelStore
from service.settings import EngineSettings, ServerSettings, SessionSettings, Settings

TOKEN_CONFIG = ModelConfig(
    cell="lstm", num_layers=2, hidden_size=24, input_kind="tokens", input_dim=256,
    embed_dim=12, head_kind="classification", output_dim=256,
)  # fmt: skip
FRAME_CONFIG = ModelConfig(
    cell="gru", num_layers=2, hidden_size=16, input_kind="features", input_dim=3,
    embed_dim=8, head_kind="regression", output_dim=2, reset_after=False,
)  # fmt: skip


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


def make_settings(store_root: Path, tmp_path: Path, **engine: object) -> Settings:
    return Settings(
        model_store=store_root,
        registry_poll_seconds=0,
        server=ServerSettings(port=0, metrics_port=0, grace_seconds=2.0),
        engine=EngineSettings(**engine),  # type: ignore[arg-type]
        sessions=SessionSettings(spill_dir=tmp_path / "spill"),
    )


@pytest.fixture
async def server(store_root: Path, tmp_path: Path) -> AsyncIterator[SeqServeServer]:
    srv = SeqServeServer(make_settings(store_root, tmp_path))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.fixture
async def client(server: SeqServeServer) -> AsyncIterator[SeqServeClient]:
    async with SeqServeClient(f"127.0.0.1:{server.port}") as c:
        yield c
