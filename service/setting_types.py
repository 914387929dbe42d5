"""The types and checks of setting values (`settings.py`): ranges, paths as a shell reads them,
a state tier's URL. A bad value raises ValueError, which `config_sources` words as one line
naming the setting."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, urlsplit

from pydantic import AfterValidator, BeforeValidator, Field


def off_or_at_least(floor: float) -> AfterValidator:
    """0 (off), or at least `floor`: a loop run more often than that does nothing but spin."""

    def check(value: float) -> float:
        if 0 < value < floor:
            raise ValueError(f"must be 0 (off) or >= {floor:g}")
        return value

    return AfterValidator(check)


KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
Port = Annotated[int, Field(ge=0, le=65535)]  # 0 picks a free one
OptionalPort = Annotated[int, Field(ge=-1, le=65535)]  # -1 disables
Positive = Annotated[int, Field(gt=0)]
NonNegative = Annotated[int, Field(ge=0)]
# Never inf or nan: "inf" from the environment parses as a float, and a TTL of inf seconds
# fails in milliseconds (`int(ttl * 1000)`), a timeout of nan never compares.
Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]
PositiveSeconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Address = Annotated[str, Field(min_length=1)]


def _home(value: Any) -> Any:
    """`~` and `~user` at a path's start are the home directory, as a shell would read them:
    a path from a config file or a compose file's variable has not been through one (it made
    a directory named `~` in the working directory)."""
    if isinstance(value, str | Path) and str(value).startswith("~"):
        return Path(os.path.expanduser(value))
    return value


def _a_path(value: Any) -> Any:
    """An empty path is refused, not read as the current directory: a state directory of "."
    would have the server claim (and tidy up) whatever directory it was started in."""
    if isinstance(value, str) and not value.strip():
        raise ValueError("must name a directory, not be empty")
    return _home(value)


DirPath = Annotated[Path, BeforeValidator(_a_path)]
FilePath = Annotated[Path | None, BeforeValidator(_home)]


def check_state_url(value: str) -> str:
    """A Redis URL as the tier reads it, `redis[s]://[:PASSWORD@]HOST[:PORT][/DB]`: checked
    here, so that a bad one is `serve`'s one-line refusal (redis-py raised a traceback for a
    port out of range, a query it does not know; a database that is not a number was read
    as 0). Messages quote it without its password (`config_sources`)."""
    if not value.startswith(("redis://", "rediss://")):
        return value
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:  # a port that is not a number or is over 65535, a broken [IPv6]
        raise ValueError(
            "must be redis://HOST:PORT/DB with a port in 1-65535 (and an IPv6 host in [])"
        ) from None
    if not parts.hostname:
        raise ValueError("must name a host: redis://HOST:PORT/DB")
    if port == 0:
        raise ValueError("its port must be in 1-65535")
    if parts.fragment:
        raise ValueError("takes no #fragment: redis://[:PASSWORD@]HOST[:PORT][/DB]")
    if parts.query:
        _redis_query(parts.scheme, parts.query)
    db = parts.path[1:]
    if parts.path not in ("", "/") and not (db.isascii() and db.isdigit()):
        raise ValueError("its database (the path) must be a number: redis://HOST:PORT/DB")
    return value


def _redis_query(scheme: str, query: str) -> None:
    """A Redis URL's `?name=value` options: those redis-py reads itself (`socket_timeout`,
    `db`, …), each a value it can read, and those it passes on to its connection, named as
    the connection's parameters (`client_name`, `password`, and `ssl_*` for rediss); any
    other reached the connection as an unknown argument, a traceback at `serve`. A blank
    value is skipped, as redis-py skips it."""
    import inspect

    from redis import connection  # only for a URL with options

    classes: list[Any] = [connection.AbstractConnection, connection.Connection]
    if scheme == "rediss":
        classes.append(connection.SSLConnection)
    taken = {name for cls in classes for name in inspect.signature(cls).parameters}
    taken -= {"self", "kwargs"}
    for name, values in parse_qs(query).items():
        parser: Any = connection.URL_QUERY_ARGUMENT_PARSERS.get(name)
        if parser is None and name not in taken:
            raise ValueError(f"has an option redis does not take: {name[:40]!r}")
        try:
            if parser is not None:
                parser(values[0])
        except (TypeError, ValueError):
            raise ValueError(f"its option {name} has a value redis cannot read") from None


# A state tier's URL: Redis (checked as redis-py would read it), SQLite, or "" (local).
StateUrl = Annotated[
    str, Field(pattern=r"^((redis|rediss)://.+|sqlite:.+|)$"), AfterValidator(check_state_url)
]
