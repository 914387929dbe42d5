"""How a client proves who it is: a bearer token (sent as `authorization: Bearer <token>` on
every call) and TLS (a CA to trust the server; a client certificate and key for mutual TLS).

    creds = Credentials(token=..., ca_file=Path("ca.pem"))
    channel = creds.channel("seqserve.example.com:443")

`SEQSERVE_TOKEN` in the environment is the token when none is given.

TLS: `tls=True` uses the system's default roots; a CA file (and a client certificate) imply it.
A token never travels in plain text to a host that is not this machine's loopback (127.0.0.0/8,
::1, localhost, a unix socket): an explicit one is refused when the channel is made
(`PlaintextToken`), unless `insecure=True` says the network is private; the implicit
`SEQSERVE_TOKEN` is left off (with a warning).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from service.client.target_address import is_loopback_target, target_host

log = logging.getLogger(__name__)


class PlaintextToken(ValueError):
    """A token would be sent without TLS to a host that is not loopback."""


class CredentialFileError(ValueError):
    """A --tls-ca, --tls-cert or --tls-key file that cannot be read (named in the message)."""


@dataclass(frozen=True)
class Credentials:
    token: str | None = None  # None: SEQSERVE_TOKEN, if set (the implicit token)
    ca_file: Path | None = None  # trust this CA for the server's certificate (TLS)
    cert_file: Path | None = None  # this client's certificate (mutual TLS)
    key_file: Path | None = None
    tls: bool = False  # TLS with the system's default roots (implied by a CA or a cert file)
    insecure: bool = False  # send the token in plain text to any host (a private network)

    @classmethod
    def from_env(cls) -> Credentials:
        """No explicit token: `SEQSERVE_TOKEN` is used where it is safe (see `token_for`)."""
        return cls()

    @property
    def secure(self) -> bool:
        """Whether the channel uses TLS."""
        return self.tls or self.ca_file is not None or self.cert_file is not None

    def token_for(self, target: str) -> str | None:
        """The token to send to `target`: raises `PlaintextToken` for an explicit token that
        would travel in plain text to a host that is not loopback; the implicit one
        (SEQSERVE_TOKEN) is then not sent."""
        explicit = self.token is not None
        token = self.token if explicit else (os.environ.get("SEQSERVE_TOKEN") or None)
        if not token or self.secure or self.insecure or is_loopback_target(target):
            return token
        host = target_host(target)
        if explicit:
            raise PlaintextToken(
                f"a token would travel in plain text to {host}: use TLS (tls=True or a CA "
                "file; --tls or --tls-ca), or say the network is private (insecure=True; "
                "--insecure)"
            )
        log.warning(
            "SEQSERVE_TOKEN not sent: it would travel in plain text to %s (use TLS, or pass "
            "the token explicitly with insecure=True on a private network)",
            host,
        )
        return None

    def channel(self, target: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
        token = self.token_for(target)
        interceptors = _bearer(token) if token else None
        if not self.secure:
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
    """--token, --tls, --tls-ca, --tls-cert, --tls-key, --insecure for a command that calls a
    server."""
    p.add_argument("--token", help="bearer token (default: SEQSERVE_TOKEN)")
    p.add_argument("--tls", action="store_true", help="use TLS, trusting the system's roots")
    p.add_argument("--tls-ca", type=Path, help="PEM CA of the server's certificate: use TLS")
    p.add_argument("--tls-cert", type=Path, help="PEM client certificate (mutual TLS)")
    p.add_argument("--tls-key", type=Path, help="PEM key of --tls-cert")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="send --token without TLS to a host that is not loopback (a private network only)",
    )


def from_args(args: argparse.Namespace) -> Credentials:
    """The flags' credentials; `CredentialFileError` for a TLS file that cannot be read (the
    channel would only read it on the first call, with a traceback)."""
    for flag in ("--tls-ca", "--tls-cert", "--tls-key"):
        path = getattr(args, flag[2:].replace("-", "_"), None)
        if path is not None:
            _check_readable(flag, path)
    return Credentials(
        token=getattr(args, "token", None) or None,  # None: SEQSERVE_TOKEN where it is safe
        ca_file=getattr(args, "tls_ca", None),
        cert_file=getattr(args, "tls_cert", None),
        key_file=getattr(args, "tls_key", None),
        tls=bool(getattr(args, "tls", False)),
        insecure=bool(getattr(args, "insecure", False)),
    )


def _check_readable(flag: str, path: Path) -> None:
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise CredentialFileError(f"{flag} {path}: {exc.strerror}") from None


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
