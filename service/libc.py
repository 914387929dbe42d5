"""The C library, for the few Linux calls Python's standard library lacks (`syncfs`, `prctl`,
inotify). Loaded once; a call it lacks raises AttributeError (not Linux)."""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)
