"""Ports for tests that start `seqserve serve` on a port of their own choosing."""

from __future__ import annotations

import fcntl
import os
import socket

from service.cli.workers import PortLock


def free_port() -> int:
    """A loopback port nothing is bound to and whose seqserve port lock no process holds.

    A bind probe alone is not enough: a seqserve can hold a port's lock while the port itself
    is unbound for a moment (a supervisor before its workers bind, one stopping), and a
    `serve` given that number is then refused as a second seqserve on the port."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if not _locked(PortLock(port).path):
            return port
    raise AssertionError("no free, unlocked port in 100 probes")


def _locked(path: os.PathLike[str]) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing lets go of the probe's own lock
    return False
