"""What recovery plans for one session from its journal records (`recovery.py`): its base, the
records after it, what a damaged record took from it (`damaged_last`), whether its state needs
replaying or only its checkpoint checked, its whole history (to rebuild a damaged checkpoint),
and its records as a held segment holds them."""

from __future__ import annotations

from dataclasses import dataclass, field

from service.engine.replay_plan import Replay, replay_of
from service.runtime.sampler import SamplingParams, SessionRng
from service.sessions import journal_record as jr
from service.sessions import journal_scan as js
from service.sessions.session import Session
from service.sessions.session_store import SessionStore


@dataclass
class Plan:
    session: Session
    fresh: bool  # no checkpoint: the base is a new session's zero state
    records: list[jr.JournalRecord] = field(default_factory=list)
    # Its CREATE record: a fresh one's base; behind a checkpoint (at start-up), the start of a
    # whole history, which rebuilds its state should the checkpoint's prove damaged.
    create: jr.JournalRecord | None = None
    # A damaged record of the session after all its readable ones, past its checkpoint: its
    # last step is lost.
    damaged: js.Unreadable | None = None


def damage(bad: js.Unreadable) -> str:
    return (
        f"its last journal record (at position {bad.position}) is damaged, and records written "
        "after it are whole: what it recorded was acknowledged and is lost"
    )


def damaged_last(
    sessions: SessionStore,
    plans: dict[str, Plan],
    known: dict[str, Session],
    bad: js.Unreadable,
    *,
    first: bool,
) -> None:
    """A damaged record after every readable one of the session its head names: its last step
    (or its creation, or its end) is lost, unless its checkpoint is past it (a record older
    than the checkpoint, from a segment a crash left undeleted). Its head is a guess (the
    damage may be there too): a CREATE is taken at its word only where creations are, position
    0, and only as the `first` record of the session read (a session's first step is at
    position 0 too, and comes after its CREATE)."""
    sid = bad.session_id
    base = known.get(sid)
    if base is None:  # neither a checkpoint nor a creation: the damaged record was its CREATE
        if sid not in sessions.broken:
            sessions.mark_broken(sid, damage(bad))
    elif bad.kind == jr.CREATE and bad.position == 0 and first:  # its checkpoint has it all
        return
    elif bad.position >= base.position:  # not in its checkpoint already
        plans.setdefault(sid, Plan(base, fresh=False)).damaged = bad


def needs_replay(plan: Plan) -> bool:
    """A new session (its CREATE is its base), one with steps journaled after its checkpoint,
    or one whose whole history is journaled (its checkpoint's state is checked)."""
    return plan.fresh or plan.create is not None or has_steps(plan)


def only_checked(plan: Plan) -> bool:
    """A checkpointed session with nothing journaled since, whose checkpoint is checked only
    because its whole history is journaled: where that cannot be done (its version does not
    load, its weights changed) it is left as before, to be refused on first use."""
    return not plan.fresh and not has_steps(plan)


def has_steps(plan: Plan) -> bool:
    """Steps journaled after its checkpoint. Records at or before the checkpoint's position (a
    checkpoint written after them, their segment not deleted yet) are in it already: its
    position is a step's boundary."""
    base = plan.session.position
    return any(r.position >= base for r in plan.records if r.kind != jr.GEN_START)


def whole_history(plan: Plan, replay: Replay, kind: str, dim: int) -> Replay | None:
    """A checkpointed session's whole history, from its creation to where `replay` ends, when
    the journal still holds it without a gap: what rebuilds its state from a new session's
    should its checkpoint's state prove damaged (`PendingReplays`). None when it does not (a
    fork's child has no CREATE: its first checkpoint is its history)."""
    create = plan.create
    if plan.fresh or create is None or create.meta is None:
        return None
    if create.meta.get("fingerprint") != plan.session.fingerprint:
        return None
    history = replay_of(plan.records, 0, kind, dim)
    if history.problem is not None or history.end != replay.end:
        return None
    return history


def encoded(plan: Plan) -> list[bytes]:
    """A held session's records as the journal holds them: its CREATE (a fresh one), then the
    rest in order (version 1 records are written as version 2, which holds all they say)."""
    records = [plan.create] if plan.create is not None else []
    return [encode_record(r) for r in records + plan.records]


def encode_record(r: jr.JournalRecord) -> bytes:
    """A record as this server writes it (version 1 records as version 2, which holds all they
    say)."""
    if r.kind == jr.TOKENS:
        ids = r.tokens
        assert ids is not None
        return jr.tokens(r.session_id, r.position, ids, r.request_id, r.top_k, r.per_position)
    if r.kind == jr.FRAMES:
        values = r.frames
        assert values is not None
        return jr.frames(r.session_id, r.position, values, r.request_id, r.top_k, r.per_position)
    if r.kind == jr.GENERATED:
        token = int.from_bytes(r.data, "little", signed=True)
        return jr.generated(r.session_id, r.position, token, r.draws, r.request_id)
    if r.kind == jr.GEN_START:
        return jr.generation_start(r.session_id, r.position, r.request_id, r.meta or {})
    if r.kind == jr.CREATE:
        return jr.create(r.session_id, r.meta or {})
    return jr.end(r.session_id, r.position, r.why, (r.meta or {}).get("owner", ""))


def fresh_session(session_id: str, meta: dict, clock_now: float) -> Session:  # type: ignore[type-arg]
    sampling = meta.get("default_sampling") or {}
    prefixed = meta.get("prefixed")  # whether its create carried a prefix (absent: not known)
    return Session(
        session_id=session_id,
        model=meta["model"],
        version=int(meta["version"]),
        fingerprint=meta["fingerprint"],
        slot=None,
        rng=SessionRng.seeded(int(meta["seed"])),
        default_sampling=SamplingParams.from_dict(sampling),
        ttl_seconds=float(meta["ttl_seconds"]),
        created_at=float(meta["created_at"]),
        last_used=clock_now,
        seed=int(meta["seed"]),
        parent_session_id=meta.get("parent_session_id", ""),
        made_by=meta.get("made_by", ""),
        prefixed=prefixed if isinstance(prefixed, bool) else None,
        owner=str(meta.get("owner", "")),
    )
