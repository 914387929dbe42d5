"""Whether the gRPC address can be bound, asked before gRPC binds it (`SeqServeServer.start`),
so that a port in use or a host not of this machine is one line with the system's reason."""

from __future__ import annotations

import errno
import socket

from service.errors import PortInUse


def check_bindable(host: str, port: int) -> None:
    """Refuse (PortInUse, with the reason and the flag to change) a gRPC address that cannot
    be bound: gRPC would log its own error line first, and say only that it failed. Each
    address the host resolves to is tried, as gRPC binds each: refused when one is in use,
    or when none can be bound."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return  # a name gRPC resolves its own way: it reports its own failure
    failed: list[OSError] = []
    for family, kind, proto, _, where in infos:  # gRPC binds each; one that works will do
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does
                probe.bind(where)
        except OSError as refused:  # (no IPv6 on this host: its socket fails too)
            failed.append(refused)
    in_use = [e for e in failed if e.errno == errno.EADDRINUSE]
    if not in_use and len(failed) < len(infos):
        return
    exc = (in_use or failed)[0]
    fix = (
        "set --host to an address of this machine"
        if exc.errno == errno.EADDRNOTAVAIL
        else "is another seqserve or program on it? set --port or SEQSERVE_SERVER__PORT"
    )
    raise PortInUse(f"cannot listen on {host}:{port}: {exc.strerror or exc} ({fix})")
