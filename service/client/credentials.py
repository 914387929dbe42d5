"""How a client proves who it is: a bearer token (sent as `authorization: Bearer <token>` on
every call) and TLS (a CA to trust the server; a client certificate and key for mutual TLS).

    creds = Credentials(token=..., ca_file=Path("ca.pem"))
    channel = creds.channel("seqserve.example.com:443")

`SEQSERVE_TOKEN` in the environment is the token when none is given.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc


@dataclass(frozen=True)
class Credentials:
    token: str | None = None
    ca_file: Path | None = None  # trust this CA for the server's certificate (TLS)
    cert_file: Path | None = None  # this client's certificate (mutual TLS)
    key_file: Path | None = None

    @classmethod
    def from_env(cls) -> Credentials:
        return cls(token=os.environ.get("SEQSERVE_TOKEN") or None)

    @property
    def tls(self) -> bool:
        return self.ca_file is not None or self.cert_file is not None

    def channel(self, target: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
        token = self.token or os.environ.get("SEQSERVE_TOKEN")
        interceptors = _bearer(token) if token else None
        if not self.tls:
            return grpc.aio.insecure_channel(
                target, options=list(options), interceptors=interceptors
            )
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.ca_file.read_bytes() if self.ca_file else None,
            private_key=self.key_file.read_bytes() if self.key_file else None,
            certificate_chain=self.cert_file.read_bytes() if self.cert_file else None,
        )
        return grpc.aio.secure_channel(
            target, creds, options=list(options), interceptors=interceptors
        )


def add_arguments(p: argparse.ArgumentParser) -> None:
    """--token, --tls-ca, --tls-cert, --tls-key for a command that calls a server."""
    p.add_argument("--token", help="bearer token (default: SEQSERVE_TOKEN)")
    p.add_argument("--tls-ca", type=Path, help="PEM CA of the server's certificate: use TLS")
    p.add_argument("--tls-cert", type=Path, help="PEM client certificate (mutual TLS)")
    p.add_argument("--tls-key", type=Path, help="PEM key of --tls-cert")


def from_args(args: argparse.Namespace) -> Credentials:
    return Credentials(
        token=getattr(args, "token", None) or os.environ.get("SEQSERVE_TOKEN") or None,
        ca_file=getattr(args, "tls_ca", None),
        cert_file=getattr(args, "tls_cert", None),
        key_file=getattr(args, "tls_key", None),
    )


def _bearer(token: str) -> list[grpc.aio.ClientInterceptor]:
    """One interceptor per call type (a channel files each interceptor under one type only)."""
    header = ("authorization", f"Bearer {token}")

    def details(d: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(d.metadata or ()))
        metadata.add(*header)
        return grpc.aio.ClientCallDetails(
            d.method, d.timeout, metadata, d.credentials, d.wait_for_ready
        )

    class UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation, d, request):  # type: ignore[no-untyped-def, override]
            return await continuation(details(d), request)

    class UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
        async def intercept_unary_stream(self, continuation, d, request):  # type: ignore[no-untyped-def, override]
            return await continuation(details(d), request)

    class StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
        async def intercept_stream_unary(self, continuation, d, requests):  # type: ignore[no-untyped-def, override]
            return await continuation(details(d), requests)

    class StreamStream(grpc.aio.StreamStreamClientInterceptor):
        async def intercept_stream_stream(self, continuation, d, requests):  # type: ignore[no-untyped-def, override]
            return await continuation(details(d), requests)

    return [UnaryUnary(), UnaryStream(), StreamUnary(), StreamStream()]
