"""Fixtures for the model store tests: a store under tmp_path and small seeded models."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from service.models import ModelConfig, SequenceModel
from service.registry.manifest import Manifest, Training
from service.registry.store import ModelStore

FRAME_DIM = 3
REG_DIM = 2


def small_config(
    cell: str = "lstm",
    input_kind: str = "tokens",
    head_kind: str | None = None,
    reset_after: bool = True,
    num_layers: int = 2,
) -> ModelConfig:
    """A tiny model; token models use the byte vocabulary (256) so the default tokenizer fits."""
    head = head_kind or ("classification" if input_kind == "tokens" else "regression")
    input_dim = 256 if input_kind == "tokens" else FRAME_DIM
    return ModelConfig(
        cell=cell,  # type: ignore[arg-type]
        num_layers=num_layers,
        hidden_size=8,
        input_kind=input_kind,  # type: ignore[arg-type]
        input_dim=input_dim,
        embed_dim=6,
        head_kind=head,  # type: ignore[arg-type]
        output_dim=input_dim if head == "classification" else REG_DIM,
        reset_after=reset_after,
    )


def seeded_model(config: ModelConfig, seed: int = 0) -> SequenceModel:
    torch.manual_seed(seed)
    return SequenceModel(config).eval()


def sample_inputs(config: ModelConfig, steps: int = 5, seed: int = 1) -> torch.Tensor:
    """One row: tokens [1, T] or frames [1, T, D]."""
    gen = torch.Generator().manual_seed(seed)
    if config.input_kind == "tokens":
        return torch.randint(0, config.input_dim, (1, steps), generator=gen)
    return torch.randn(1, steps, config.input_dim, generator=gen)


def outputs(model: SequenceModel, inputs: torch.Tensor) -> torch.Tensor:
    """Head output after the last input, from a zero state."""
    out, _ = model.run_chunk(inputs, model.zero_state(1), torch.tensor([inputs.shape[1]]))
    return out


PublishFn = Callable[..., tuple[Manifest, SequenceModel]]


@pytest.fixture
def store(tmp_path) -> ModelStore:
    return ModelStore(tmp_path / "store")


@pytest.fixture
def publish(store: ModelStore) -> PublishFn:
    """publish(name, config=None, seed=0) → (manifest, the original model)."""

    def _publish(
        name: str, config: ModelConfig | None = None, seed: int = 0
    ) -> tuple[Manifest, SequenceModel]:
        config = config or small_config()
        model = seeded_model(config, seed)
        manifest = store.publish(
            name,
            config,
            model.state_dict(),
            description=f"{name} seed {seed}",
            training=Training(data="random init", steps=0, seed=seed),
        )
        return manifest, model

    return _publish
