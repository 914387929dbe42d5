"""TLS for the gRPC port, and the start-up check that refuses to serve a network in the clear."""

from __future__ import annotations

import ipaddress
import logging
import ssl

import grpc

from service.errors import InsecureBind, InvalidArgument
from service.settings import SecuritySettings

log = logging.getLogger(__name__)


def server_credentials(sec: SecuritySettings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings (None: plain text). With a client CA, clients must
    present a certificate it signed (mutual TLS)."""
    if sec.tls_cert is None and sec.tls_key is None:
        if sec.tls_client_ca is not None:
            raise InvalidArgument("tls_client_ca needs tls_cert and tls_key (mutual TLS is TLS)")
        return None
    if sec.tls_cert is None or sec.tls_key is None:
        raise InvalidArgument("TLS needs both --tls-cert and --tls-key")
    try:
        pair = (sec.tls_key.read_bytes(), sec.tls_cert.read_bytes())
        ca = sec.tls_client_ca.read_bytes() if sec.tls_client_ca is not None else None
    except OSError as exc:
        raise InvalidArgument(f"TLS file {exc.filename} cannot be read: {exc.strerror}") from None
    return grpc.ssl_server_credentials(
        [pair], root_certificates=ca, require_client_auth=ca is not None
    )


def loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, sec: SecuritySettings) -> None:
    """Refuse a non-loopback bind without TLS and credentials, unless `insecure` says the
    network is private (then a warning)."""
    if loopback(host):
        return
    protected = sec.tls_cert is not None and (
        sec.auth_tokens is not None or sec.tls_client_ca is not None
    )
    if protected:
        return
    if sec.insecure:
        log.warning(
            "serving %s without TLS and credentials (--insecure): anyone who reaches the port "
            "can use every session", host,
        )  # fmt: skip
        return
    raise InsecureBind(
        f"refusing to listen on {host} without TLS and tokens (or client certificates): set "
        "--tls-cert/--tls-key and --auth-tokens, or --insecure on a private network"
    )


def server_ssl_context(sec: SecuritySettings) -> ssl.SSLContext | None:
    """The same TLS as `server_credentials`, for the HTTP port (None: plain text)."""
    if server_credentials(sec) is None:  # validates the settings and the files the same way
        return None
    assert sec.tls_cert is not None and sec.tls_key is not None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(sec.tls_cert, sec.tls_key)
    if sec.tls_client_ca is not None:
        context.load_verify_locations(cafile=str(sec.tls_client_ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context
