"""The gRPC → HTTP status mapping is the standard one (google.rpc's code.proto, as gRPC-JSON
transcoders apply it), for every code."""

from __future__ import annotations

import grpc

from service.errors import QuotaExceeded, SessionNotFound, Unauthenticated
from service.http.status_map import HTTP_STATUS, HttpError

STANDARD = {
    "OK": 200, "CANCELLED": 499, "UNKNOWN": 500, "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504, "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "PERMISSION_DENIED": 403,
    "UNAUTHENTICATED": 401, "RESOURCE_EXHAUSTED": 429, "FAILED_PRECONDITION": 400,
    "ABORTED": 409, "OUT_OF_RANGE": 400, "UNIMPLEMENTED": 501, "INTERNAL": 500,
    "UNAVAILABLE": 503, "DATA_LOSS": 500,
}  # fmt: skip


def test_every_grpc_code_has_its_standard_http_status() -> None:
    assert {code.name: status for code, status in HTTP_STATUS.items()} == STANDARD
    assert set(HTTP_STATUS) == set(grpc.StatusCode)


def test_an_error_body_names_code_status_and_message() -> None:
    error = HttpError(SessionNotFound("session 's_x' not found"))
    assert error.http_status == 404
    assert error.body["error"]["code"] == 5
    assert error.body["error"]["status"] == "NOT_FOUND"
    assert error.body["error"]["message"] == "session 's_x' not found"


def test_retry_info_becomes_retry_after_and_401_names_the_scheme() -> None:
    quota = HttpError(QuotaExceeded("over", retry_after=1.0))
    assert quota.http_status == 429 and quota.headers["Retry-After"] == "1"
    assert any("RetryInfo" in d["@type"] for d in quota.body["error"]["details"])
    assert HttpError(Unauthenticated("no")).headers["WWW-Authenticate"].startswith("Bearer")


def test_a_bug_is_500_with_an_error_id_and_no_trace() -> None:
    error = HttpError(ZeroDivisionError("secret detail"))
    assert error.http_status == 500
    message = error.body["error"]["message"]
    assert "error id" in message and "secret" not in message and "ZeroDivision" not in message
