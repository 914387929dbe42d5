"""Authenticating a call: a bearer token from the tokens file, or the client certificate of a
mutual-TLS connection. Health is open (probes carry no credentials); every other method needs a
principal once tokens or client certificates are configured, and registry writes need `admin`.

A call that lasts (a Stream, a generation) holds a `Grant`: when the tokens file's entries
change while it is open, it authenticates again, and a token revoked or given another role
ends it (at its next message or reply, or by `RevocationWatch` while it waits). A client
certificate is not in the file (its CA vouches for it), but a `revoke cert:<CN>` line there
refuses its common name from then on, over direct mutual TLS and through a proxy alike, and
ends its open calls as a revoked token's are."""

from __future__ import annotations

import contextvars
from typing import Any

from service.errors import PermissionDenied, SeqServeError, Unauthenticated
from service.security.principal import Principal
from service.security.revocation_watch import RevocationWatch
from service.security.tokens import CERT_PREFIX, COMMON_NAME_RE, TokenFile

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
CLIENT_HEADER = "x-seqserve-client"  # set by a proxy (role `proxy`) to the client it verified
REVOKED_MESSAGE = (
    "the call's credentials were revoked or changed while it was open; "
    "call again with a valid token"
)
ADMIN_METHODS = frozenset(
    {"/seqserve.v1.ModelRegistry/SetAlias", "/seqserve.v1.ModelRegistry/DeleteAlias"}
)


class CallAuth:
    def __init__(self, tokens: TokenFile | None, client_certificates: bool) -> None:
        self.tokens = tokens
        self.client_certificates = client_certificates
        # The open lasting calls that wait: ended when revoked (None: nothing can be revoked).
        self.revocations = RevocationWatch(tokens) if tokens is not None else None

    @property
    def enabled(self) -> bool:
        return self.tokens is not None or self.client_certificates

    def principal(self, method: str, context: Any) -> Principal | None:
        """Who calls `method` (None: auth is off, or the method is open). Raises
        Unauthenticated or PermissionDenied."""
        if not self.enabled or method.startswith(OPEN_PREFIXES):
            return None
        who = self._from_token(context) or self._from_certificate(context)
        if who is not None and who.role == "proxy":
            who = self._forwarded(context, who)
        if who is None:
            raise Unauthenticated(
                "this server needs credentials: "
                + (
                    "a client certificate (it takes no bearer tokens)"
                    if self.tokens is None
                    else "send 'authorization: Bearer <token>'"
                    + (" or a client certificate" if self.client_certificates else "")
                )
            )
        if method in ADMIN_METHODS and not who.admin:
            raise PermissionDenied(f"{method.rsplit('/', 1)[-1]} needs the admin role")
        return who

    def grant(self, method: str, context: Any, who: Principal | None) -> Grant | None:
        """What a lasting call admitted as `who` checks again as it goes (None: nothing can
        be revoked, no tokens file or no principal)."""
        if self.tokens is None or who is None:
            return None
        return Grant(self, self.tokens, method, context, who)

    def _from_token(self, context: Any) -> Principal | None:
        header = _one(context, "authorization")
        if not header or self.tokens is None:  # none, or a server of client certificates
            return None  # alone (a client sends SEQSERVE_TOKEN wherever it goes)
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("invalid credentials: expected 'authorization: Bearer <token>'")
        who = self.tokens.authenticate(token.strip())
        if who is None:
            raise Unauthenticated("invalid bearer token")
        return who

    def _forwarded(self, context: Any, proxy: Principal) -> Principal:
        """The client a proxy vouches for (it verified the client's certificate); a proxy
        that names no client is refused: it never acts as itself."""
        name = _one(context, CLIENT_HEADER).strip()
        if not COMMON_NAME_RE.fullmatch(name):
            raise Unauthenticated(
                f"proxy {proxy.name} forwarded no usable client identity ({CLIENT_HEADER})"
            )
        return self._unrevoked(Principal(CERT_PREFIX + name, "client"))  # as if it came here

    def _from_certificate(self, context: Any) -> Principal | None:
        if not self.client_certificates:
            return None
        auth = context.auth_context() or {}
        names = auth.get("x509_common_name") or []
        if not names:
            return None
        # gRPC names one CN of a subject that has two: which is meant is not ours to guess
        # (nginx would read the other one first), so the subject itself is counted too.
        if len(names) > 1 or any(_cn_count(s) > 1 for s in auth.get("x509_subject") or ()):
            raise Unauthenticated("the client certificate has more than one common name")
        name = names[0].decode() if isinstance(names[0], bytes) else str(names[0])
        if not COMMON_NAME_RE.fullmatch(name):
            raise Unauthenticated("the client certificate's common name cannot name a principal")
        # Its own namespace: a certificate never stands for a token's principal, nor the reverse.
        return self._unrevoked(Principal(CERT_PREFIX + name, "client"))

    def _unrevoked(self, who: Principal) -> Principal:
        """`who`, a certificate's principal, unless the tokens file revokes its name."""
        if self.tokens is not None and self.tokens.revoked(who.name):
            raise Unauthenticated(f"client certificate {who.name} is revoked")
        return who


class Grant:
    """A lasting call's admission, checked again (`check`, before each message it applies and
    each reply it sends) when the tokens file's entries have changed since: one integer
    compare when they have not (and the file's own re-read, at most once a second)."""

    __slots__ = ("_auth", "_context", "_generation", "_method", "_tokens", "_who")

    def __init__(
        self, auth: CallAuth, tokens: TokenFile, method: str, context: Any, who: Principal
    ) -> None:
        self._auth, self._tokens, self._method, self._context = auth, tokens, method, context
        self._who: Principal | None = who  # None once ended (`end`): no principal is it
        self._generation = tokens.generation

    def check(self) -> None:
        """Raises Unauthenticated if the call's credentials no longer name the principal it
        was admitted as (revoked, or another role)."""
        if self._tokens.refresh() != self._generation:
            self._recheck()

    def _recheck(self) -> None:
        generation = self._tokens.generation
        try:
            who = self._auth.principal(self._method, self._context)
        except SeqServeError:
            who = None
        if who is None or who != self._who:
            raise Unauthenticated(REVOKED_MESSAGE)
        self._generation = generation  # still good: no re-check until the next change

    def end(self) -> None:
        """The call was ended for a revocation (by the watch, from outside): every later
        check fails, even if its token is good again by then (it must not go on as if not
        ended: its client has its status)."""
        self._who, self._generation = None, -1

    def admitted_under(self, generation: int) -> bool:
        """Whether the call was last found good under the tokens file's `generation`."""
        return self._generation == generation

    def revoked(self) -> bool:
        """`check`, as a question."""
        try:
            self.check()
        except Unauthenticated:
            return True
        return False


# The grant of the lasting call being served (set by the interceptor: Stream reads it).
current_grant: contextvars.ContextVar[Grant | None] = contextvars.ContextVar(
    "seqserve_grant", default=None
)


def _one(context: Any, key: str) -> str:
    """The value of header `key` ("" when absent); one sent twice is refused: gRPC and HTTP
    would each pick another of the two, and a proxy that adds its header after the client's
    would let the client choose."""
    values = [str(m.value) for m in context.invocation_metadata() or () if m.key == key]
    if len(values) > 1:
        raise Unauthenticated(f"{key} was sent more than once")
    return values[0] if values else ""


def _cn_count(subject: bytes | str) -> int:
    """The CN attributes of an RFC 2253 subject ("CN=alice,CN=bob" has two; "O=x\\,CN=a,CN=b"
    one: an escaped comma is part of a value, and so is any escaped character, a backslash
    included: in "O=x\\\\,CN=a,CN=b" the comma after the escaped backslash ends the O)."""
    text = subject.decode(errors="replace") if isinstance(subject, bytes) else subject
    count, start, i = 0, 0, 0
    while i <= len(text):
        if i < len(text) and text[i] == "\\":
            i = min(i + 2, len(text))  # an escaped character: part of the value
            continue
        if i == len(text) or text[i] in ",+":  # an attribute ends
            name = text[start:i].partition("=")[0]
            count += name.strip().upper() == "CN"
            start = i + 1
        i += 1
    return count
