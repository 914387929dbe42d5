"""A gRPC target as the client, the CLI and the load test take it: whether it is one a channel
can be opened to as given (`check_target`), its host, and whether every address it names is on
this machine (a bearer token travels in plain text only there: `credentials.py`)."""

from __future__ import annotations

import ipaddress


def check_target(target: str) -> None:
    """Raise ValueError unless `target` is an address a gRPC channel can be opened to as
    given: `host:port` or `[ipv6]:port`, the port in 1-65535, or a gRPC target URI of such
    addresses (`dns:///host:port`, `ipv4:a:p,b:q`, `ipv6:[a]:p`) or `unix:PATH`.

    gRPC itself takes a port beyond 65535 modulo 65536 (127.0.0.1:99999 connects to 34463),
    prints its C core's errors for "" and looks up "http://h:p" as a host name. The one check
    of the client (`SeqServeClient`), `seqserve loadtest` (`LoadConfig.validate`) and
    `seqserve generate`."""
    if target.startswith(("unix:", "unix-abstract:")):
        ok = bool(target.partition(":")[2].strip())
    elif target.startswith("dns:"):
        rest = target[4:]
        if rest.startswith("//"):  # dns://[authority]/host:port
            rest = rest[2:].partition("/")[2]
        ok = _host_port(rest)
    elif target.startswith(("ipv4:", "ipv6:")):
        ok = all(_host_port(address) for address in target[5:].split(","))
    else:
        ok = _host_port(target)
    if not ok:
        raise ValueError(f"target must be host:port with a port in 1-65535, got {target!r}")


def _host_port(address: str) -> bool:
    if address.startswith("["):  # [ipv6]:port
        host, bracket, rest = address[1:].partition("]")
        colon, port = rest[:1], rest[1:]
        if not bracket or colon != ":":
            return False
    else:
        host, colon, port = address.rpartition(":")
        if not colon or ":" in host:  # no port, or an IPv6 address without brackets
            return False
    if not host or any(c.isspace() or c in "/[]" for c in host):
        return False
    return port.isascii() and port.isdigit() and 1 <= int(port) <= 65535


def target_host(target: str) -> str:
    """The host of a gRPC target: `h:p`, `[v6]:p`, `dns:///h:p`, `ipv4:a:p`, `ipv6:[a]:p`
    (a list's first address); "" for a unix socket."""
    if target.startswith(("unix:", "unix-abstract:")):
        return ""
    rest = target
    if rest.startswith("dns:"):
        rest = rest[4:]
        if rest.startswith("//"):
            rest = rest[2:].split("/", 1)[1] if "/" in rest[2:] else ""
    elif rest.startswith(("ipv4:", "ipv6:")):
        rest = rest[5:].split(",", 1)[0]
    if rest.startswith("["):
        return rest[1:].split("]", 1)[0]
    if rest.count(":") == 1:
        return rest.split(":", 1)[0]
    return rest  # a bare host, or a bare IPv6 address


def is_loopback_target(target: str) -> bool:
    """Whether every address `target` names is on this machine (loopback or a unix socket)."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    if target.startswith(("ipv4:", "ipv6:")):
        return all(_loopback_host(target_host(target[:5] + one)) for one in target[5:].split(","))
    return _loopback_host(target_host(target))


def _loopback_host(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
