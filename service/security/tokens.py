"""The tokens file: `<principal> <role> <sha256 hex of the token>` per line, `#` comments, and
`revoke cert:<common name>` lines: client certificates are not in the file (their CA vouches for
them), so one that must stop working before it expires is named there (`revoked`).

Only hashes are stored; a token is checked by hashing it and comparing with every line in
constant time. The file is re-read when it changes (its mtime and size are checked at most once
a second), so tokens are added and revoked without a restart. Tokens are never logged.

Each reload that changes the entries bumps `generation`: a call that outlives its first check
(a Stream, a generation) compares it with the one it was admitted under, and authenticates
again only when it moved (`call_auth.Grant`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from service.errors import InvalidArgument
from service.security.principal import ROLES, Principal, Role

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")  # no ':' (certificate names are "cert:...")
# What a certificate's common name may be to be a principal ("cert:<CN>", `call_auth`): no
# space at either end, where a stripped `revoke` line could not name it.
COMMON_NAME_RE = re.compile(r"^(?! )[A-Za-z0-9_.@ -]{1,64}(?<! )$")
CERT_PREFIX = "cert:"
REVOKE = "revoke"
_HASH_RE = re.compile(r"^[0-9a-f]{64}$")
_CHECK_EVERY_S = 1.0


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class _Entry:
    principal: Principal
    sha256: bytes


@dataclass(frozen=True)
class Entries:
    tokens: tuple[_Entry, ...] = ()
    revoked: frozenset[str] = frozenset()  # "cert:<common name>"


def parse(text: str, source: str = "tokens file") -> Entries:
    """The entries of a tokens file; InvalidArgument naming the line of a malformed one."""
    tokens: list[_Entry] = []
    revoked: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if parts[0] == REVOKE and not (len(parts) == 3 and parts[1] in ROLES):
            named = line[len(REVOKE) :].strip()  # a common name may hold spaces, kept as they are
            if not (
                named.startswith(CERT_PREFIX)
                and COMMON_NAME_RE.fullmatch(named[len(CERT_PREFIX) :])
            ):
                raise InvalidArgument(
                    f"{source} line {number}: expected 'revoke cert:<common name>' (1-64 "
                    "characters of A-Z a-z 0-9 _ . @ - and inner spaces)"
                )
            revoked.add(named)
            continue  # (a principal named "revoke" has a token line: three words, a role)
        if (
            len(parts) != 3
            or not _NAME_RE.fullmatch(parts[0])
            or parts[1] not in ROLES
            or not _HASH_RE.fullmatch(parts[2])
        ):
            raise InvalidArgument(
                f"{source} line {number}: expected '<principal> <role> <sha256 hex>' with role "
                f"one of {', '.join(ROLES)}"
            )
        role: Role = (
            "admin" if parts[1] == "admin" else "proxy" if parts[1] == "proxy" else "client"
        )
        tokens.append(_Entry(Principal(parts[0], role), bytes.fromhex(parts[2])))
    return Entries(tuple(tokens), frozenset(revoked))


class TokenFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries = Entries()
        self._stamp: tuple[float, int] | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        self.generation = 0  # bumped by each reload that changes the entries
        self.reload(force=True)

    def reload(self, *, force: bool = False) -> None:
        """Re-read the file if it changed. A file that disappeared or cannot be read refuses
        every token (fail closed); a malformed one keeps the last good entries (a half-written
        file must not lock everyone out) and says so in the log once per change."""
        try:
            st = os.stat(self.path)
        except OSError as exc:
            if force:
                raise InvalidArgument(
                    f"tokens file {self.path} cannot be read: {exc.strerror}"
                ) from None
            if self._stamp is not None:  # gone (said once): no token is good any more
                log.error("tokens file %s cannot be read (%s): refusing every token (the "
                          "certificates it revoked stay revoked)", self.path,
                          exc.strerror)  # fmt: skip
                self._replace(Entries(revoked=self._entries.revoked), None)
            return
        stamp = (st.st_mtime, st.st_size)
        if stamp == self._stamp and not force:
            return
        try:
            entries = parse(_text(self.path), str(self.path))
        except (OSError, InvalidArgument) as exc:
            if force:
                raise
            log.error("tokens file %s not reloaded: %s", self.path, exc)
            self._stamp = stamp
            return
        self._replace(entries, stamp)
        log.info("tokens file %s: %d tokens, %d certificates revoked", self.path,
                 len(entries.tokens), len(entries.revoked))  # fmt: skip

    def _replace(self, entries: Entries, stamp: tuple[float, int] | None) -> None:
        with self._lock:
            if entries != self._entries:  # a rewrite with the same lines revokes nothing
                self.generation += 1
            self._entries, self._stamp = entries, stamp

    def refresh(self) -> int:
        """Re-read the file if a second has passed since it was last looked at; the
        generation of its entries."""
        now = time.monotonic()
        if now - self._checked >= _CHECK_EVERY_S:
            self._checked = now
            self.reload()
        return self.generation

    def authenticate(self, token: str) -> Principal | None:
        self.refresh()
        # An HTTP header's bytes that are not UTF-8 come as surrogates: no token, not an error.
        wanted = hashlib.sha256(token.encode(errors="surrogateescape")).digest()
        found = None
        for entry in self._entries.tokens:  # every entry, always: no early exit to time
            if hmac.compare_digest(entry.sha256, wanted):
                found = entry.principal
        return found

    def revoked(self, name: str) -> bool:
        """Whether a `revoke` line names the certificate principal `name` ("cert:<CN>")."""
        self.refresh()
        return name in self._entries.revoked


def _text(path: Path) -> str:
    try:
        return path.read_bytes().decode()
    except UnicodeDecodeError as exc:  # a binary file or another encoding: malformed
        raise InvalidArgument(f"{path}: not UTF-8 text (byte {exc.start})") from None


def add_token(path: Path, principal: str, role: str) -> str:
    """A new random token for `principal`: its hash appended to the file (made 0600 if new);
    the token itself is returned, to be shown once."""
    if not _NAME_RE.fullmatch(principal):
        raise InvalidArgument("principal must be 1-64 characters of A-Z a-z 0-9 _ . @ -")
    if role not in ROLES:
        raise InvalidArgument(f"role must be one of {', '.join(ROLES)}")
    # A recognisable prefix (secret scanners, logs) that also keeps it from reading as a flag.
    token = "sqs_" + secrets.token_urlsafe(32)
    line = f"{principal} {role} {digest(token)}\n".encode()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "ab") as f:
        f.write(b"\n" + line if _last_line_open(fd) else line)
    return token


def _last_line_open(fd: int) -> bool:
    """Whether the file's last line has no newline (an editor or `printf` left it so): the new
    line would be glued onto it, spoiling both tokens."""
    size = os.fstat(fd).st_size
    return size > 0 and os.pread(fd, 1, size - 1) != b"\n"
