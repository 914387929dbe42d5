"""Memory reserved up front that costs only as it is written: anonymous mappings for a state
pool's storage (`state_pool`), and when they are harmless here."""

from __future__ import annotations

import math
import mmap
import platform
import sys

import torch
from torch import Tensor

try:
    import resource
except ImportError:  # not a Unix: no mapping either (mmap.MAP_PRIVATE is Unix's)
    resource = None  # type: ignore[assignment]

# Map without reserving swap for it: the pool's storage is sized for the whole budget and most
# of it may never be written. Python 3.11's mmap has no name for the flag; 0x4000 is its value
# on Linux's common layout (x86, Arm), not everywhere, so elsewhere the flag is left out.
_MAP_NORESERVE = getattr(
    mmap,
    "MAP_NORESERVE",
    0x4000
    if sys.platform.startswith("linux")
    and platform.machine() in ("x86_64", "i686", "aarch64", "armv7l", "armv8l")
    else 0,
)


def mapping_allowed() -> bool:
    """Whether mapping storage for a whole budget up front is harmless here: not where the
    address space is limited (`ulimit -v`, which it would use up: every pool maps the whole
    budget) or where the kernel charges every mapping in full (`vm.overcommit_memory` 2,
    which ignores `MAP_NORESERVE`). There the pool grows by copying instead."""
    if resource is None:
        return False
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    except (AttributeError, OSError, ValueError):  # no such limit on this system
        soft = resource.RLIM_INFINITY
    if soft != resource.RLIM_INFINITY:
        return False
    try:
        with open("/proc/sys/vm/overcommit_memory") as f:
            return f.read().strip() != "2"
    except OSError:
        return True


def reserved_zeros(shape: tuple[int, ...]) -> Tensor | None:
    """A float32 CPU tensor of `shape` over anonymous memory, zero, that costs memory only as
    its pages are written; None where such a mapping is refused or unavailable."""
    numel = math.prod(shape)
    if numel <= 0 or not mapping_allowed():
        return None
    try:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
        buffer = mmap.mmap(-1, 4 * numel, flags=flags)
    except (AttributeError, OSError, OverflowError, ValueError):
        return None
    # The tensor keeps the mapping alive; it is unmapped when the last view of it goes.
    return torch.frombuffer(buffer, dtype=torch.float32).view(shape)
