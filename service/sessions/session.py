"""One client session: a handle on a state-pool slot (or a spill record), pinned to one version."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from service.runtime.sampler import SamplingParams, SessionRng


def new_session_id() -> str:
    """Unguessable: 128 random bits, URL-safe (and so safe as a file name in the spill tier)."""
    return "s_" + secrets.token_urlsafe(16)


@dataclass
class AppliedRequest:
    """The last request applied to a session under a request id: a retry of it (same id, the
    position before it) gets the same reply again and applies nothing."""

    request_id: str
    position: int  # the session's position before the request
    reply: Any  # what answers the retry: a feed's outcome, a generation's log


@dataclass(eq=False)  # identity semantics: two handles are the same session only if they are one
class Session:
    """Created by the session lifecycle (or read back from the spill tier); changed afterwards
    only through `SessionStore`, which owns every live session."""

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
    busy: bool = False  # its lease is held: a request or generation runs on it
    closed: bool = False
    # Durability: steps journaled since the last checkpoint, and the journal segment holding
    # the oldest of them (None when everything is in the checkpoint).
    unsaved_steps: int = 0
    journal_segment: int | None = None
    last_request: AppliedRequest | None = None  # for exactly-once retries
    made_by: str = ""  # "create:<request id>" / "fork:<request id>": a retry finds it
    # Recovered at its position, its state still to be computed from the journal (replay.py).
    replay_pending: bool = False

    @property
    def spilled(self) -> bool:
        """Its state lives in the spill tier, not the pool."""
        return self.slot is None

    def expires_at(self, clock_now: float, wall_now: float) -> float:
        """Wall-clock expiry time, from the idle clock."""
        return wall_now + max(0.0, self.last_used + self.ttl_seconds - clock_now)
