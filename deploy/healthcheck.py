#!/usr/bin/env python3
"""Container health check: exit 0 when the local gRPC server reports SERVING.

Asks the standard grpc.health.v1 service on 127.0.0.1 (port SEQSERVE_SERVER__PORT, default
50051), so it fails while the server is starting, draining or gone.
"""

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main() -> int:
    port = os.environ.get("SEQSERVE_SERVER__PORT", "50051")
    options = [("grpc.enable_http_proxy", 0)]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=3
            )
        except grpc.RpcError as exc:
            print(f"unhealthy: {exc.code().name}", file=sys.stderr)
            return 1
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    if not serving:
        print(
            f"unhealthy: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}",
            file=sys.stderr,
        )
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
