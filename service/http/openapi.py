"""The OpenAPI 3.1 document of the HTTP/JSON API (`GET /v1/openapi.json`). Schemas come from
the protobuf descriptors themselves, as protobuf's JSON mapping renders each field, so the
document cannot drift from `protos/`."""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import FieldDescriptor

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
    errors = {
        str(status): {"$ref": f"#/components/responses/{name}"}
        for status, name in _ERROR_RESPONSES.items()
    }

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
        if body is not None:
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
            "get": answer(pb.GetSessionResponse.DESCRIPTOR, "GetSession", session=True),
            "delete": answer(pb.CloseSessionResponse.DESCRIPTOR, "CloseSession", session=True),
        },
        "/v1/sessions/{id}:fork": {"post": answer(
            pb.ForkSessionResponse.DESCRIPTOR, "ForkSession", pb.ForkSessionRequest.DESCRIPTOR,
            True)},
        "/v1/sessions/{id}:step": {"post": answer(
            pb.StepResponse.DESCRIPTOR, "Step", pb.StepRequest.DESCRIPTOR, True)},
        "/v1/sessions/{id}:generate": {"post": generate},
    }  # fmt: skip
    error = {"description": "an error", "content": {"application/json": {"schema": ERROR_SCHEMA}}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "seqserve HTTP/JSON API",
            "version": "v1",
            "description": "The seqserve.v1 gRPC API over HTTP: bodies in protobuf's JSON "
            "mapping, errors with the standard gRPC → HTTP status mapping.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas.components,
            "responses": {name: error for name in _ERROR_RESPONSES.values()},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{}, {"bearer": []}],
    }


_ERROR_RESPONSES = {
    400: "BadRequest", 401: "Unauthenticated", 403: "PermissionDenied", 404: "NotFound",
    409: "Conflict", 429: "ResourceExhausted", 503: "Unavailable",
}  # fmt: skip
_SESSION_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
