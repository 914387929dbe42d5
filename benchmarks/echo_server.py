"""The bare gRPC ceiling: `seqserve.v1` message shapes through a server that does no model work.

It answers the calls the load generator makes (`GetModel`, `CreateSession`, `CloseSession`,
`Stream`, `Generate`) with replies of the real server's shape and size (a top-5 prediction per
feed item, one token per generation step), but computes nothing: whatever rate the same load
reaches here is what gRPC and protobuf in Python allow, on this machine, with no model.

    python -m benchmarks.echo_server --port 0 --port-file ports.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from service.api.event_loop import grpc_server, run
from service.pb.seqserve.v1 import model_registry_pb2 as reg_pb
from service.pb.seqserve.v1 import model_registry_pb2_grpc as reg_grpc
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import session_service_pb2_grpc as pb_grpc
from service.pb.seqserve.v1 import types_pb2 as types
from service.sessions.session import ROUTE_HEADER
from service.settings import ServerSettings

VOCAB = 256
TOP_K = 5  # the real server's default top-k


def _prediction(position: int) -> types.Prediction:
    top = [types.TopToken(id=101 + i, prob=0.2, text=chr(101 + i)) for i in range(TOP_K)]
    return types.Prediction(tokens=types.TokenPrediction(top=top), position=position)


def _inputs(msg: types.Input) -> int:
    kind = msg.WhichOneof("kind")
    if kind == "tokens":
        return len(msg.tokens.ids)
    if kind == "text":
        return len(msg.text.encode())
    return 1 if kind == "frames" else 0


def _max_tokens(sampling: types.Sampling) -> int:
    return sampling.max_tokens if sampling.HasField("max_tokens") else 16


class EchoSessions(pb_grpc.SessionServiceServicer):
    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._positions: dict[str, int] = {}

    def _advance(self, session_id: str, n: int) -> int:
        position = self._positions.get(session_id, 0) + n
        self._positions[session_id] = position
        return position

    async def CreateSession(self, request, context):  # type: ignore[no-untyped-def]
        # The routing key in the id, as the service does (a multiplexing client groups by it).
        route = dict(context.invocation_metadata() or ()).get(ROUTE_HEADER, "echo")
        session_id = f"s_{route}.{next(self._ids)}"
        self._positions[session_id] = 0
        return pb.CreateSessionResponse(
            session=types.Session(session_id=session_id, model=request.model, version=1)
        )

    async def CloseSession(self, request, context):  # type: ignore[no-untyped-def]
        self._positions.pop(request.session_id, None)
        return pb.CloseSessionResponse(session=types.Session(session_id=request.session_id))

    async def Step(self, request, context):  # type: ignore[no-untyped-def]
        position = self._advance(request.session_id, _inputs(request.input))
        return pb.StepResponse(
            session_id=request.session_id,
            request_id=request.request_id,
            position=position,
            prediction=_prediction(position),
        )

    async def Stream(self, request_iterator, context) -> AsyncIterator[pb.StreamResponse]:  # type: ignore[no-untyped-def]
        async for request in request_iterator:
            replies = []
            generating = []
            for item in request.items:
                position = self._advance(item.session_id, _inputs(item.input))
                if item.HasField("generate"):
                    generating.append(item)
                    continue
                replies.append(
                    pb.StreamReply(
                        session_id=item.session_id,
                        request_id=item.request_id,
                        position=position,
                        prediction=_prediction(position),
                    )
                )
            if replies:
                yield pb.StreamResponse(replies=replies)
            for item in generating:
                n = _max_tokens(item.generate.sampling)
                for i in range(n):
                    yield pb.StreamResponse(
                        replies=[
                            pb.StreamReply(
                                session_id=item.session_id,
                                request_id=item.request_id,
                                position=self._advance(item.session_id, 1),
                                token=_token(i, n),
                            )
                        ]
                    )

    async def Generate(self, request, context) -> AsyncIterator[pb.GenerateResponse]:  # type: ignore[no-untyped-def]
        self._advance(request.session_id, _inputs(request.prompt))
        n = _max_tokens(request.sampling)
        for i in range(n):
            yield pb.GenerateResponse(
                session_id=request.session_id,
                position=self._advance(request.session_id, 1),
                token=_token(i, n),
            )


def _token(i: int, n: int) -> types.GeneratedToken:
    finish = types.FINISH_REASON_MAX_TOKENS if i == n - 1 else types.FINISH_REASON_UNSPECIFIED
    return types.GeneratedToken(id=101, text="e", finish_reason=finish)


class EchoRegistry(reg_grpc.ModelRegistryServicer):
    """Describes every model name as a byte-token model with one version."""

    async def GetModel(self, request, context):  # type: ignore[no-untyped-def]
        manifest = {
            "name": request.name,
            "version": 1,
            "input": {"kind": "tokens", "vocab_size": VOCAB},
        }
        return reg_pb.GetModelResponse(
            model=reg_pb.ModelDetail(
                name=request.name,
                versions=[reg_pb.ModelVersion(version=1, manifest_json=json.dumps(manifest))],
                default_version=1,
            )
        )


async def serve(host: str, port: int, port_file: Path | None) -> None:
    server = grpc_server(ServerSettings().max_message_bytes)  # the service's options
    pb_grpc.add_SessionServiceServicer_to_server(EchoSessions(), server)
    reg_grpc.add_ModelRegistryServicer_to_server(EchoRegistry(), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"echo listening on {host}:{bound}", flush=True)
    if port_file is not None:  # atomically: a reader polls for it
        tmp = port_file.with_name(f".{port_file.name}.tmp")
        tmp.write_text(json.dumps({"port": bound}) + "\n")
        os.replace(tmp, port_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--port-file", type=Path, help="write the bound port here as JSON")
    args = parser.parse_args(argv)
    run(serve(args.host, args.port, args.port_file))  # the service's event loop
    return 0


if __name__ == "__main__":
    sys.exit(main())
