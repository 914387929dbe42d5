"""`CallAuth` on its own: which certificate names and proxy-forwarded names make a principal."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from service.errors import Unauthenticated
from service.security.call_auth import CLIENT_HEADER, CallAuth
from service.security.principal import Principal
from service.security.tokens import TokenFile, add_token

METHOD = "/seqserve.v1.SessionService/Step"


class Context:
    """What `CallAuth` reads of a call: its metadata and its TLS peer's common name."""

    def __init__(self, common_name: bytes | None = None, **metadata: str) -> None:
        self._common_name = common_name
        self._metadata = [
            SimpleNamespace(key=k.replace("_", "-"), value=v) for k, v in metadata.items()
        ]

    def invocation_metadata(self) -> list[Any]:
        return self._metadata

    def auth_context(self) -> dict[str, list[bytes]]:
        return {} if self._common_name is None else {"x509_common_name": [self._common_name]}


def test_a_certificates_common_name_is_the_principal() -> None:
    auth = CallAuth(tokens=None, client_certificates=True)
    assert auth.principal(METHOD, Context(b"alice@example.org")) == Principal(
        "cert:alice@example.org", "client"
    )


@pytest.mark.parametrize("name", [b"alice\n", b"", b"a/b", b"x" * 65, b"bob ", b" bob"])
def test_a_common_name_that_cannot_name_a_principal_is_refused(name: bytes) -> None:
    # `^...$` with `re.match` let "alice\n" through as the principal "cert:alice\n"; a space
    # at either end made a name no `revoke` line could name (the file's lines are stripped).
    auth = CallAuth(tokens=None, client_certificates=True)
    with pytest.raises(Unauthenticated, match="common name"):
        auth.principal(METHOD, Context(name))


@pytest.mark.parametrize(
    ("forwarded", "principal"),
    [("alice", "cert:alice"), (" alice\n", "cert:alice"), ("", None), ("a/b", None)],
)
def test_a_proxy_forwards_only_a_name_that_can_be_a_principal(
    forwarded: str, principal: str | None
) -> None:
    # The forwarded header is stripped first: surrounding spaces and line breaks are not part
    # of the name.
    auth = CallAuth(tokens=None, client_certificates=True)
    proxy = Principal("nginx", "proxy")
    context = Context(**{CLIENT_HEADER.replace("-", "_"): forwarded})
    if principal is not None:
        assert auth._forwarded(context, proxy) == Principal(principal, "client")
    else:
        with pytest.raises(Unauthenticated, match="no usable client identity"):
            auth._forwarded(context, proxy)


def test_a_revoked_certificate_is_refused_directly_and_through_a_proxy(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("revoke cert:alice\n")
    auth = CallAuth(tokens=TokenFile(path), client_certificates=True)
    with pytest.raises(Unauthenticated, match="cert:alice is revoked"):
        auth.principal(METHOD, Context(b"alice"))
    with pytest.raises(Unauthenticated, match="cert:alice is revoked"):
        auth._forwarded(
            Context(**{CLIENT_HEADER.replace("-", "_"): "alice"}), Principal("n", "proxy")
        )
    assert auth.principal(METHOD, Context(b"bob")) == Principal("cert:bob", "client")


def test_a_server_of_client_certificates_alone_ignores_a_bearer_token() -> None:
    """With mutual TLS and no tokens file, a certificate the CA signed is the credential: a
    bearer token sent beside it (a client sends SEQSERVE_TOKEN wherever it goes) made the call
    UNAUTHENTICATED, saying the header was not `Bearer <token>`. Without a certificate the
    message says the server takes none."""
    auth = CallAuth(tokens=None, client_certificates=True)
    for header in ("Bearer sqs_elsewhere", "Basic abc", "Bearer "):
        context = Context(b"alice", authorization=header)
        assert auth.principal(METHOD, context) == Principal("cert:alice", "client")
    with pytest.raises(Unauthenticated, match=r"a client certificate \(it takes no bearer"):
        auth.principal(METHOD, Context(authorization="Bearer sqs_elsewhere"))


def test_a_token_that_is_not_utf8_is_an_invalid_token(tmp_path: Path) -> None:
    """An HTTP header's bytes that are not UTF-8 arrive as surrogates (aiohttp): hashing the
    token raised UnicodeEncodeError, a 500 INTERNAL with a traceback in the log."""
    path = tmp_path / "tokens"
    add_token(path, "alice", "client")
    auth = CallAuth(tokens=TokenFile(path), client_certificates=False)
    token = b"sqs_\xe9\xe9".decode("utf-8", "surrogateescape")
    with pytest.raises(Unauthenticated, match="invalid bearer token"):
        auth.principal(METHOD, Context(authorization=f"Bearer {token}"))
