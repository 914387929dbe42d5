"""One client session: a handle on a state-pool slot, pinned to one model version."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from service.runtime.sampler import SamplingParams, SessionRng


def new_session_id() -> str:
    """Unguessable: 128 random bits, URL-safe."""
    return "s_" + secrets.token_urlsafe(16)


@dataclass
class Session:
    session_id: str
    model: str
    version: int  # the exact version it was created on, forever
    fingerprint: str  # weights digest + architecture; checked on restore
    slot: int | None  # state-pool slot while in memory; None while spilled
    rng: SessionRng
    default_sampling: SamplingParams
    ttl_seconds: float
    created_at: float  # wall clock, seconds since the epoch
    last_used: float  # the store's clock (monotonic), for TTL and LRU
    seed: int = 0  # the RNG's starting seed (given or chosen), reported so runs can be repeated
    parent_session_id: str = ""  # set on forks
    position: int = 0  # inputs consumed so far, generated tokens included
    busy: bool = False  # a request is running on it (one at a time, never interleaved)
    closed: bool = False
    spilled: bool = field(default=False)  # its state lives in the spill tier, not the pool

    def expires_at(self, clock_now: float, wall_now: float) -> float:
        """Wall-clock expiry time, from the idle clock."""
        return wall_now + max(0.0, self.last_used + self.ttl_seconds - clock_now)
