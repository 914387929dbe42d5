"""The composition root: what the settings choose."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.sessions.spill_tier import SpillTier
from service.settings import SessionSettings, Settings
from service.wiring import build_engine

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("durability", "fsync", "ordered"),
    [
        ("journal", "interval", True),
        ("journal", "batch", True),
        ("journal", "never", False),
        ("shutdown", "interval", False),
    ],
)
def test_records_are_ordered_before_their_names_where_a_power_loss_is_promised(
    tmp_path: Path, durability: str, fsync: str, ordered: bool
) -> None:
    """The spill tier truncates a spare before writing it (its data on the disk before a name
    points at it) exactly where the settings promise to survive a power loss."""
    settings = Settings(
        model_store=REPO / "model_store",
        sessions=SessionSettings(spill_dir=tmp_path / "state", durability=durability, fsync=fsync),
    )
    engine = build_engine(settings)
    assert isinstance(engine.spill, SpillTier)
    assert engine.spill.ordered is ordered
