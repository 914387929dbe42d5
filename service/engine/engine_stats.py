"""What the engine reports for the metrics gauges, and that report read from its parts
(`snapshot`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from service.engine.durability import Durability
from service.engine.replay import PendingReplays
from service.engine.served_versions import ServedVersions
from service.engine.session_residency import SessionResidency
from service.runtime.state_pool import ByteBudget
from service.sessions.session_store import SessionStore
from service.sessions.state_tier import Checkpoints


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


def snapshot(
    sessions: SessionStore,
    replays: PendingReplays,
    tier: Checkpoints,
    budget: ByteBudget,
    durability: Durability,
    residency: SessionResidency,
    versions: ServedVersions,
) -> EngineStats:
    """The engine's stats as its parts count them now."""
    held = len(sessions)
    in_memory = sessions.resident_count
    replaying = replays.replaying
    return EngineStats(
        sessions_in_memory=in_memory,
        sessions_spilled=held - in_memory - replaying,
        sessions_replaying=replaying,
        spilled_bytes=tier.bytes_used,
        pool_capacity_bytes=budget.limit_bytes,
        journal_write_failures=durability.journal.failed_writes if durability.journal else 0,
        end_records_lost=durability.end_records_lost,
        state_write_failures=residency.writer.write_failures,
        damaged_checkpoints=residency.damaged_checkpoints,
        journal_damaged_records=durability.damaged_records,
        state_writes=residency.writer.writes,
        state_write_seconds=residency.writer.write_seconds,
        versions=[
            VersionStats(
                model=sv.name,
                version=sv.version,
                queue_depth=sv.scheduler.queue_depth,
                state_bytes=sv.pool.used_slots * sv.pool.bytes_per_slot,
            )
            for sv in versions.served()
        ],
    )
