"""The stream driver's clean-up of a stream whose server has gone: nothing it raises there is
the load's error (its outcome was counted when its items failed)."""

from __future__ import annotations

import pytest
from grpc._cython import cygrpc

from service.loadtest import drivers


class _EndedCall:
    """A Stream call that ended just before its half-close: gRPC raises its own error there."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.cancelled = False

    async def done_writing(self) -> None:
        raise self.error

    async def code(self) -> None:
        raise AssertionError("not reached")

    def cancel(self) -> bool:
        self.cancelled = True
        return True


async def test_a_half_close_refused_by_grpc_as_the_call_ends_is_not_raised() -> None:
    call = _EndedCall(cygrpc.ExecuteBatchError('Failed "execute_batch": (SendCloseFromClient,)'))
    await drivers._finish_stream(call)  # type: ignore[arg-type]
    assert call.cancelled


async def test_an_error_of_its_own_is_raised() -> None:
    call = _EndedCall(KeyError("a bug"))
    with pytest.raises(KeyError):
        await drivers._finish_stream(call)  # type: ignore[arg-type]
    assert call.cancelled
