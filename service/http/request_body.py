"""How an HTTP request's body is read before it is parsed: its content coding (gzip, x-gzip
and deflate decoded here, to their end; any other refused with 415), and the size limit
(`server.max_message_bytes`, counted after decoding)."""

from __future__ import annotations

import zlib
from typing import ClassVar

import grpc
from aiohttp import hdrs, web

from service.errors import InvalidArgument, SeqServeError, quote
from service.http.status_map import HttpRefusal


class UnsupportedEncoding(HttpRefusal, SeqServeError):
    """A `Content-Encoding` the server does not read: HTTP's 415 Unsupported Media Type with
    `Accept-Encoding` naming those it does (RFC 9110 15.5.16), the body saying UNIMPLEMENTED
    as gRPC answers a `grpc-encoding` it does not read (with `grpc-accept-encoding`)."""

    status = grpc.StatusCode.UNIMPLEMENTED
    reason = "UNIMPLEMENTED"
    http_status = 415
    http_headers: ClassVar[dict[str, str]] = {"Accept-Encoding": "gzip, deflate"}


# The codings a body is read in; x-gzip is gzip (RFC 9110 8.4.1.3).
DECODED = frozenset({"gzip", "x-gzip", "deflate"})
_READ_CODINGS = frozenset({"", "identity"}) | DECODED
UNREAD_CODING = (
    "is not one this server reads: send the body as it is, or gzip or deflate it "
    "(Accept-Encoding names them); the connection is closed"
)


def content_coding(request: web.Request) -> str:
    """The request's one content coding, lower-case ("" for none); any other, or a list of
    them, is refused (aiohttp reads an unknown one, or a list, as no coding at all)."""
    coding = ", ".join(request.headers.getall(hdrs.CONTENT_ENCODING, ())).strip().lower()
    if coding not in _READ_CODINGS:
        raise UnsupportedEncoding(f"Content-Encoding {quote(coding)} {UNREAD_CODING}")
    return coding


def decode(raw: bytes, coding: str, limit: int) -> bytes:
    """`raw` as `coding` decodes it, refused past `limit` bytes of output (a small body that
    inflates to gigabytes is not inflated past it). gzip: every member, each to its trailer
    (its CRC and length checked); deflate: one zlib stream to its checksum, or raw deflate
    data without zlib's header, as aiohttp and browsers read it. A body cut short, or with
    bytes after its end, does not decode; an empty one is empty. aiohttp's own decoding is
    off because it checks neither a gzip body's end nor what follows it."""
    if not raw:  # no body, whatever its coding (as aiohttp read one)
        return raw
    out, rest = bytearray(), raw
    try:
        while True:
            zlib_header = rest[0] & 0x0F == 8  # RFC 1950's (a deflate body may have none)
            wbits = 31 if coding != "deflate" else 15 if zlib_header else -15  # 31: gzip's
            decoder = zlib.decompressobj(wbits=wbits)
            out += decoder.decompress(rest, limit + 1 - len(out))
            if len(out) > limit:  # decoded only so far
                raise too_large(None, limit)
            if not decoder.eof:
                raise zlib.error("the data ends before its stream does")
            rest = decoder.unused_data
            if not rest:
                return bytes(out)
            if coding == "deflate":
                raise zlib.error("bytes after the stream's end")
    except zlib.error:
        raise InvalidArgument(
            "the request body could not be read: it does not decode as its Content-Encoding, "
            f"{quote(coding)}"
        ) from None


def check_declared_length(length: int | None, limit: int) -> None:
    """Refuse a body whose Content-Length is over `limit`, before any of it is read (a
    chunked or compressed body is checked as it is read)."""
    if length is not None and length > limit:
        raise too_large(length, limit)


def too_large(size: int | None, limit: int) -> InvalidArgument:
    """The refusal of a body over `limit` bytes: `size` is its Content-Length, or None for one
    cut off at the limit (chunked, or decompressed), whose size is not known."""
    what = "request body" if size is None else f"request body of {size} bytes"
    return InvalidArgument(
        f"{what} exceeds the limit of {limit} bytes (SEQSERVE_SERVER__MAX_MESSAGE_BYTES"
        f"{'; not read past it' if size is None else ''}); send smaller chunks"
    )
