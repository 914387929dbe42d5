"""What the engine reports for the metrics gauges."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class VersionStats:
    model: str
    version: int
    queue_depth: int  # rows waiting for a step
    state_bytes: int  # bytes of its pool's slots in use


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for the metrics gauges."""

    sessions_in_memory: int
    sessions_spilled: int
    sessions_replaying: int  # recovered, their journaled steps still to be replayed
    spilled_bytes: int  # on disk in the spill tier
    pool_capacity_bytes: int  # the byte budget shared by the pools
    journal_write_failures: int = 0  # steps refused because the journal could not be written
    end_records_lost: int = 0  # session ends the journal could not record
    state_write_failures: int = 0  # state records (checkpoints, evictions) the tier refused
    journal_damaged_records: int = 0  # journal records recovery found damaged
    damaged_checkpoints: int = 0  # sessions whose checkpoint was found damaged
    state_writes: int = 0  # checkpoints and evictions the state tier took
    state_write_seconds: float = 0.0  # the wall time those writes took
    versions: list[VersionStats] = field(default_factory=list)
