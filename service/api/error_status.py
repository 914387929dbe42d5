"""How an error becomes what the client sees: the status code name a call ends with (its metric
label), the `google.rpc.Status` with its details (`rich_status`), and that status answered once
(`answered_status`) and sent (`abort_with`). The gRPC interceptor, in-band Stream replies and
the HTTP API all answer errors through here.
"""

from __future__ import annotations

import logging
import uuid

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from service.errors import SeqServeError, status_code
from service.tracebacks import drop_tracebacks

log = logging.getLogger("service.api.interceptor")  # where these logs always were

ERROR_DOMAIN = "seqserve.v1"  # ErrorInfo.domain of our error details

# What gRPC raises into a handler still reading or writing when the server has stopped (the end
# of a shutdown's grace period): not a bug, and nothing can be sent on the call any more.
try:
    from grpc._cython.cygrpc import _ServerStoppedError as _ServerStopped
except ImportError:  # another grpcio: nothing of ours to tell apart
    _ServerStopped = ()  # type: ignore[assignment,misc]


def server_stopped(exc: BaseException) -> bool:
    """Whether `exc` is gRPC ending a call because the server stopped."""
    return isinstance(exc, _ServerStopped)


def _past_deadline(context: grpc.aio.ServicerContext) -> bool:  # type: ignore[type-arg]
    """Whether the call's deadline has passed (gRPC cancels the handler then, as it does when
    the client cancels: only the deadline tells them apart)."""
    try:
        left = context.time_remaining()
    except Exception:  # a context without the call's state (a test's stand-in)
        return False
    return left is not None and left <= 0


def returned_code_name(context: grpc.aio.ServicerContext) -> str:  # type: ignore[type-arg]
    """The status code name of a call whose handler returned: OK, unless its deadline had run
    out (the client has DEADLINE_EXCEEDED then: a Stream's requests simply end at the deadline,
    and its handler returns as if the client had finished). A Stream the client cancels ends
    the same way and gRPC does not say so here (`context.cancelled()` is still False, even in
    a done callback): it counts as OK."""
    return "DEADLINE_EXCEEDED" if _past_deadline(context) else "OK"


def code_name(exc: BaseException, context: grpc.aio.ServicerContext | None = None) -> str:
    """The status code name a call that raised `exc` ends with (its metric label)."""
    if isinstance(exc, SeqServeError):
        return exc.status.name
    if isinstance(exc, grpc.aio.AbortError) and context is not None:
        code = context.code()
        return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    if not isinstance(exc, Exception):  # CancelledError, GeneratorExit: gRPC ended the call
        if context is not None and _past_deadline(context):
            return "DEADLINE_EXCEEDED"  # the client's deadline ran out (a slow server)
        return "CANCELLED"  # the client went away
    if isinstance(exc, NotImplementedError):
        return "UNIMPLEMENTED"
    if server_stopped(exc):
        return "UNAVAILABLE"  # the server went away under the call
    return "INTERNAL"


def rich_status(exc: BaseException) -> status_pb2.Status:
    """The google.rpc.Status a client sees for `exc` (a failed call's status details, or a
    Stream item's in-band error). It always carries an ErrorInfo (domain `seqserve.v1`) whose
    reason is the error's row of the table (`service.errors.REASONS`), and a RetryInfo when the
    error says when to retry. An INTERNAL one (a bug, or an `Internal` raised on purpose) is
    logged with its traceback under a new error id; the client gets only the id, in the message
    and in the ErrorInfo's metadata["error_id"]."""
    metadata: dict[str, str] = {}
    if isinstance(exc, NotImplementedError):
        code, message, reason = (
            grpc.StatusCode.UNIMPLEMENTED,
            "method not implemented",
            "UNIMPLEMENTED",
        )
    elif isinstance(exc, SeqServeError) and exc.status != grpc.StatusCode.INTERNAL:
        code, message, reason = exc.status, exc.message, exc.reason
        metadata.update(exc.metadata)
    else:
        error_id = uuid.uuid4().hex[:12]
        log.error("internal error (error id %s)", error_id, exc_info=exc)
        what = exc.message if isinstance(exc, SeqServeError) else "internal error"
        code, message, reason = (
            grpc.StatusCode.INTERNAL,
            f"{what} (error id {error_id})",
            "INTERNAL",
        )
        metadata["error_id"] = error_id
    status = status_pb2.Status(code=code.value[0], message=message)
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata))
    status.details.append(detail)
    retry = exc.retry_after if isinstance(exc, SeqServeError) else None
    if retry is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(retry * 1e9))
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        status.details.append(detail)
    return status


def answered_status(exc: BaseException) -> status_pb2.Status:
    """The status `exc` is answered with (`rich_status`, which logs an INTERNAL one), and then
    `exc` without the tracebacks of it and of what it chains (`drop_tracebacks`): once
    answered, an error is logged no more, and a traceback's frames reach whatever holds the
    error (the lists of a message's outcomes, a reader task, a generation's frame), a
    reference cycle. An error that answers several items is answered once (one error id)."""
    status = rich_status(exc)
    drop_tracebacks(exc)
    return status


async def abort_with(context: grpc.aio.ServicerContext, status: status_pb2.Status) -> bool:
    """End the call with `status`, its details (`rich_status`) in the standard
    `grpc-status-details-bin` trailer; False if the call had been ended so already (by the
    revocation watch, from another task, while its handler went on to fail by itself).
    `context.abort` sends it at once, with no response message (a status set on the context
    and a normal return would send an empty one first, for a unary call). The `AbortError` it
    raises is kept by grpc on the call's state and raised again from grpc's own code once the
    handler returns; it loses its traceback here, whose frames (the handler's, holding the
    context) made a reference cycle of every failed call."""
    try:
        await context.abort(
            status_code(status.code),
            status.message,
            trailing_metadata=(("grpc-status-details-bin", status.SerializeToString()),),
        )
    except grpc.aio.UsageError:  # "Abort already called!": the first status stands
        return False
    except grpc.aio.AbortError as aborted:
        aborted.__context__ = None  # the error it answers, being handled
        aborted.__traceback__ = None
    return True
