"""One client session: a handle on a state-pool slot (or a spill record), pinned to one version."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from typing import Any

from service.runtime.sampler import SamplingParams, SessionRng


def new_session_id() -> str:
    """Unguessable: 128 random bits, URL-safe (and so safe as a file name in the spill tier)."""
    return "s_" + secrets.token_urlsafe(16)


@dataclass(eq=False)  # identity semantics: two handles are the same session only if they are one
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
    # A step whose request was cancelled while the step may still be running: the session
    # stays busy until it settles, so nothing evicts, moves or frees the slot under it.
    pending_step: asyncio.Future[Any] | None = None

    @property
    def spilled(self) -> bool:
        """Its state lives in the spill tier, not the pool."""
        return self.slot is None

    def expires_at(self, clock_now: float, wall_now: float) -> float:
        """Wall-clock expiry time, from the idle clock."""
        return wall_now + max(0.0, self.last_used + self.ttl_seconds - clock_now)
