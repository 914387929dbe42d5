"""Errors as HTTP answers: the standard gRPC → HTTP status mapping (as google.rpc's code.proto
and gRPC-JSON transcoders give it) and the `{"error": {code, status, message, details}}` body."""

from __future__ import annotations

from typing import Any, ClassVar

import grpc
from google.protobuf import json_format
from google.rpc import error_details_pb2

from service.api.error_status import answered_status
from service.errors import status_code

HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}


class HttpRefusal:
    """Mixed into an error raised by the HTTP side only, for a refusal of the HTTP request
    itself that has an HTTP status of its own (408: its body did not arrive in time; 415: a
    Content-Encoding the server does not read): answered with `http_status` rather than its
    gRPC code's (the body names the code, as the guard's 405 names UNIMPLEMENTED), with
    `http_headers`, and with the connection closed (the rest of the body is not read)."""

    http_status: ClassVar[int]
    http_headers: ClassVar[dict[str, str]] = {}


class HttpError:
    """One failed call as HTTP: status, JSON body, and headers (Retry-After, WWW-Authenticate)."""

    def __init__(self, exc: BaseException) -> None:
        status = answered_status(exc)  # logs an INTERNAL one with its error id
        self.code = status_code(status.code)
        self.http_status = HTTP_STATUS[self.code]
        self.closes = isinstance(exc, HttpRefusal)
        body: dict[str, Any] = {
            "code": status.code,
            "status": self.code.name,
            "message": status.message,
        }
        if status.details:
            body["details"] = [json_format.MessageToDict(d) for d in status.details]
        self.body = {"error": body}
        self.headers: dict[str, str] = {}
        for detail in status.details:
            if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                seconds = info.retry_delay.seconds + (info.retry_delay.nanos > 0)
                self.headers["Retry-After"] = str(max(1, seconds))
        if self.code == grpc.StatusCode.UNAUTHENTICATED:
            self.headers["WWW-Authenticate"] = 'Bearer realm="seqserve"'
        if isinstance(exc, HttpRefusal):
            self.http_status = exc.http_status
            self.headers.update(exc.http_headers)
