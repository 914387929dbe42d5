"""Which idle session to evict when a version's pool needs a slot and the budget is spent, and
why none can be, when none can (`SessionResidency.allocate`).

An eviction helps only if it brings the version a slot nearer: one of its own sessions (its
slot is reused), or one in another version's pool that then shrinks for it. A pool cannot
shrink past a busy session's slot, so evicting the idle sessions below it would spill them for
nothing.
"""

from __future__ import annotations

from service.engine.served_version import ServedVersion
from service.engine.served_versions import ServedVersions
from service.errors import PoolExhausted
from service.sessions.session import Session
from service.sessions.session_store import SessionStore


def victim(
    sessions: SessionStore, versions: ServedVersions, wanting: ServedVersion
) -> Session | None:
    """The least recently used idle session whose eviction brings `wanting` a slot nearer, or
    None when no eviction helps. Each version's oldest idle session comes first in its own
    order (busy ones sit at the recent end), so this costs a look per version, not one per
    session in memory."""
    own = next(sessions.idle_resident((wanting.name, wanting.version)), None)
    if len(versions.served()) == 1:  # the common case: one version, nothing else to shrink
        return own
    candidates = [own] if own is not None else []
    for key, gain in _gains(sessions, versions, wanting).items():
        if gain > 0:
            oldest = next(sessions.idle_resident(key), None)
            if oldest is not None:
                candidates.append(oldest)
    return min(candidates, key=lambda s: s.last_used, default=None)


def _gains(
    sessions: SessionStore, versions: ServedVersions, wanting: ServedVersion
) -> dict[tuple[str, int], int]:
    """The bytes each other version's pool gives back once all its idle sessions are evicted,
    by (model, version): down to just above its highest busy slot (the busy sessions are few:
    this reads them, not every session in memory); none at all when they and what the budget
    has left come to less than one slot of `wanting`'s (the least its pool grows by)."""
    top: dict[tuple[str, int], int] = {}  # the highest busy slot, by version
    for s in sessions.busy_sessions():
        if s.slot is not None:
            key = (s.model, s.version)
            top[key] = max(top.get(key, -1), s.slot)
    gains = {}
    for other in versions.served():
        if other is not wanting:
            key, pool = (other.name, other.version), other.pool
            floor = top.get(key, -1) + 1
            gains[key] = max(0, pool.capacity - floor) * pool.bytes_per_slot
    budget = wanting.pool.budget
    left = budget.limit_bytes - budget.used_bytes
    return gains if left + sum(gains.values()) >= wanting.pool.bytes_per_slot else {}


def exhausted(sessions: SessionStore, wanting: ServedVersion) -> PoolExhausted:
    """Why no slot can be had: every session in memory busy, or the idle ones in pools that
    busy sessions keep from shrinking (nothing was evicted for them)."""
    limit = wanting.pool.budget.limit_bytes
    idle = sessions.idle_count()
    if idle == 0:
        why = "every session in memory is busy"
    else:
        why = (
            f"evicting the {idle} idle session(s) in memory would free no slot for "
            f"{wanting.name}:{wanting.version}: busy sessions hold the rest (a pool cannot "
            "shrink past its highest busy slot)"
        )
    return PoolExhausted(
        f"state memory budget exhausted ({limit} bytes) and {why}; retry shortly, or raise "
        "SEQSERVE_SESSIONS__POOL_BYTES"
    )
