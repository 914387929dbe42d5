"""The OpenAPI 3.1 document of the HTTP/JSON API (`GET /v1/openapi.json`). Schemas come from
the protobuf descriptors themselves, as protobuf's JSON mapping renders each field, so the
document cannot drift from `protos/`."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor

from service.http.status_map import HTTP_STATUS
from service.pb.seqserve.v1 import model_registry_pb2 as reg_pb
from service.pb.seqserve.v1 import session_service_pb2 as pb

# A message, enum or field descriptor: the classes differ between protobuf's upb and pure-Python
# implementations (and their stubs), so they are not spelled out here.
Descriptor = Any
EnumDescriptor = Any

_INT64 = {
    FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64,
}  # fmt: skip
_INT64_NOTE = "64-bit integers are strings in protobuf's JSON mapping (numbers are accepted)"
_INT32 = {
    FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_SINT32,
    FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_SFIXED32,
}  # fmt: skip
# Well-known types with a JSON form of their own.
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]+)?s$",
                                 "examples": ["600s", "1.5s"]},
    "google.protobuf.Any": {"type": "object", "properties": {"@type": {"type": "string"}},
                            "additionalProperties": True},
}  # fmt: skip

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "status", "message"],
            "properties": {
                "code": {"type": "integer", "description": "gRPC status code number"},
                "status": {"type": "string", "description": "gRPC status code name"},
                "message": {"type": "string"},
                "details": {"type": "array", "items": _WELL_KNOWN["google.protobuf.Any"]},
            },
        }
    },
}

ERROR_REF = "#/components/schemas/Error"  # ERROR_SCHEMA's place in the document


class _Schemas:
    def __init__(self) -> None:
        self.components: dict[str, Any] = {}

    def ref(self, descriptor: Descriptor) -> dict[str, Any]:
        name = descriptor.full_name
        if name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[name])
        if name not in self.components:
            self.components[name] = {}  # placeholder first: messages may refer to themselves
            self.components[name] = self._message(descriptor)
        return {"$ref": f"#/components/schemas/{name}"}

    def _message(self, descriptor: Descriptor) -> dict[str, Any]:
        properties = {f.json_name: self._field(f) for f in descriptor.fields}
        schema: dict[str, Any] = {"type": "object", "properties": properties}
        oneofs = [o for o in descriptor.oneofs if not o.name.startswith("_")]  # not `optional`
        if oneofs:
            schema["description"] = "; ".join(
                f"at most one of {', '.join(f.json_name for f in o.fields)}" for o in oneofs
            )
        return schema

    def _field(self, field: FieldDescriptor) -> dict[str, Any]:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value = field.message_type.fields_by_name["value"]
            return {"type": "object", "additionalProperties": self._scalar(value)}
        item = self._scalar(field)
        if field.is_repeated:
            return {"type": "array", "items": item}
        return item

    def _scalar(self, field: FieldDescriptor) -> dict[str, Any]:
        t = field.type
        if t == FieldDescriptor.TYPE_MESSAGE:
            return self.ref(field.message_type)
        if t == FieldDescriptor.TYPE_ENUM:
            return _enum(field.enum_type)
        if t in _INT64:
            return {"type": ["string", "integer"], "format": "int64", "description": _INT64_NOTE}
        if t in _INT32:
            return {"type": "integer", "format": "int32"}
        if t in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
            return {"type": "number"}
        if t == FieldDescriptor.TYPE_BOOL:
            return {"type": "boolean"}
        if t == FieldDescriptor.TYPE_BYTES:
            return {"type": "string", "contentEncoding": "base64"}
        return {"type": "string"}


def _enum(descriptor: EnumDescriptor) -> dict[str, Any]:
    return {"type": "string", "enum": [v.name for v in descriptor.values]}


def openapi_document() -> dict[str, Any]:
    schemas = _Schemas()
    errors = {str(status): _error_ref(status) for status in error_statuses()}

    def answer(descriptor: Descriptor, summary: str, body: Descriptor | None = None,
               session: bool = False) -> dict[str, Any]:  # fmt: skip
        op: dict[str, Any] = {
            "summary": summary,
            "responses": {
                "200": {"description": "OK", "content": {
                    "application/json": {"schema": schemas.ref(descriptor)}}},
                **errors,
            },
        }  # fmt: skip
        if session:
            op["parameters"] = [_SESSION_ID]
        if body is not None:  # and the refusals of the HTTP request's body itself
            op["responses"].update({str(status): _error_ref(status) for status in BODY_REFUSALS})
            op["requestBody"] = {"required": False, "content": {
                "application/json": {"schema": schemas.ref(body)}}}  # fmt: skip
        return op

    generate = answer(pb.GenerateResponse.DESCRIPTOR, "", pb.GenerateRequest.DESCRIPTOR, True)
    generate["summary"] = "Generate: server-sent events"
    generate["description"] = (
        "A `text/event-stream`: one `token` event per generated token (data: a "
        "GenerateResponse as JSON), then `done` (data: sessionId, position, finishReason), or "
        "`error` (data: the error body) if the generation fails after its first token. An error "
        "before the first token is a JSON error answer. Closing the connection cancels it."
    )
    generate["responses"]["200"] = {
        "description": "server-sent events",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
    paths = {
        "/v1/models": {"get": answer(reg_pb.ListModelsResponse.DESCRIPTOR, "ListModels")},
        "/v1/models/{model}": {"get": {
            **answer(reg_pb.GetModelResponse.DESCRIPTOR, "GetModel"),
            "parameters": [{"name": "model", "in": "path", "required": True,
                            "schema": {"type": "string"}}],
        }},
        "/v1/sessions": {"post": answer(pb.CreateSessionResponse.DESCRIPTOR, "CreateSession",
                                        pb.CreateSessionRequest.DESCRIPTOR)},
        "/v1/sessions/{id}": {
            "get": _verb_path_405(answer(pb.GetSessionResponse.DESCRIPTOR, "GetSession",
                                         session=True)),
            "delete": _verb_path_405(answer(pb.CloseSessionResponse.DESCRIPTOR, "CloseSession",
                                            session=True)),
        },
        "/v1/sessions/{id}:fork": {"post": answer(
            pb.ForkSessionResponse.DESCRIPTOR, "ForkSession", pb.ForkSessionRequest.DESCRIPTOR,
            True)},
        "/v1/sessions/{id}:step": {"post": answer(
            pb.StepResponse.DESCRIPTOR, "Step", pb.StepRequest.DESCRIPTOR, True)},
        "/v1/sessions/{id}:generate": {"post": generate},
    }  # fmt: skip
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "seqserve HTTP/JSON API",
            "version": "v1",
            "description": "The seqserve.v1 gRPC API over HTTP: bodies in protobuf's JSON "
            "mapping, errors with the standard gRPC → HTTP status mapping. A method a path "
            "does not list is 405 (UNIMPLEMENTED) with `Allow`; a path not listed is 404 "
            "(NOT_FOUND, reason ROUTE_NOT_FOUND).",
        },
        "paths": paths,
        "components": {
            "schemas": {**schemas.components, "Error": ERROR_SCHEMA},
            "responses": _error_responses(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{}, {"bearer": []}],
    }


def error_statuses() -> dict[int, list[str]]:
    """Each HTTP status an error is answered with (`status_map.HTTP_STATUS`, so the document
    cannot drift from what the server sends), with the gRPC codes it stands for."""
    codes: dict[int, list[str]] = {}
    for code, status in HTTP_STATUS.items():
        if code != grpc.StatusCode.OK:
            codes.setdefault(status, []).append(code.name)
    return dict(sorted(codes.items()))


def _error_ref(status: int) -> dict[str, str]:
    return {"$ref": f"#/components/responses/{_response_name(status)}"}


def _response_name(status: int) -> str:
    return _RESPONSE_NAMES.get(status, f"Error{status}")


def _verb_path_405(op: dict[str, Any]) -> dict[str, Any]:
    """`op` of `/v1/sessions/{id}` with its 405: an id that ends in a custom method's name
    (`{id}:fork`) names that method's path, which takes POST only."""
    op["responses"]["405"] = _error_ref(405)
    return op


def _error_responses() -> dict[str, Any]:
    """The error answers: each with the error body (but 499's, which has none), and the
    headers some carry."""
    statuses = {**error_statuses(), 405: ["UNIMPLEMENTED"], **BODY_REFUSALS}
    responses = {}
    for status, codes in sorted(statuses.items()):
        response: dict[str, Any] = {"description": f"{', '.join(codes)}{_WHEN.get(status, '')}"}
        if status != 499:  # no body: nobody is there to read it
            response["content"] = {"application/json": {"schema": {"$ref": ERROR_REF}}}
        headers = {name: {"description": text, "schema": {"type": "string"}}
                   for name, text in _HEADERS.get(status, {}).items()}  # fmt: skip
        if headers:
            response["headers"] = headers
        responses[_response_name(status)] = response
    return responses


# HTTP statuses of their own for refusals of a request's body (`status_map.HttpRefusal`), with
# the gRPC codes their bodies name.
BODY_REFUSALS: dict[int, list[str]] = {408: ["INVALID_ARGUMENT"], 415: ["UNIMPLEMENTED"]}

_RESPONSE_NAMES = {
    400: "BadRequest", 401: "Unauthenticated", 403: "PermissionDenied", 404: "NotFound",
    405: "MethodNotAllowed", 408: "RequestTimeout", 409: "Conflict",
    415: "UnsupportedMediaType", 429: "ResourceExhausted",
    499: "ClientClosedRequest", 500: "InternalError", 501: "NotImplemented",
    503: "Unavailable", 504: "DeadlineExceeded",
}  # fmt: skip
_WHEN = {
    405: ": the path takes other methods (`Allow` names them)",
    408: ": the request body did not arrive within `server.http_body_timeout_seconds` (the "
    "connection is closed)",
    415: ": a Content-Encoding the server does not read (`Accept-Encoding` names those it "
    "does; the connection is closed)",
    499: ": the client closed the connection before the answer (no body: a proxy's log shows it)",
    500: ": a bug (the message and ErrorInfo carry an error id, as in the server log) or a "
    "session's records lost",
    501: ": a method this server does not implement",
    503: ": starting (models loading), draining, or the session moved; retry",
}
_HEADERS = {
    401: {"WWW-Authenticate": 'Bearer realm="seqserve"'},
    405: {"Allow": "the methods the path takes"},
    415: {"Accept-Encoding": "the content codings a request body is read in: gzip, deflate"},
    429: {"Retry-After": "seconds, when the server says when to retry"},
    503: {"Retry-After": "seconds, when the server says when to retry"},
}
_SESSION_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
