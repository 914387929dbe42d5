"""The one Settings object. Built once at start-up (from `SEQSERVE_*` env vars and CLI flags)
and passed down; no other module reads the environment.

Every field is validated (ranges, choices) with its docstring as its description; the command
line's flags are generated from these fields (`service/cli/settings_flags.py`), and a field's
short flag names, if any, are declared here with `flag(...)`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

from service.setting_types import (
    Address,
    DirPath,
    FilePath,
    GiB,
    KiB,
    MiB,
    NonNegative,
    OptionalPort,
    Port,
    Positive,
    PositiveSeconds,
    Seconds,
    StateUrl,
    off_or_at_least,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


def default_model_store() -> Path:
    """`./model_store` in the directory seqserve starts in (the repository root for `make
    serve`); `seqserve serve` refuses to start when it is not there."""
    return Path.cwd() / "model_store"


def default_data_dir() -> Path:
    """Where seqserve keeps its state when no path is given, never inside the installed
    package: `$SEQSERVE_DATA_DIR`, else `$XDG_STATE_HOME/seqserve`, else
    `~/.local/state/seqserve`."""
    if os.environ.get("SEQSERVE_DATA_DIR"):
        return Path(os.environ["SEQSERVE_DATA_DIR"])
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "seqserve"


DATA_DIR_VARIABLES = ("SEQSERVE_DATA_DIR", "XDG_STATE_HOME")  # what `default_data_dir` reads
SPILL_DIR_VARIABLE = "SEQSERVE_SESSIONS__SPILL_DIR"


def data_dir_variable() -> str | None:
    """The environment variable `default_data_dir()` is taken from now (`SEQSERVE_DATA_DIR`,
    else `XDG_STATE_HOME`); None when it is the home directory's default."""
    for name in DATA_DIR_VARIABLES:
        if os.environ.get(name):
            return name
    return None


@dataclass(frozen=True)
class Flag:
    """Short command-line names of a setting, besides its generated `--section.name` flag."""

    names: tuple[str, ...]


def flag(*names: str) -> Flag:
    return Flag(names)


# Sub-models: docstrings are descriptions; an unknown key (config file, env) is an error.
_SECTION = ConfigDict(use_attribute_docstrings=True, extra="forbid")


class ServerSettings(BaseModel):
    """Network and process settings (`SEQSERVE_SERVER__*`)."""

    model_config = _SECTION

    host: Annotated[Address, flag("--host")] = "127.0.0.1"
    """Address the gRPC server binds. Use 0.0.0.0 inside a container."""
    port: Annotated[Port, flag("--port")] = 50051
    """gRPC port; 0 picks a free one (tests)."""
    metrics_port: Annotated[OptionalPort, flag("--metrics-port")] = 9464
    """Prometheus metrics HTTP port; 0 picks a free one, -1 disables the endpoint."""
    metrics_host: Address = "127.0.0.1"
    """Address the metrics endpoint binds."""
    http_port: Annotated[OptionalPort, flag("--http-port")] = 8080
    """HTTP/JSON API and playground page port (on `host`); 0 picks a free one, -1 disables."""
    grace_seconds: Seconds = 10.0
    """On SIGTERM/SIGINT: how long in-flight RPCs get to finish before they are cancelled."""
    gc_gen0_threshold: Annotated[int, Field(ge=0, le=2**31 - 1)] = 50_000
    """Python GC tuning for `serve`: after start-up and each model load the heap is frozen
    (`gc.freeze`), so is whatever survives a collection, and young collections run every this
    many allocations (and at least once a second). 0 keeps Python's defaults, whose full
    collections stalled the event loop for ~150 ms under load, and whose middle-generation
    ones for ~0.5 s at 100,000 sessions. At most 2**31-1 (`gc.set_threshold` takes a C int)."""
    gc_thaw_seconds: Annotated[Seconds, off_or_at_least(0.05)] = 3600.0
    """With GC tuning on: every this many seconds the frozen heap is collected whole, once,
    freeing reference cycles that died after being frozen (one pause as long as a full
    collection of everything alive). 0: never; else at least 0.05 (more often, the server
    does little but collect)."""
    max_message_bytes: Annotated[int, Field(ge=64 * KiB, lt=GiB)] = 4 * MiB
    """Largest request message accepted (larger: INVALID_ARGUMENT; over twice this, gRPC's own
    RESOURCE_EXHAUSTED) and largest reply sent. At least 64 KiB (a one-step reply with every
    entry of the bundled models' vocabulary takes 5.4 KB, a registry reply a few KB), under
    1 GiB (gRPC's receive limit, twice this, is a C int)."""
    http_body_timeout_seconds: Annotated[PositiveSeconds, Field(le=3600)] = 30.0
    """HTTP API: the most time a request's body may take to arrive once its call starts to
    read it (a client that sends part of it and then nothing, or trickles it): past it the
    call is answered 408 (INVALID_ARGUMENT) and the connection closed. At most an hour."""
    worker: Annotated[int, Field(ge=-1)] = -1
    """Set by `serve --workers N` for its worker processes (0..N-1): the worker shares the port
    with its siblings (SO_REUSEPORT) under the supervisor's port lock. Not for setting by hand."""

    @model_validator(mode="after")
    def _ports_apart(self) -> ServerSettings:
        """Two endpoints on one port of one host: the second to bind failed at start-up, with
        gRPC's own log line and a hint that blamed another seqserve."""
        ports = [("port", self.port), ("http_port", self.http_port)]
        if self.metrics_host == self.host:
            ports.append(("metrics_port", self.metrics_port))
        taken: dict[int, str] = {}
        for name, port in ports:
            if port > 0 and port in taken:
                raise ValueError(f"{name} and {taken[port]} are both {port}: give each its own")
            taken.setdefault(port, name)
        return self


class EngineSettings(BaseModel):
    """Step scheduling and model execution (`SEQSERVE_ENGINE__*`)."""

    model_config = _SECTION

    device: Annotated[str, Field(pattern=r"^(cpu|cuda(:\d+)?)$")] = "cpu"
    """torch device for model weights and session state: `cpu`, `cuda` or `cuda:N` (refused at
    start-up when this torch has no such device)."""
    torch_threads: Annotated[int, Field(ge=1, le=1024)] = 1
    """torch intra-op threads. One is best for small recurrent steps on few cores. At most 1024
    (past the cores of any machine; a pool of 100,000 crashed the process)."""
    max_batch_size: Positive = 256
    """Most rows (sessions) in one batched step."""
    max_chunk_tokens: Positive = 4096
    """Longest input chunk one request may carry (tokens or frames)."""
    max_generate_tokens: Positive = 2048
    """Largest `max_tokens` a generation may ask for."""
    inline_max_rows: NonNegative = 1
    """Batched steps of at most this many rows, each of one input, run on the event-loop thread
    instead of the runner thread: for a lone session the thread handoff costs more than it
    saves. A process limited to one CPU runs every such step there (feeds, and generations once
    each has its first token): the thread overlaps nothing. Chunks always go to the runner
    thread. 0 = never."""
    max_queue: Positive = 4096
    """Pending steps per model version beyond which new work gets RESOURCE_EXHAUSTED."""
    max_items_per_message: Positive = 1024
    """Most items one Stream message may carry."""
    default_top_k: Positive = 5
    """Top-k entries returned in a token prediction when the request does not say."""
    preload: list[Annotated[str, Field(pattern=r"^[^:\s]+(:[^:\s]+)?$")]] = []
    """Versions loaded at start-up, as `model[:version]` (a number or an alias; no version: the
    default one), besides those loaded anyway: every aliased version and the default one of
    every model. Health stays NOT_SERVING until all are loaded."""


class SessionSettings(BaseModel):
    """Session lifecycle (`SEQSERVE_SESSIONS__*`)."""

    model_config = _SECTION

    ttl_seconds: Annotated[PositiveSeconds, flag("--ttl")] = 600.0
    """Idle time after which a session expires, unless it asked for another TTL."""
    max_ttl_seconds: Annotated[PositiveSeconds, Field(le=10 * 365 * 86400)] = 86400.0
    """Largest TTL a client may ask for; at most ten years (the Redis state tier keeps a
    session's TTL in milliseconds, a 64-bit integer)."""
    max_sessions: Annotated[Positive, flag("--max-sessions")] = 100_000
    """Cap on live sessions (memory and spilled)."""
    pool_bytes: Annotated[Positive, flag("--pool-bytes")] = 256 * MiB
    """Byte budget for in-memory state, per server, across model versions."""
    pool_initial_slots: Positive = 64
    """Slots preallocated per loaded model version; the pool grows up to `pool_bytes`."""
    spill_dir: Annotated[DirPath, flag("--spill-dir")] = Field(
        default_factory=lambda: default_data_dir() / "spill"
    )
    """The state directory: checkpoints of evicted, idle and shut-down sessions, and the journal
    (`journal/`); a server started on it resumes the sessions it finds there, after a crash too.
    One server per directory (it is locked). Default: `spill/` in the data directory
    (`$SEQSERVE_DATA_DIR`, else `$XDG_STATE_HOME/seqserve`, else `~/.local/state/seqserve`)."""
    spill_max_bytes: Annotated[Positive, flag("--spill-max-bytes")] = 4 * GiB
    """Cap on the spill tier's size on disk; evicting past it gives RESOURCE_EXHAUSTED."""
    slot_wait_seconds: Seconds = 5.0
    """When the pool is full and every session in memory is busy, how long a request waits for
    one to go idle (and be evicted) before RESOURCE_EXHAUSTED. 0 refuses at once."""
    sweep_interval_seconds: Annotated[float, Field(ge=0.01, allow_inf_nan=False)] = 1.0
    """How often expired sessions are swept (and idle sessions checkpointed); at least 0.01
    (more often, the sweeper spins)."""
    durability: Literal["journal", "shutdown"] = "journal"
    """`journal`: every acknowledged step is in the journal (in `spill_dir`/journal) before its
    reply leaves, so a killed server loses no session. `shutdown`: sessions are written only on
    a graceful stop (SIGTERM) and on eviction; a crash loses the ones in memory (and why the
    sessions since the last graceful stop ended: `journal/ended` is written at each graceful
    stop)."""
    fsync: Literal["batch", "interval", "never"] = "interval"
    """When journal writes are fsynced: after every batched step (survives power loss, costs a
    disk flush per step), every `fsync_interval_seconds` in the background, or never (the OS
    writes them back; a killed process loses nothing either way; the spill tier then reuses its
    files, which makes checkpoints cheaper: README, "The state pool and the spill tier")."""
    fsync_interval_seconds: Annotated[float, Field(ge=0.001, allow_inf_nan=False)] = 0.2
    """The fsync period of the `interval` policy; at least 0.001 (for every step: `batch`)."""
    checkpoint_steps: Positive = 256
    """A session is checkpointed (its state written, its journal records released) once this
    many of its steps are journaled: recovery replays at most this many steps per session. Its
    first checkpoint (and its first after an idle checkpoint or an eviction) comes sooner, after
    between half and all of them (by its id), so sessions stepped together are not all
    checkpointed in the same step."""
    checkpoint_idle_seconds: Seconds = 5.0
    """A session idle this long with journaled steps is checkpointed, so idle sessions do not
    keep the journal from being trimmed."""
    write_timeout_seconds: Seconds = 30.0
    """At shutdown, the most time writing the sessions in memory may take, whatever the disk
    does; sessions not written by then keep their steps in the journal (`durability=journal`)
    or are lost (`shutdown`). Shutdown takes at most `grace_seconds` plus this."""
    journal_segment_bytes: Annotated[int, Field(ge=256)] = 64 * MiB
    """Journal segment size: segments no session needs any more are deleted whole. At least
    256 bytes, room for a one-token step's record (96 bytes with the Python client's request
    ids; a segment always takes the record that fills it, whatever its size)."""
    state_url: Annotated[StateUrl, flag("--state-url")] = ""
    """The shared state tier, `redis://HOST:PORT/DB` (or `rediss://`; a password as
    `redis://:PASSWORD@HOST…`, and redis-py's own `?options`, checked at start): every session's
    checkpoint, journal and holder live there, so any replica can take a session over. Empty:
    the local tier (`spill_dir`). Needs `durability=journal`; Redis must run with
    `appendonly yes` and `maxmemory-policy noeviction` (checked at start-up)."""

    # What set `spill_dir` when it was not given: the data directory's variable then, if any.
    _data_dir_variable: str | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _note_data_dir_variable(self) -> SessionSettings:
        if "spill_dir" not in self.model_fields_set:  # the default: read when it was made
            self._data_dir_variable = data_dir_variable()
        return self

    @property
    def spill_dir_variable(self) -> str:
        """The environment variable that set `spill_dir`, for the messages about it (an
        operator fixes what they set): `SEQSERVE_DATA_DIR` or `XDG_STATE_HOME` when it is the
        default `spill/` in the data directory one of them names, else `SPILL_DIR_VARIABLE`
        (given by it, a flag or a config file, or the home directory's default)."""
        if "spill_dir" in self.model_fields_set or self._data_dir_variable is None:
            return SPILL_DIR_VARIABLE
        return self._data_dir_variable

    @model_validator(mode="after")
    def _ttl_within_max(self) -> SessionSettings:
        if self.ttl_seconds > self.max_ttl_seconds:
            raise ValueError(
                f"ttl_seconds ({self.ttl_seconds:g}) is over max_ttl_seconds "
                f"({self.max_ttl_seconds:g})"
            )
        return self


class SecuritySettings(BaseModel):
    """TLS, tokens and the start-up safety check (`SEQSERVE_SECURITY__*`)."""

    model_config = _SECTION

    auth_tokens: Annotated[FilePath, flag("--auth-tokens")] = None
    """A file of `<principal> <role> <sha256 hex>` lines (`seqserve auth add-token`); set,
    every call but health needs `authorization: Bearer <token>`. Re-read when it changes."""
    tls_cert: Annotated[FilePath, flag("--tls-cert")] = None
    """PEM certificate chain of the server; with `tls_key`, gRPC is served over TLS."""
    tls_key: Annotated[FilePath, flag("--tls-key")] = None
    """PEM private key of `tls_cert`."""
    tls_client_ca: Annotated[FilePath, flag("--tls-client-ca")] = None
    """PEM CA bundle: clients must present a certificate it signed (mutual TLS); the
    certificate's subject common name is the principal (role `client`)."""
    insecure: Annotated[bool, flag("--insecure")] = False
    """Allow a non-loopback bind without TLS and tokens (a private network only)."""
    metrics_tls: bool = False
    """Serve the metrics endpoint over HTTPS with `tls_cert`/`tls_key` (and, with
    `tls_client_ca`, only to scrapers with a certificate that CA signed)."""
    reflection: bool = True
    """Serve gRPC reflection (it needs a token too when tokens are on)."""
    sessions_per_principal: NonNegative = 1000
    """Live sessions one principal may hold on this server (0: no cap; auth off: none)."""
    tokens_per_second: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 20_000.0
    """Input tokens per second one principal may feed (a token bucket, a second's burst; a
    generation counts its prompt and max_tokens when it starts). 0: no cap."""

    @model_validator(mode="after")
    def _metrics_tls_has_a_certificate(self) -> SecuritySettings:
        """Refused here, before anything listens: without the pair the metrics endpoint would
        be served in plain text, the opposite of what was asked."""
        if self.metrics_tls and (self.tls_cert is None or self.tls_key is None):
            raise ValueError(
                "metrics_tls (SEQSERVE_SECURITY__METRICS_TLS) needs --tls-cert and --tls-key: "
                "without them the metrics would be served in plain text"
            )
        return self


class Settings(BaseSettings):
    """All of seqserve's configuration. Env: `SEQSERVE_<FIELD>`, nested with `__`."""

    model_config = SettingsConfigDict(
        env_prefix="SEQSERVE_",
        env_nested_delimiter="__",
        env_ignore_empty=True,  # `X=` (compose's `${X:-}`) means unset, not "" (or ".")
        extra="ignore",
        protected_namespaces=(),
        use_attribute_docstrings=True,
    )

    model_store: Annotated[DirPath, flag("--store")] = Field(default_factory=default_model_store)
    """Root of the versioned model store. Default: `./model_store` in the current directory
    (`serve` refuses to start without a store)."""
    registry_poll_seconds: Annotated[Seconds, off_or_at_least(0.01)] = 2.0
    """How often the store is re-read for new versions and alias changes (0 disables; else at
    least 0.01)."""
    registry_notify: bool = True
    """Keep what a new session's reading of the store found while inotify reports no change in
    the store's folders (a local filesystem only); off: every new session reads the store."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Logging level (any case)."""
    server: ServerSettings = Field(default_factory=ServerSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    sessions: SessionSettings = Field(default_factory=SessionSettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value


def environment_values() -> dict[str, Any]:
    """What the `SEQSERVE_*` environment variables say, nested like the model and not yet
    validated (pydantic-settings' own parsing; a variable it cannot parse raises
    `pydantic_settings.SettingsError`)."""
    return EnvSettingsSource(Settings)()
