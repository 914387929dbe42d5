"""The composition root: the one place that builds the server's parts from `Settings` and
hands each the narrow settings it needs. Nothing else constructs them.

    store ─ versions (loader: pools, runners, schedulers) ─ residency (spill tier)
          └ leases ─ lifecycle, feeder ─ engine ─ servicers, interceptor (metrics)

`SeqServeServer` (service.api.server) takes these parts and runs them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from service.api.gc_tuning import ServerObserver
from service.api.interceptor import ErrorMappingInterceptor
from service.api.registry_servicer import RegistryServicer
from service.api.session_servicer import SessionServicer
from service.engine.checkpoint_writer import CheckpointWriter
from service.engine.durability import Durability
from service.engine.kept_ends import KeptEnds
from service.engine.replay import PendingReplays
from service.engine.served_version import VersionObserver
from service.engine.served_versions import ServedVersions
from service.engine.session_engine import Background, SessionEngine
from service.engine.session_feeder import SessionFeeder
from service.engine.session_generator import SessionGenerator
from service.engine.session_lease import SessionLeases
from service.engine.session_lifecycle import SessionLifecycle
from service.engine.session_residency import SessionResidency
from service.engine.store_watcher import StoreWatcher
from service.engine.takeover import Takeover
from service.engine.version_loader import VersionLoader
from service.http.calls import Calls
from service.http.http_server import HttpApi
from service.http.routes import Routes
from service.metrics.prometheus_metrics import Metrics
from service.registry.store import ModelStore
from service.registry.store_changes import StoreChanges
from service.registry.version_rule import VersionRule
from service.runtime.state_pool import ByteBudget
from service.security.call_auth import CallAuth
from service.security.quotas import Quotas
from service.security.tokens import TokenFile
from service.sessions.journal import Journal
from service.sessions.redis_state import RedisState
from service.sessions.session import Session
from service.sessions.session_store import SessionStore
from service.sessions.shared_checkpoints import SharedCheckpoints
from service.sessions.shared_journal import SharedJournal
from service.sessions.shared_tier import SharedState
from service.sessions.spill_directory import JOURNAL_SUBDIR, WORKERS_DATABASE
from service.sessions.spill_tier import SpillTier
from service.sessions.sqlite_state import SqliteState
from service.sessions.state_tier import Checkpoints, JournalLog
from service.settings import SessionSettings, Settings


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
    shared = shared_state(cfg)
    journal: JournalLog | None = None
    if shared is not None:
        journal = SharedJournal(shared, sessions)
    elif cfg.durability == "journal":
        journal = local = Journal(
            cfg.spill_dir / JOURNAL_SUBDIR,
            fsync=cfg.fsync,
            fsync_interval_seconds=cfg.fsync_interval_seconds,
            segment_bytes=cfg.journal_segment_bytes,
            checkpoints=cfg.spill_dir,
            setting=cfg.spill_dir_variable,
        )
        sessions.gone.on_end = local.note_end  # why each ended, kept past its END record
    kept_ends = None
    if journal is None:  # why sessions ended, kept at a clean stop (`KeptEnds`)
        directory = cfg.spill_dir / JOURNAL_SUBDIR
        kept_ends = KeptEnds(directory, sessions, durable=cfg.fsync != "never")
    durability = Durability(
        journal, sessions, cfg.checkpoint_steps, cfg.checkpoint_idle_seconds, kept_ends
    )
    loader = VersionLoader(
        store, budget, settings.engine, cfg.pool_initial_slots, observer,
        commit=durability.commit if durability.enabled else None,
    )  # fmt: skip
    changes = StoreChanges(store.root, enabled=settings.registry_notify)
    versions = ServedVersions(store, VersionRule(), loader, observer, changes)
    spill: Checkpoints = (
        SharedCheckpoints(shared, sessions)
        if shared is not None
        else SpillTier(
            cfg.spill_dir,
            cfg.spill_max_bytes,
            # what a power loss may find promised: the journal's steps, fsynced
            ordered=cfg.durability == "journal" and cfg.fsync != "never",
            setting=cfg.spill_dir_variable,
            journaled=cfg.durability == "journal",  # without: a journal left is refused
        )
    )

    def on_residency_event(event: str, session: Session) -> None:  # evicted, restored, moved
        observer.on_session_event(event, session.model, str(session.version))

    writer = CheckpointWriter(sessions, versions, spill, durability)
    residency = SessionResidency(
        sessions, versions, spill, on_residency_event, durability, writer, cfg.slot_wait_seconds
    )
    replays = PendingReplays(sessions, versions, residency)
    leases = SessionLeases(sessions, versions, residency, durability, replays)
    lifecycle = SessionLifecycle(
        sessions, versions, residency, leases, durability, cfg,
        settings.engine.max_generate_tokens, observer,
    )  # fmt: skip
    feeder = SessionFeeder(leases, settings.engine, settings.server.max_message_bytes, observer)
    return SessionEngine(
        sessions=sessions,
        versions=versions,
        residency=residency,
        spill=spill,
        budget=budget,
        leases=leases,
        lifecycle=lifecycle,
        feeder=feeder,
        generator=SessionGenerator(leases, feeder, settings.engine.max_generate_tokens),
        watcher=StoreWatcher(versions),
        durability=durability,
        takeover=Takeover(shared, sessions, versions, residency, replays, observer),
        quotas=Quotas(
            settings.security.sessions_per_principal, settings.security.tokens_per_second, shared
        ),
        background=Background(
            cfg.sweep_interval_seconds, settings.registry_poll_seconds, cfg.write_timeout_seconds
        ),
    )


def call_auth(settings: Settings) -> CallAuth:
    """Who may call: tokens from the tokens file, client certificates with mutual TLS."""
    sec = settings.security
    tokens = TokenFile(sec.auth_tokens) if sec.auth_tokens is not None else None
    return CallAuth(tokens, client_certificates=sec.tls_client_ca is not None)


def shared_state(cfg: SessionSettings) -> SharedState | None:
    """The shared state tier `state_url` names: `redis://...`, `sqlite:PATH` (the workers of
    `serve --workers`), or none (the local directory tier)."""
    url = cfg.state_url
    if not url:
        return None
    if url.startswith("sqlite:"):
        path = Path(url.removeprefix("sqlite:"))
        # The state directory's database (what `serve --workers` sets): name what set the
        # directory, not the state URL the supervisor set.
        ours = path == cfg.spill_dir.resolve() / WORKERS_DATABASE
        return SqliteState(
            path, fsync=cfg.fsync, in_state_dir=cfg.spill_dir_variable if ours else ""
        )
    return RedisState(url, fsync=cfg.fsync)


@dataclass(frozen=True)
class ServerParts:
    store: ModelStore
    metrics: Metrics
    observer: ServerObserver  # engine stats and events → metrics (and GC tuning on loads)
    engine: SessionEngine
    session_servicer: SessionServicer
    registry_servicer: RegistryServicer
    interceptor: ErrorMappingInterceptor  # errors → statuses, RPC timing, readiness gate
    auth: CallAuth  # who calls (the interceptor's and the HTTP API's), and its revocation watch
    http: HttpApi  # the HTTP/JSON API over the same servicers (auth, gate and timing its own)


def build_server_parts(settings: Settings, *, ready: Callable[[], bool]) -> ServerParts:
    """Everything the gRPC server runs; `ready` gates seqserve.v1 calls until start-up ends."""
    store = ModelStore(settings.model_store)
    metrics = Metrics()
    observer = ServerObserver(metrics, settings.server.gc_gen0_threshold)
    engine = build_engine(settings, store=store, observer=observer)
    auth = call_auth(settings)
    session_servicer = SessionServicer(
        engine,
        max_items_per_message=settings.engine.max_items_per_message,
        max_message_bytes=settings.server.max_message_bytes,
        item_counts=metrics,
    )
    registry_servicer = RegistryServicer(engine.versions)
    calls = Calls(
        auth, ready, metrics.observe_rpc, settings.server.max_message_bytes,
        body_timeout_seconds=settings.server.http_body_timeout_seconds,
    )  # fmt: skip
    return ServerParts(
        store=store,
        metrics=metrics,
        observer=observer,
        engine=engine,
        session_servicer=session_servicer,
        registry_servicer=registry_servicer,
        interceptor=ErrorMappingInterceptor(
            metrics.observe_rpc, settings.server.max_message_bytes, ready=ready, auth=auth
        ),
        auth=auth,
        http=HttpApi(
            Routes(calls, session_servicer, registry_servicer), settings.server.grace_seconds
        ),
    )
