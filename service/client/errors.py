"""The exceptions the Python client raises: one class per `google.rpc.ErrorInfo` reason the
server sends (`service.errors.REASONS`, one per row of the error table), grouped under one
class per gRPC status code, all under `service.client.errors.SeqServeError`.

    try:
        await session.feed(tokens=[300])
    except InvalidArgumentError as err:
        print(err.code, err.reason, err.message)
    except SeqServeError as err:  # anything else the call ran into
        ...

(The server has its own `service.errors.SeqServeError`, which it raises internally and never
sends; the client's classes end in `Error` and live here.) Each exception is also a
`grpc.aio.AioRpcError`, so code written against the bare stubs (`err.code()`, `err.details()`)
keeps working; but no bare `AioRpcError` leaves a client method.
"""

from __future__ import annotations

import grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from service.errors import status_code

DOMAIN = "seqserve.v1"  # ErrorInfo.domain of the server's errors
_DETAILS_KEY = "grpc-status-details-bin"


class SeqServeError(grpc.aio.AioRpcError):
    """A failed call.

    - `code()`: the gRPC status code (a method, as on every gRPC error);
    - `reason`: the ErrorInfo reason ("" when the status carried none: a transport failure, a
      timeout, a status from a proxy);
    - `message` (also `details()`, gRPC's name for it): the status message;
    - `metadata`: the ErrorInfo's facts (e.g. "position", "error_id");
    - `status_details`: every decoded detail of the status (ErrorInfo, RetryInfo, ...);
    - `retry_delay`: RetryInfo's delay in seconds, or None.
    """

    status_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN  # the code the class stands for

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        metadata: dict[str, str] | None = None,
        status_details: list[Message] | None = None,
        retry_delay: float | None = None,
        trailing_metadata: grpc.aio.Metadata | None = None,
    ) -> None:
        super().__init__(
            code, grpc.aio.Metadata(), trailing_metadata or grpc.aio.Metadata(), details=message
        )
        self.reason = reason
        self.message = message
        self.metadata = dict(metadata or {})
        self.status_details = list(status_details or [])
        self.retry_delay = retry_delay

    def __str__(self) -> str:
        reason = f" ({self.reason})" if self.reason else ""
        return f"{self.code().name}{reason}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code().name}, {self.reason!r}, {self.message!r})"


# ---- one class per status code ----------------------------------------------------------------


class InvalidArgumentError(SeqServeError):
    """INVALID_ARGUMENT (reason INVALID_ARGUMENT): bad token id, frame size, sampling, ids,
    sizes. Fix the request."""

    status_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(SeqServeError):
    status_code = grpc.StatusCode.NOT_FOUND


class AbortedError(SeqServeError):
    status_code = grpc.StatusCode.ABORTED


class FailedPreconditionError(SeqServeError):
    status_code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhaustedError(SeqServeError):
    status_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(SeqServeError):
    """UNAVAILABLE: the client already retried it where that is safe (see `retry.py`)."""

    status_code = grpc.StatusCode.UNAVAILABLE


class DataLossError(SeqServeError):
    status_code = grpc.StatusCode.DATA_LOSS


class UnauthenticatedError(SeqServeError):
    """UNAUTHENTICATED: no token or certificate, or one the server does not know."""

    status_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(SeqServeError):
    """PERMISSION_DENIED: the principal's role does not allow the call (registry writes)."""

    status_code = grpc.StatusCode.PERMISSION_DENIED


class UnimplementedError(SeqServeError):
    status_code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(SeqServeError):
    """INTERNAL: a server bug; `error_id` is in the server's log with the traceback."""

    status_code = grpc.StatusCode.INTERNAL

    @property
    def error_id(self) -> str:
        return self.metadata.get("error_id", "")


class DeadlineExceededError(SeqServeError):
    """The call's `timeout` (or the client's) ran out before an answer."""

    status_code = grpc.StatusCode.DEADLINE_EXCEEDED


class CallCancelledError(SeqServeError):
    """CANCELLED by the server or a proxy (a call this client cancels raises
    `asyncio.CancelledError` instead)."""

    status_code = grpc.StatusCode.CANCELLED


# ---- one class per ErrorInfo reason --------------------------------------------------------------


class SessionNotFoundError(NotFoundError):
    """No such session (never created, expired, or another principal's)."""


class ModelNotFoundError(NotFoundError):
    """No model of that name (the message lists those that exist)."""


class VersionNotFoundError(NotFoundError):
    """The model exists, but not that version."""


class AliasNotFoundError(NotFoundError):
    """The model exists, but not that alias."""


class RouteNotFoundError(NotFoundError):
    """HTTP only (the gRPC client never sees it): a path that is no route of the HTTP API."""


class SessionBusyError(AbortedError):
    """Another request is running on the session: wait for it, then retry."""


class SessionClosedError(FailedPreconditionError):
    """The session was closed."""


class VersionUnavailableError(FailedPreconditionError):
    """The session's or requested version is unloading, refused by the store, or gone."""


class PositionMismatchError(FailedPreconditionError):
    """`expected_position` was not the session's position: `position` is where it is."""

    @property
    def position(self) -> int:
        return int(self.metadata.get("position", "-1"))


class SessionLimitError(ResourceExhaustedError):
    """The server's cap on live sessions is reached."""


class QueueFullError(ResourceExhaustedError):
    """The model version's step queue is full: back off."""


class MemoryExhaustedError(ResourceExhaustedError):
    """The state memory (and the spill tier) is full with nothing evictable."""


class QuotaExceededError(ResourceExhaustedError):
    """This principal's quota (sessions, tokens per second); `retry_delay` says when to retry."""


class DrainingError(UnavailableError):
    """The server is shutting down."""


class NotReadyError(UnavailableError):
    """The server is still starting (recovering sessions, loading models)."""


class NotDurableError(UnavailableError):
    """The step could not be made durable (state directory or tier failing); not applied."""


class SessionMovedError(UnavailableError):
    """Another replica took the session over; not applied here."""


class DigestMismatchError(DataLossError):
    """A version's weights do not match their manifest's sha256."""


class SessionLostError(DataLossError):
    """The session's records were lost or damaged."""


# The ErrorInfo reason → its class (the server's reasons: `service.errors.REASONS`).
REASON_CLASSES: dict[str, type[SeqServeError]] = {
    "INVALID_ARGUMENT": InvalidArgumentError,
    "SESSION_NOT_FOUND": SessionNotFoundError,
    "MODEL_NOT_FOUND": ModelNotFoundError,
    "VERSION_NOT_FOUND": VersionNotFoundError,
    "ALIAS_NOT_FOUND": AliasNotFoundError,
    "ROUTE_NOT_FOUND": RouteNotFoundError,
    "SESSION_BUSY": SessionBusyError,
    "SESSION_CLOSED": SessionClosedError,
    "VERSION_UNAVAILABLE": VersionUnavailableError,
    "POSITION_MISMATCH": PositionMismatchError,
    "SESSION_LIMIT": SessionLimitError,
    "QUEUE_FULL": QueueFullError,
    "MEMORY_EXHAUSTED": MemoryExhaustedError,
    "QUOTA_EXCEEDED": QuotaExceededError,
    "DRAINING": DrainingError,
    "NOT_READY": NotReadyError,
    "NOT_DURABLE": NotDurableError,
    "SESSION_MOVED": SessionMovedError,
    "DIGEST_MISMATCH": DigestMismatchError,
    "SESSION_LOST": SessionLostError,
    "UNAUTHENTICATED": UnauthenticatedError,
    "PERMISSION_DENIED": PermissionDeniedError,
    "UNIMPLEMENTED": UnimplementedError,
    "INTERNAL": InternalError,
}

# A status without a reason this client knows → the class of its code.
CODE_CLASSES: dict[grpc.StatusCode, type[SeqServeError]] = {
    cls.status_code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        AbortedError,
        FailedPreconditionError,
        ResourceExhaustedError,
        UnavailableError,
        DataLossError,
        UnauthenticatedError,
        PermissionDeniedError,
        UnimplementedError,
        InternalError,
        DeadlineExceededError,
        CallCancelledError,
    )
}


def error_from_status(
    status: status_pb2.Status, trailing_metadata: grpc.aio.Metadata | None = None
) -> SeqServeError:
    """The exception for a google.rpc.Status (a failed call's details, a Stream item's error)."""
    code = status_code(status.code)
    reason = ""
    metadata: dict[str, str] = {}
    retry_delay: float | None = None
    decoded: list[Message] = []
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        retry = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            decoded.append(info)
            if info.domain == DOMAIN:
                reason, metadata = info.reason, dict(info.metadata)
        elif detail.Unpack(retry):
            decoded.append(retry)
            retry_delay = retry.retry_delay.ToNanoseconds() / 1e9
        else:
            decoded.append(detail)  # a detail type this client does not know: kept packed
    cls = REASON_CLASSES.get(reason)
    if cls is None or cls.status_code != code:  # unknown reason: still the code's class
        cls = CODE_CLASSES.get(code, SeqServeError)
    return cls(
        code,
        status.message,
        reason=reason,
        metadata=metadata,
        status_details=decoded,
        retry_delay=retry_delay,
        trailing_metadata=trailing_metadata,
    )


def error_from_rpc(err: grpc.aio.AioRpcError) -> SeqServeError:
    """The exception for a failed call: decoded from its `grpc-status-details-bin` trailer when
    the server sent one, else from its code and message alone."""
    if isinstance(err, SeqServeError):
        return err
    trailing = err.trailing_metadata() or grpc.aio.Metadata()
    status = status_pb2.Status(code=err.code().value[0], message=err.details() or "")
    for key, value in trailing:
        if key == _DETAILS_KEY and isinstance(value, bytes):
            parsed = status_pb2.Status()
            parsed.ParseFromString(value)
            status.details.extend(parsed.details)
    return error_from_status(status, grpc.aio.Metadata(*trailing))
