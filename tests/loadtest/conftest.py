"""Fixtures for load-generator tests: a store of two small random models (a token LSTM and a
feature-frame GRU) and a real in-process server on loopback, port 0."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from service.api.server import SeqServeServer
from service.models import ModelConfig, SequenceModel
from service.registry.manifest import Training
from service.registry.store import ModelStore
from service.settings import EngineSettings, ServerSettings, SessionSettings, Settings

TOKEN_CONFIG = ModelConfig(
    cell="lstm", num_layers=1, hidden_size=16, input_kind="tokens", input_dim=256,
    embed_dim=8, head_kind="classification", output_dim=256,
)  # fmt: skip
FRAME_CONFIG = ModelConfig(
    cell="gru", num_layers=1, hidden_size=8, input_kind="features", input_dim=3,
    embed_dim=4, head_kind="regression", output_dim=2, reset_after=True,
)  # fmt: skip


@pytest.fixture
def store_root(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    store = ModelStore(root)
    for seed, (name, config) in enumerate((("tok", TOKEN_CONFIG), ("frames", FRAME_CONFIG))):
        torch.manual_seed(seed)
        store.publish(
            name, config, SequenceModel(config).state_dict(), description=f"random {name}",
            training=Training(data="random init", steps=0, seed=seed),
        )  # fmt: skip
    return root


@pytest.fixture
async def server(store_root: Path, tmp_path: Path) -> AsyncIterator[SeqServeServer]:
    settings = Settings(
        model_store=store_root,
        registry_poll_seconds=0,
        server=ServerSettings(port=0, metrics_port=-1, http_port=-1, grace_seconds=0.5),
        engine=EngineSettings(),
        sessions=SessionSettings(spill_dir=tmp_path / "spill"),
    )
    srv = SeqServeServer(settings)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.fixture
def target(server: SeqServeServer) -> str:
    return f"127.0.0.1:{server.port}"
