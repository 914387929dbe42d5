"""Generic gRPC tooling works: a client that knows nothing but what server reflection tells it
builds the messages at run time and calls CreateSession and Step; the standard health check
answers SERVING."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from service.api.server import SeqServeServer
from service.client.client import SeqServeClient
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import types_pb2 as types

from .support import expect_status, text, tokens, top_ids

SESSION_SERVICE = "seqserve.v1.SessionService"


def _reflective_calls(target: str) -> dict[str, Any]:
    """Blocking (sync gRPC): run on a worker thread, since the server shares this event loop."""
    with grpc.insecure_channel(target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        pool = descriptor_pool.DescriptorPool(database)
        service = pool.FindServiceByName(SESSION_SERVICE)

        def call(method_name: str, body: dict[str, Any]) -> dict[str, Any]:
            method = service.methods_by_name[method_name]
            request_cls = message_factory.GetMessageClass(method.input_type)
            response_cls = message_factory.GetMessageClass(method.output_type)
            rpc = channel.unary_unary(
                f"/{service.full_name}/{method.name}",
                request_serializer=request_cls.SerializeToString,
                response_deserializer=response_cls.FromString,
            )
            response = rpc(json_format.ParseDict(body, request_cls()), timeout=10)
            return json_format.MessageToDict(response, preserving_proto_field_name=True)

        created = call("CreateSession", {"model": "tok", "seed": "3", "prefix": {"text": "ab"}})
        sid = created["session"]["session_id"]
        stepped = call(
            "Step",
            {"session_id": sid, "request_id": "dyn", "input": {"tokens": {"ids": [99, 100]}},
             "options": {"top_k": 4}},
        )  # fmt: skip
        try:
            call("Step", {"session_id": "s_missing", "input": {"text": "x"}})
            missing: grpc.StatusCode | None = None
        except grpc.RpcError as err:
            missing = err.code()  # type: ignore[attr-defined]
        return {
            "services": services,
            "methods": sorted(service.methods_by_name),
            "created": created,
            "stepped": stepped,
            "missing": missing,
        }


async def test_a_reflection_only_client_creates_and_steps(
    server: SeqServeServer, client: SeqServeClient
) -> None:
    got = await asyncio.to_thread(_reflective_calls, f"127.0.0.1:{server.port}")
    assert {
        SESSION_SERVICE,
        "seqserve.v1.ModelRegistry",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= got["services"]
    assert got["methods"] == sorted(
        ["CreateSession", "GetSession", "CloseSession", "ForkSession", "Step", "Stream", "Generate"]
    )
    session = got["created"]["session"]
    assert session["model"] == "tok" and session["seed"] == "3" and session["position"] == "2"
    stepped = got["stepped"]
    assert stepped["request_id"] == "dyn" and stepped["position"] == "4"
    dynamic_top = [t["id"] for t in stepped["prediction"]["tokens"]["top"]]
    assert len(dynamic_top) == 4
    assert got["missing"] == grpc.StatusCode.NOT_FOUND

    # The generated stubs agree with the dynamic client on the same inputs.
    same = await client.sessions.CreateSession(
        pb.CreateSessionRequest(model="tok", prefix=text("ab"))
    )
    typed = await client.sessions.Step(
        pb.StepRequest(
            session_id=same.session.session_id,
            input=tokens(99, 100),
            options=types.PredictionOptions(top_k=4),
        )
    )
    assert top_ids(typed.prediction) == dynamic_top


async def test_health_check_serving(server: SeqServeServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", SESSION_SERVICE, "seqserve.v1.ModelRegistry"):
            response = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert response.status == health_pb2.HealthCheckResponse.SERVING, name
        await expect_status(
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service")),
            grpc.StatusCode.NOT_FOUND,
            by_grpc=True,  # the standard health servicer's own status
        )
