"""The one error table: every failure the service reports, with its gRPC status.

Code anywhere in `service/` raises these; the API layer maps them to statuses in one place
(`service.api.errors`). Anything that is not a `SeqServeError` becomes INTERNAL with an error id.
"""

from __future__ import annotations

import grpc


class SeqServeError(Exception):
    """Base class. `status` is the gRPC status code a client sees."""

    status: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


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


class Internal(SeqServeError):
    """A bug. Reported to clients as INTERNAL with an error id, never a stack trace."""

    status = grpc.StatusCode.INTERNAL


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
        Internal,
    )
}
