"""The one error table: every failure the service reports, with its gRPC status.

Code anywhere in `service/` raises these; the API layer maps them to statuses in one place
(`service.api.interceptor`), each with a `google.rpc.ErrorInfo` whose reason is the class's
row (`REASONS`). Anything that is not a `SeqServeError` becomes INTERNAL with an error id.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

import grpc

from service.tracebacks import drop_tracebacks

_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


def status_code(value: int) -> grpc.StatusCode:
    """The gRPC status code a google.rpc.Status's number names (UNKNOWN for none)."""
    return _STATUS_CODES.get(value, grpc.StatusCode.UNKNOWN)


def quote(text: str, limit: int = 100) -> str:
    """A client's string as a status message may show it: repr'd, at most ~`limit` characters
    (a 100,000-character name is not echoed back)."""
    if len(text) <= limit:
        return repr(text)
    return repr(text[:limit]) + f"... ({len(text)} characters)"


def quote_list(items: Sequence[object], limit: int = 8) -> str:
    """A client's list as a status message may show it: its first `limit` items, then how many
    more (1,024 out-of-range stop token ids are not echoed back)."""
    shown = repr(list(items[:limit]))
    return shown if len(items) <= limit else f"{shown} and {len(items) - limit} more"


class SeqServeError(Exception):
    """Base class. `status` is the gRPC status code a client sees; `reason` (a key of `REASONS`)
    the `google.rpc.ErrorInfo` reason every failed call carries, one per row of the table."""

    status: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"
    # Seconds after which a retry may succeed, for a google.rpc.RetryInfo detail (None: none).
    retry_after: float | None = None

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        # Facts for the ErrorInfo's metadata beside the reason (clients read these, not the
        # message text).
        self.metadata: dict[str, str] = {}
        if retry_after is not None:
            self.retry_after = retry_after

    def detached(self) -> Self:
        """This error, to be kept as a value (a refused item's outcome, answered later) rather
        than raised on: without its traceback, whose frames hold whatever list or dict keeps
        it (a reference cycle per refused item, left to the cycle collector). Its status,
        message and metadata are all a reply uses; an INTERNAL one keeps its traceback for the
        log (`service.api.error_status.rich_status`)."""
        if self.status != grpc.StatusCode.INTERNAL:
            drop_tracebacks(self)
        return self


class InvalidArgument(SeqServeError):
    """Bad token id, wrong frame size, bad sampling params, empty or oversized input."""

    status = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"


class NotFound(SeqServeError):
    """Unknown session, model, version or alias (or an expired session)."""

    status = grpc.StatusCode.NOT_FOUND
    reason = "SESSION_NOT_FOUND"


class Aborted(SeqServeError):
    """Two concurrent requests on one session."""

    status = grpc.StatusCode.ABORTED
    reason = "SESSION_BUSY"


class FailedPrecondition(SeqServeError):
    """Session closed, version unloading or unusable, spilled record from another model."""

    status = grpc.StatusCode.FAILED_PRECONDITION
    reason = "VERSION_UNAVAILABLE"


class ResourceExhausted(SeqServeError):
    """Over the session, queue or memory limits with nothing evictable."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "MEMORY_EXHAUSTED"


class Unavailable(SeqServeError):
    """Draining, or the model is not ready."""

    status = grpc.StatusCode.UNAVAILABLE
    reason = "DRAINING"


class DataLoss(SeqServeError):
    """Weights digest mismatch, corrupted spill record."""

    status = grpc.StatusCode.DATA_LOSS
    reason = "SESSION_LOST"


class Unauthenticated(SeqServeError):
    """No bearer token (or client certificate) where one is required, or one not known."""

    status = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(SeqServeError):
    """A principal whose role does not allow the call (a `client` on a registry write)."""

    status = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class NotReady(Unavailable):
    """The server is still starting (recovering sessions, loading models): retry shortly."""

    reason = "NOT_READY"


class QuotaExceeded(ResourceExhausted):
    """A principal over its share: live sessions, or input tokens per second (RetryInfo)."""

    reason = "QUOTA_EXCEEDED"


class InsecureBind(NotReady):
    """A non-loopback address without TLS and tokens, and no `--insecure`: not started."""


class Internal(SeqServeError):
    """A bug. Reported to clients as INTERNAL with an error id, never a stack trace."""

    status = grpc.StatusCode.INTERNAL


# ---- model store ----------------------------------------------------------------------------
# Subclasses say what went wrong precisely; each keeps its parent's status code.


class ModelNotFound(NotFound):
    """No model of that name in the store."""

    reason = "MODEL_NOT_FOUND"


class VersionNotFound(NotFound):
    """The model exists, but not that version (or it has no usable version at all)."""

    reason = "VERSION_NOT_FOUND"


class AliasNotFound(NotFound):
    """The model exists, but not that alias."""

    reason = "ALIAS_NOT_FOUND"


class RouteNotFound(NotFound):
    """An HTTP path that is no route of the HTTP/JSON API (gRPC answers UNIMPLEMENTED)."""

    reason = "ROUTE_NOT_FOUND"


class VersionUnusable(FailedPrecondition):
    """The version is on disk but refused: malformed manifest, missing weights file."""


class WeightsMismatch(FailedPrecondition):
    """The weights file's tensors (names, shapes, dtypes) do not match the manifest."""


class DigestMismatch(DataLoss):
    """The weights file's sha256 differs from the one its manifest records."""

    reason = "DIGEST_MISMATCH"


class InvalidCheckpoint(InvalidArgument):
    """A checkpoint offered for import cannot be turned into a served model."""


# ---- sessions -------------------------------------------------------------------------------


class PositionMismatch(FailedPrecondition):
    """`expected_position` is not the session's position, nor that of a retry of its last
    applied request. The ErrorInfo detail carries the session's position."""

    def __init__(self, message: str, position: int) -> None:
        super().__init__(message)
        self.position = position
        self.metadata = {"position": str(position)}

    reason = "POSITION_MISMATCH"


class SessionNotFound(NotFound):
    """No session with that id (never created, or ended too long ago to remember)."""


class SessionClosed(FailedPrecondition):
    """The session was closed; its id is remembered so a late request learns why."""

    reason = "SESSION_CLOSED"


class SessionExpired(NotFound):
    """The session was idle past its TTL and is gone."""


class QueueFull(ResourceExhausted):
    """A model version's step queue is full (`engine.max_queue`)."""

    reason = "QUEUE_FULL"


class SessionLimit(ResourceExhausted):
    """The cap on live sessions (in memory and spilled) is reached."""

    reason = "SESSION_LIMIT"


class PoolExhausted(ResourceExhausted):
    """No state slot within the byte budget, and no eviction can make one: every session in
    memory is busy, or the idle ones sit in pools a busy session keeps from shrinking."""


class SpillTierFull(ResourceExhausted):
    """The spill tier is at its size cap (or its disk is full), so nothing can be evicted."""


class SpillTierInUse(NotReady):
    """Another server process holds the spill directory's lock."""


class SpillDirUnusable(NotReady):
    """The spill directory cannot be created, locked or written (read-only, missing parent,
    no permission), or, without the journal, its journal holds records: the server does not
    start."""

    @classmethod
    def at(cls, directory: object, exc: OSError, setting: str) -> Self:
        """For `directory`, which `exc` refused; `setting` is the variable that set it (what
        the operator fixes: `SEQSERVE_DATA_DIR` for the default in the data directory)."""
        return cls(
            f"spill directory {directory} is not usable: {exc.strerror or exc} "
            f"(set {setting} or --spill-dir to a writable directory)"
        )


class SessionMoved(Unavailable):
    """Another replica took the session over (its epoch moved on): this replica's write was
    refused and the step not applied; a retry reaches the holder or takes it back."""

    reason = "SESSION_MOVED"

    session_ids: tuple[str, ...] = ()  # the sessions whose writes were refused


class StateTierUnusable(NotReady):
    """The shared state tier is unreachable or configured to lose sessions (Redis), or cannot
    be opened (the SQLite database): the server does not start."""


class JournalUnavailable(Unavailable):
    """A step could not be made durable (the state directory is full, read-only or failing);
    it was not applied."""

    reason = "NOT_DURABLE"


class SessionRefusal(Exception):
    """Mixed into the errors that refuse a session because of what its records hold (damaged,
    lost, a newer server's): each names the session's owner where the records still do, and
    only the owner hears it (anyone else NOT_FOUND, as for a session not theirs). Not a row of
    the table: each such error keeps its own status. `lasting`: refused for good here (its
    records will not get better), or only until a replica that can read them takes it."""

    owner: str = ""  # the session's owner, when known ("": unknown, or made with auth off)
    lasting: bool = True


class SessionLost(DataLoss, SessionRefusal):
    """A session's records were lost or damaged (for example by a crash mid-write)."""


class SpillCorrupted(DataLoss, SessionRefusal):
    """A spill record is missing, truncated or fails its checksum; it is never used. Its
    `owner` is known when the record's owner block was still readable."""


class WrittenByNewer(FailedPrecondition, SessionRefusal):
    """A session's checkpoint, or a record of its journal, is of a newer seqserve's format: in
    the shared state tier this replica cannot take it over (one of that version can); in the
    local state directory this server refuses it and keeps what it is made of (that version,
    started again, serves it). Reason VERSION_UNAVAILABLE."""

    lasting = False


class SpillMismatch(FailedPrecondition):
    """A spill record is intact but belongs to other weights (fingerprint or shapes differ)."""


class VersionGone(FailedPrecondition):
    """A session's pinned version can no longer be loaded from the store."""


# ---- the process ----------------------------------------------------------------------------


class PortInUse(NotReady):
    """The gRPC port is taken (another server listens on it): the server does not start."""


# The table DESIGN section 4 specifies, kept here so one test can check it row by row.
ERROR_TABLE: dict[type[SeqServeError], grpc.StatusCode] = {
    cls: cls.status
    for cls in (
        InvalidArgument,
        NotFound,
        Aborted,
        FailedPrecondition,
        ResourceExhausted,
        Unavailable,
        DataLoss,
        Unauthenticated,
        PermissionDenied,
        Internal,
    )
}


# ErrorInfo reasons (domain "seqserve.v1"), one per row of the table: several rows share a status.
# Clients branch on these; `service.client.errors` has one exception class for each.
REASONS: dict[str, grpc.StatusCode] = {
    "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,  # bad input, sampling, ids, sizes
    "SESSION_NOT_FOUND": grpc.StatusCode.NOT_FOUND,  # unknown or expired session
    "MODEL_NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "VERSION_NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "ALIAS_NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "ROUTE_NOT_FOUND": grpc.StatusCode.NOT_FOUND,  # HTTP only: a path that is no route
    "SESSION_BUSY": grpc.StatusCode.ABORTED,  # another request runs on the session
    "SESSION_CLOSED": grpc.StatusCode.FAILED_PRECONDITION,
    "VERSION_UNAVAILABLE": grpc.StatusCode.FAILED_PRECONDITION,  # unloading, refused, gone
    "POSITION_MISMATCH": grpc.StatusCode.FAILED_PRECONDITION,  # metadata["position"]
    "SESSION_LIMIT": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "QUEUE_FULL": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "MEMORY_EXHAUSTED": grpc.StatusCode.RESOURCE_EXHAUSTED,  # state pool or spill tier full
    "QUOTA_EXCEEDED": grpc.StatusCode.RESOURCE_EXHAUSTED,  # with a RetryInfo detail
    "DRAINING": grpc.StatusCode.UNAVAILABLE,
    "NOT_READY": grpc.StatusCode.UNAVAILABLE,
    "NOT_DURABLE": grpc.StatusCode.UNAVAILABLE,  # the step's journal record was not written
    "SESSION_MOVED": grpc.StatusCode.UNAVAILABLE,  # another replica took the session over
    "DIGEST_MISMATCH": grpc.StatusCode.DATA_LOSS,
    "SESSION_LOST": grpc.StatusCode.DATA_LOSS,
    "UNAUTHENTICATED": grpc.StatusCode.UNAUTHENTICATED,
    "PERMISSION_DENIED": grpc.StatusCode.PERMISSION_DENIED,
    "UNIMPLEMENTED": grpc.StatusCode.UNIMPLEMENTED,  # a method this server does not have
    "INTERNAL": grpc.StatusCode.INTERNAL,  # metadata["error_id"], as in the server log
}
