"""What one Stream message of the multiplexing client may carry: the client's own limits,
lowered to a server's when it refuses a message over its own (named in the refusal's ErrorInfo
metadata), and a tick's items split into messages that fit."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc

from service.client.errors import error_from_status
from service.pb.seqserve.v1 import session_service_pb2 as pb

FRAMING = 1024  # bytes kept free in a message for what is not an item's own
MAX_ITEMS_PER_MESSAGE = 1024  # the server's default engine.max_items_per_message
Entry = tuple[pb.StreamItem, "asyncio.Future[pb.StreamReply]"]


@dataclass
class MessageLimits:
    """What one Stream message may carry: the client's own limits, lowered to the server's
    when it refuses a message over its own (shared by a client's Streams)."""

    channel_bytes: int  # the channel's max send size: an item over it fails alone
    bytes: int  # a message's items, beyond it: more messages
    items: int

    def learn(self, reply: pb.StreamReply) -> bool:
        """Whether a reply's error is the server refusing the whole message over one of its
        limits, which is then lowered to the server's (so a resend fits)."""
        error = reply.error
        if error.code != grpc.StatusCode.INVALID_ARGUMENT.value[0]:
            return False
        # The server's refusals of a whole message (service/api/stream_mux.py,
        # check_message_size) name the limit in their ErrorInfo's metadata.
        metadata = error_from_status(error).metadata
        if (items := _limit(metadata, "max_items_per_message")) is not None:
            self.items = min(self.items, items)
            return True
        if (limit := _limit(metadata, "max_message_bytes")) is not None:
            self.bytes = min(self.bytes, max(limit - FRAMING, limit // 2, 1))
            return True
        return False

    def shrink(self, message_bytes: int) -> None:
        """A message of `message_bytes` broke the Stream (over the server's transport limit):
        from now on messages of at most half of it."""
        self.bytes = min(self.bytes, max(message_bytes // 2, 1))


def _limit(metadata: dict[str, str], key: str) -> int | None:
    """A positive limit from an ErrorInfo's metadata, if it names one."""
    value = metadata.get(key, "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def message_parts(entries: list[Entry], max_bytes: int, max_items: int) -> list[list[Entry]]:
    """A tick's items as messages of at most `max_bytes` and `max_items` (one, unless they are
    big or many): a message over a limit would fail the whole Stream (or each of its items),
    and again on every retry."""
    if len(entries) == 1:
        return [entries]
    parts: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        n = entry[0].ByteSize() + 8  # the item's tag and length
        if parts[-1] and (size + n > max_bytes or len(parts[-1]) >= max_items):
            parts.append([])
            size = 0
        parts[-1].append(entry)
        size += n
    return parts


def wire_size(item: pb.StreamItem) -> int:
    """The bytes of a Stream message carrying `item` alone (its tag, length and body)."""
    size = item.ByteSize()
    return 1 + max(1, (size.bit_length() + 6) // 7) + size
