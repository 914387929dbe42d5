"""One client session: a handle on a state-pool slot (or a spill record), pinned to one version."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: the client imports this module without torch or numpy
    from service.runtime.sampler import SamplingParams, SessionRng

# The routing key: chosen at creation (by the client, in this metadata, or at random) and part
# of the session's id, so anyone holding the id can route its calls (DESIGN section 11).
ROUTE_HEADER = "x-seqserve-route"
ROUTE_PATTERN = r"[A-Za-z0-9_-]{1,64}"
SESSION_ID_PATTERN = rf"^s_(?:{ROUTE_PATTERN}\.)?[A-Za-z0-9_-]{{1,64}}$"
_ROUTE_RE = re.compile(rf"^{ROUTE_PATTERN}$")


def new_session_id(route: str = "") -> str:
    """`s_<route>.<128 random bits>`: unguessable, URL-safe and safe as a file name. A random
    route (48 bits) when none is given."""
    return f"s_{route or secrets.token_urlsafe(6)}.{secrets.token_urlsafe(16)}"


def route_of(session_id: str) -> str:
    """The routing key in a session id (the whole id for ids made before keys existed)."""
    body = session_id[2:] if session_id.startswith("s_") else session_id
    route, dot, _ = body.partition(".")
    return route if dot else session_id


def valid_route(route: str) -> bool:
    return bool(_ROUTE_RE.fullmatch(route))


def made_key(kind: str, request_id: str, owner: str) -> str:
    """What a create or fork with a request id is remembered by: per principal, so one
    principal's request id never finds another's session."""
    return f"{kind}:{owner}/{request_id}" if owner else f"{kind}:{request_id}"


@dataclass(slots=True)
class AppliedRequest:
    """The last request applied to a session under a request id: a retry of it (same id, the
    position before it) gets the same reply again and applies nothing."""

    request_id: str
    position: int  # the session's position before the request
    reply: Any  # what answers the retry: a feed's outcome, a generation's log


# identity semantics: two handles are the same session only if they are one; slots: the record
# takes 216 bytes instead of 280 with a __dict__ (tracemalloc; see README, Memory per session)
@dataclass(eq=False, slots=True)
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
    # Unsaved steps at which its next checkpoint is due where its lease is let go; 0 after any
    # other write of its state (or none yet): then by its id (`Durability.due`).
    checkpoint_due: int = 0
    # `last_used` when its state was last written to the tier (-1: never). While it still
    # equals `last_used` and nothing is journaled since, the tier's record is this session.
    saved_at: float = -1.0
    last_request: AppliedRequest | None = None  # for exactly-once retries
    made_by: str = ""  # "create:<request id>" / "fork:<request id>": a retry finds it
    # Whether the create that made it (under a request id) carried a prefix: a retry must
    # repeat it. None: not known (a fork, no request id, or read from a checkpoint).
    prefixed: bool | None = None
    # Recovered at its position, its state still to be computed from the journal (replay.py).
    replay_pending: bool = False
    holder_epoch: int = 1  # the fencing epoch this replica holds it at (the Redis tier)
    owner: str = ""  # the principal that made it ("": auth off); no one else hears of it

    @property
    def spilled(self) -> bool:
        """Its state lives in the spill tier, not the pool."""
        return self.slot is None

    def expires_at(self, clock_now: float, wall_now: float) -> float:
        """Wall-clock expiry time, from the idle clock."""
        return wall_now + max(0.0, self.last_used + self.ttl_seconds - clock_now)
