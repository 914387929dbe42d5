"""The composition root: the one place that builds the server's parts from `Settings` and
hands each the narrow settings it needs. Nothing else constructs engine parts.

    store ─ versions (loader: pools, runners, schedulers) ─ residency (spill tier)
          └ leases ─ lifecycle, feeder ─ engine ─ servicers ─ gRPC server, metrics
"""

from __future__ import annotations

from service.engine.served_version import VersionObserver
from service.engine.served_versions import ServedVersions
from service.engine.session_engine import Background, SessionEngine
from service.engine.session_feeder import SessionFeeder
from service.engine.session_lease import SessionLeases
from service.engine.session_lifecycle import SessionLifecycle
from service.engine.session_residency import SessionResidency
from service.engine.store_watcher import StoreWatcher
from service.engine.version_loader import VersionLoader
from service.registry.store import ModelStore
from service.runtime.state_pool import ByteBudget
from service.sessions.session import Session
from service.sessions.session_store import SessionStore
from service.sessions.spill_tier import SpillTier
from service.settings import Settings


def build_engine(
    settings: Settings,
    *,
    store: ModelStore | None = None,
    observer: VersionObserver | None = None,
    sessions: SessionStore | None = None,
) -> SessionEngine:
    """The engine and its parts. `store`, `observer` and `sessions` (e.g. with a test clock)
    replace the defaults built from `settings`."""
    cfg = settings.sessions
    store = store if store is not None else ModelStore(settings.model_store)
    observer = observer or VersionObserver()
    # not `or`: an empty session store is falsy
    sessions = sessions if sessions is not None else SessionStore(cfg.max_sessions)
    budget = ByteBudget(cfg.pool_bytes)
    loader = VersionLoader(store, budget, settings.engine, cfg.pool_initial_slots, observer)
    versions = ServedVersions(store, loader, observer)
    spill = SpillTier(cfg.spill_dir, cfg.spill_max_bytes)

    def on_residency_event(event: str, session: Session) -> None:  # evicted, restored
        observer.on_session_event(event, session.model, str(session.version))

    residency = SessionResidency(
        sessions, versions, spill, on_residency_event, cfg.slot_wait_seconds
    )
    leases = SessionLeases(sessions, versions, residency)
    lifecycle = SessionLifecycle(
        sessions, versions, residency, leases, cfg, settings.engine.max_generate_tokens, observer
    )
    feeder = SessionFeeder(leases, settings.engine, observer)
    return SessionEngine(
        sessions=sessions,
        versions=versions,
        residency=residency,
        spill=spill,
        budget=budget,
        leases=leases,
        lifecycle=lifecycle,
        feeder=feeder,
        watcher=StoreWatcher(versions),
        background=Background(cfg.sweep_interval_seconds, settings.registry_poll_seconds),
    )
