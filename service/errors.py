"""The one error table: every failure the service reports, with its gRPC status.

Code anywhere in `service/` raises these; the API layer maps them to statuses in one place
(`service.api.errors`). Anything that is not a `SeqServeError` becomes INTERNAL with an error id.
"""

from __future__ import annotations

import grpc


def quote(text: str, limit: int = 100) -> str:
    """A client's string as a status message may show it: repr'd, at most ~`limit` characters
    (a 100,000-character name is not echoed back)."""
    if len(text) <= limit:
        return repr(text)
    return repr(text[:limit]) + f"... ({len(text)} characters)"


class SeqServeError(Exception):
    """Base class. `status` is the gRPC status code a client sees."""

    status: grpc.StatusCode = grpc.StatusCode.INTERNAL
    # A machine-readable reason and facts for a google.rpc.ErrorInfo detail on the status
    # (clients read these, not the message text); None: no detail.
    error_info: tuple[str, dict[str, str]] | None = None

    # Seconds after which a retry may succeed, for a google.rpc.RetryInfo detail (None: none).
    retry_after: float | None = None

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        if retry_after is not None:
            self.retry_after = retry_after


class InvalidArgument(SeqServeError):
    """Bad token id, wrong frame size, bad sampling params, empty or oversized input."""

    status = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(SeqServeError):
    """Unknown session, model, version or alias (or an expired session)."""

    status = grpc.StatusCode.NOT_FOUND


class Aborted(SeqServeError):
    """Two concurrent requests on one session."""

    status = grpc.StatusCode.ABORTED


class FailedPrecondition(SeqServeError):
    """Session closed, version unloading or unusable, spilled record from another model."""

    status = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(SeqServeError):
    """Over the session, queue or memory limits with nothing evictable."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(SeqServeError):
    """Draining, or the model is not ready."""

    status = grpc.StatusCode.UNAVAILABLE


class DataLoss(SeqServeError):
    """Weights digest mismatch, corrupted spill record."""

    status = grpc.StatusCode.DATA_LOSS


class Unauthenticated(SeqServeError):
    """No bearer token (or client certificate) where one is required, or one not known."""

    status = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(SeqServeError):
    """A principal whose role does not allow the call (a `client` on a registry write)."""

    status = grpc.StatusCode.PERMISSION_DENIED


class QuotaExceeded(ResourceExhausted):
    """A principal over its share: live sessions, or input tokens per second (RetryInfo)."""


class InsecureBind(Unavailable):
    """A non-loopback address without TLS and tokens, and no `--insecure`: not started."""


class Internal(SeqServeError):
    """A bug. Reported to clients as INTERNAL with an error id, never a stack trace."""

    status = grpc.StatusCode.INTERNAL


# ---- model store ----------------------------------------------------------------------------
# Subclasses say what went wrong precisely; each keeps its parent's status code.


class ModelNotFound(NotFound):
    """No model of that name in the store."""


class VersionNotFound(NotFound):
    """The model exists, but not that version (or it has no usable version at all)."""


class AliasNotFound(NotFound):
    """The model exists, but not that alias."""


class VersionUnusable(FailedPrecondition):
    """The version is on disk but refused: malformed manifest, missing weights file."""


class WeightsMismatch(FailedPrecondition):
    """The weights file's tensors (names, shapes, dtypes) do not match the manifest."""


class DigestMismatch(DataLoss):
    """The weights file's sha256 differs from the one its manifest records."""


class InvalidCheckpoint(InvalidArgument):
    """A checkpoint offered for import cannot be turned into a served model."""


# ---- sessions -------------------------------------------------------------------------------


class PositionMismatch(FailedPrecondition):
    """`expected_position` is not the session's position, nor that of a retry of its last
    applied request. The ErrorInfo detail carries the session's position."""

    def __init__(self, message: str, position: int) -> None:
        super().__init__(message)
        self.position = position
        self.error_info = ("POSITION_MISMATCH", {"position": str(position)})


class SessionNotFound(NotFound):
    """No session with that id (never created, or ended too long ago to remember)."""


class SessionClosed(FailedPrecondition):
    """The session was closed; its id is remembered so a late request learns why."""


class SessionExpired(NotFound):
    """The session was idle past its TTL and is gone."""


class SessionLimit(ResourceExhausted):
    """The cap on live sessions (in memory and spilled) is reached."""


class PoolExhausted(ResourceExhausted):
    """No state slot within the byte budget, and every session in memory is busy."""


class SpillTierFull(ResourceExhausted):
    """The spill tier is at its size cap (or its disk is full), so nothing can be evicted."""


class SpillTierInUse(Unavailable):
    """Another server process holds the spill directory's lock."""


class SpillDirUnusable(Unavailable):
    """The spill directory cannot be created, locked or written (read-only, missing parent,
    no permission): the server does not start."""


class SessionMoved(Unavailable):
    """Another replica took the session over (its epoch moved on): this replica's write was
    refused and the step not applied; a retry reaches the holder or takes it back."""

    session_ids: tuple[str, ...] = ()  # the sessions whose writes were refused


class StateTierUnusable(Unavailable):
    """The Redis state tier is unreachable or configured to lose sessions: the server does not
    start."""


class JournalUnavailable(Unavailable):
    """A step could not be made durable (the state directory is full, read-only or failing);
    it was not applied."""


class SessionLost(DataLoss):
    """A session's records were lost or damaged (for example by a crash mid-write)."""


class SpillCorrupted(DataLoss):
    """A spill record is missing, truncated or fails its checksum; it is never used."""

    owner: str = ""  # the session's owner, when the record's owner block was still readable


class SpillMismatch(FailedPrecondition):
    """A spill record is intact but belongs to other weights (fingerprint or shapes differ)."""


class VersionGone(FailedPrecondition):
    """A session's pinned version can no longer be loaded from the store."""


# ---- the process ----------------------------------------------------------------------------


class PortInUse(Unavailable):
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
