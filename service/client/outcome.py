"""What a call's failure says about its outcome: refused by the client before anything was
sent (`checked_locally`), refused by the server (nothing applied), or unknown (it may have
been applied: `outcome_unknown`). The exceptions themselves are in `errors.py`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc

from service.client.errors import (
    CallCancelledError,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    SeqServeError,
)


def outcome_unknown(exc: BaseException) -> bool:
    """Whether a call that raised `exc` may have been applied on the server: anything but a
    refusal the server sent (a status with its ErrorInfo reason: nothing of the call was
    applied), and an internal error, a cancellation or a deadline whatever it carries."""
    if isinstance(exc, InternalError | DeadlineExceededError | CallCancelledError):
        return True
    return not (isinstance(exc, SeqServeError) and exc.reason)


@contextlib.contextmanager
def checked_locally() -> Iterator[None]:
    """The checks of a request being built, protobuf's own (a seed below 0, a token id or
    top_k out of its field's range) and the client's (an argument of the wrong type: bytes for
    a text, a float among token ids), raised as the InvalidArgumentError the server would
    send, not a bare ValueError or TypeError."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        raise refused_locally(exc) from None


def refused_locally(exc: Exception) -> InvalidArgumentError:
    """The InvalidArgumentError for a request the client refused to build (`exc` says why)."""
    return InvalidArgumentError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"{exc} (refused by the client)",
        reason="INVALID_ARGUMENT",  # the server's reason for it: nothing was applied
    )
