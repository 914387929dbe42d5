"""`fetch_model_info`: the load generator reads a version spec as the server does for a new
session, against a real in-process server whose store has a refused newest version, an alias,
and a model with no usable version at all."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from service.loadtest import TargetError
from service.loadtest.target import fetch_model_info, open_channel
from service.models import ModelConfig, SequenceModel
from service.registry.manifest import Training
from service.registry.store import ModelStore
from service.registry.version_rule import VersionRule
from tests.loadtest.conftest import TOKEN_CONFIG


def _publish(store: ModelStore, name: str, config: ModelConfig, seed: int) -> None:
    torch.manual_seed(seed)
    store.publish(
        name, config, SequenceModel(config).state_dict(), description=f"seed {seed}",
        training=Training(data="random init", steps=0, seed=seed),
    )  # fmt: skip


def _break_weights(store: ModelStore, name: str, version: int) -> None:
    """Flip the last byte of a version's weights: the server refuses it (digest mismatch)."""
    path = store.root / name / str(version) / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def versions(store_root: Path) -> None:
    """Before the server starts: `tok` gets a version 2, the alias `stable` → 1, and a version 3
    whose weights are broken (the newest, refused); `frames`' only version is broken too."""
    store = ModelStore(store_root)
    _publish(store, "tok", TOKEN_CONFIG, 7)
    store.set_alias("tok", "stable", 1)
    _publish(store, "tok", TOKEN_CONFIG, 8)
    _break_weights(store, "tok", 3)
    _break_weights(store, "frames", 1)


@pytest.mark.parametrize(
    ("spec", "version"),
    [("", 2), ("latest", 2), (" latest ", 2), ("1", 1), (" 1 ", 1), ("2", 2), ("stable", 1)],
)
async def test_a_spec_resolves_as_the_server_resolves_it(
    versions: None, target: str, store_root: Path, spec: str, version: int
) -> None:
    entry = ModelStore(store_root).model("tok")
    assert VersionRule().version_for(entry, spec) == version  # the server's own reading
    channel = open_channel(target)
    try:
        info = await fetch_model_info(channel, "tok", spec)
    finally:
        await channel.close()
    assert (info.name, info.version, info.input_kind, info.input_size) == (
        "tok", version, "tokens", 256,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("model", "spec", "error"),
    [
        ("tok", "beta", "no alias 'beta'"),
        ("tok", "\u0661", "no alias"),  # ARABIC-INDIC DIGIT ONE: str.isdigit, but no version
        ("tok", "4", "no version 4"),
        ("tok", "9" * 20, "no version '9{20}'"),  # more digits than any version has
        ("tok", "9" * 5000, r"no version '9{100}'\.\.\. \(5000 characters\)"),  # was ValueError
        ("frames", "", "no usable version"),
        ("frames", "latest", "no usable version"),
    ],
)
async def test_a_spec_the_server_refuses_is_refused(
    versions: None, target: str, model: str, spec: str, error: str
) -> None:
    channel = open_channel(target)
    try:
        with pytest.raises(TargetError, match=error):
            await fetch_model_info(channel, model, spec)
    finally:
        await channel.close()
