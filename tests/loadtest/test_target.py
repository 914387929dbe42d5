"""`fetch_model_info`: the load generator reads a version spec by the store's rule, against a
real in-process server whose store has two versions and an alias."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from service.loadtest import TargetError
from service.loadtest.target import fetch_model_info, open_channel
from service.models import SequenceModel
from service.registry.manifest import Training
from service.registry.store import ModelStore
from tests.loadtest.conftest import TOKEN_CONFIG


@pytest.fixture
def two_versions(store_root: Path) -> None:
    """`tok` gets a version 2 and the alias `stable` → 1, before the server starts."""
    store = ModelStore(store_root)
    torch.manual_seed(7)
    store.publish(
        "tok", TOKEN_CONFIG, SequenceModel(TOKEN_CONFIG).state_dict(), description="v2",
        training=Training(data="random init", steps=0, seed=7),
    )  # fmt: skip
    store.set_alias("tok", "stable", 1)


@pytest.mark.parametrize(
    ("spec", "version"),
    [("", 2), ("latest", 2), (" latest ", 2), ("1", 1), (" 1 ", 1), ("2", 2), ("stable", 1)],
)
async def test_a_spec_resolves_as_the_store_resolves_it(
    two_versions: None, target: str, store_root: Path, spec: str, version: int
) -> None:
    assert ModelStore(store_root).resolve("tok", spec) == version  # the store's own reading
    channel = open_channel(target)
    try:
        info = await fetch_model_info(channel, "tok", spec)
    finally:
        await channel.close()
    assert (info.name, info.version, info.input_kind, info.input_size) == (
        "tok", version, "tokens", 256,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("spec", "error"),
    [("beta", "no alias 'beta'"), ("\u0661", "no alias"), ("3", "no version 3")],
)
async def test_a_spec_the_store_refuses_is_refused(
    two_versions: None, target: str, spec: str, error: str
) -> None:
    # "\u0661" (ARABIC-INDIC DIGIT ONE) passes str.isdigit, but names no version in the store
    channel = open_channel(target)
    try:
        with pytest.raises(TargetError, match=error):
            await fetch_model_info(channel, "tok", spec)
    finally:
        await channel.close()
