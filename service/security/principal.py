"""The principal of the call being served, for the code below the API that checks ownership.

The auth interceptor sets it for each call (a context variable: tasks a call starts inherit it,
the engine's own background tasks, started before any call, have none). With auth off there is
no principal and every check passes, as before auth existed.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Literal

# `proxy`: a load balancer that verified a client's certificate and names it in the
# `x-seqserve-client` header; only a proxy's calls are believed about who the client is.
Role = Literal["client", "admin", "proxy"]
ROLES: tuple[Role, ...] = ("client", "admin", "proxy")


@dataclass(frozen=True)
class Principal:
    name: str
    role: Role

    @property
    def admin(self) -> bool:
        return self.role == "admin"


current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "seqserve_principal", default=None
)


def caller() -> Principal | None:
    return current.get()


def may_see(owner: str) -> bool:
    """Whether the caller may learn anything about a session owned by `owner`. With auth off
    (no caller) anyone may see any; with it on, only the owner: a session made while auth was
    off (owner "") is no principal's, so none sees it (once auth is turned on, the sessions
    made before are not open to every token)."""
    who = current.get()
    return who is None or who.name == owner


def owner_for_new() -> str:
    """The owner a session made now gets: the caller's name ("" with auth off)."""
    who = current.get()
    return "" if who is None else who.name
