"""A session and its checkpoint's header, each made from the other: what a spill record says
about a session besides its state arrays (`sessions.spill_record` writes and reads it)."""

from __future__ import annotations

from service.engine.applied_request import to_record
from service.models.config import ModelConfig
from service.runtime.sampler import SessionRng
from service.sessions.session import Session
from service.sessions.spill_record import SpillHeader


def header_of(session: Session, cfg: ModelConfig, last_used_wall: float) -> SpillHeader:
    """The header of the session's checkpoint, for a version with config `cfg`. Built without
    validation (`model_construct`: 12 µs a checkpoint): every field comes from a live session
    and its loaded version, and a record is validated where it is read."""
    return SpillHeader.model_construct(
        session_id=session.session_id,
        model=session.model,
        version=session.version,
        fingerprint=session.fingerprint,
        position=session.position,
        seed=session.seed,
        parent_session_id=session.parent_session_id,
        created_at=session.created_at,
        ttl_seconds=session.ttl_seconds,
        last_used_wall=last_used_wall,
        rng_state=session.rng.record_state(),
        default_sampling=session.default_sampling,
        last_request=to_record(session.last_request),
        made_by=session.made_by,
        owner=session.owner,
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        has_cell_state=cfg.has_cell_state,
        output_dim=cfg.output_dim,
    )


def session_from(header: SpillHeader, last_used: float) -> Session:
    """The session a checkpoint describes, not in memory."""
    return Session(
        session_id=header.session_id,
        model=header.model,
        version=header.version,
        fingerprint=header.fingerprint,
        slot=None,
        rng=SessionRng.from_state(header.rng_state),
        default_sampling=header.default_sampling,
        ttl_seconds=header.ttl_seconds,
        created_at=header.created_at,
        last_used=last_used,
        seed=header.seed,
        parent_session_id=header.parent_session_id,
        made_by=header.made_by,
        owner=header.owner,
        position=header.position,
    )
