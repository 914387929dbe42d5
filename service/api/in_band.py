"""Stream items answered in-band: each item's error travels on its own reply, and the stream
goes on. A call's status is counted by the interceptor (`seqserve_rpc_duration_seconds`); a
Stream's items are not calls, so they are counted here: how many were taken
(`seqserve_stream_items_total`) and how many were answered with an error, by code and, for
RESOURCE_EXHAUSTED, by reason (`seqserve_stream_item_errors_total`). A client that multiplexes
its feeds (the Python client does, by default) sends most of its work as items: without these,
a server refusing every item would show no error at all."""

from __future__ import annotations

from typing import Protocol

from google.rpc import status_pb2

from service.api.error_status import answered_status, code_name
from service.errors import SeqServeError
from service.pb.seqserve.v1 import session_service_pb2 as pb

# The longest id an error reply echoes: longer than any session id the server makes (~100
# bytes with a routing key) or request id it takes (128), so such an item names nothing; echoed
# whole, an item just under the message limit made a reply over it, and failed the stream.
MAX_ECHOED_ID = 256


class ItemCounts(Protocol):
    """Where the counts go (`Metrics`)."""

    def observe_stream_items(self, count: int) -> None: ...

    def observe_stream_item_errors(self, code: str, reason: str, count: int) -> None: ...


class InBand:
    """Answers items' errors in-band and counts items (None: counted nowhere, as in tests of
    the multiplexer alone)."""

    __slots__ = ("_counts",)

    def __init__(self, counts: ItemCounts | None = None) -> None:
        self._counts = counts

    def taken(self, count: int) -> None:
        """`count` items read from a Stream message (once a message, not once an item)."""
        if self._counts is not None:
            self._counts.observe_stream_items(count)

    def count(self, exc: BaseException, items: int) -> None:
        """`items` items answered with `exc`'s status: counted under its code and reason."""
        if self._counts is not None:
            reason = exc.reason if isinstance(exc, SeqServeError) else ""
            self._counts.observe_stream_item_errors(code_name(exc), reason, items)

    def replies(self, exc: BaseException, items: list[pb.StreamItem]) -> list[pb.StreamReply]:
        """The in-band replies of `items`, all refused with `exc` (`answered_status`, once for
        all: one error id), counted."""
        self.count(exc, len(items))
        status = answered_status(exc)
        return [error_reply(item, status) for item in items]


def error_reply(item: pb.StreamItem, status: status_pb2.Status) -> pb.StreamReply:
    """The in-band reply of an item refused with `status` (`answered_status` of its error).
    Its ids are echoed unless too long to name anything (`MAX_ECHOED_ID`)."""
    sid, rid = item.session_id, item.request_id
    return pb.StreamReply(
        session_id=sid if len(sid) <= MAX_ECHOED_ID else "",
        request_id=rid if len(rid) <= MAX_ECHOED_ID else "",
        error=status,
    )
