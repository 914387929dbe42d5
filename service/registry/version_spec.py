"""How a version spec names a version: the words and the one rule for numbers, with no torch
to import, so the client-side tools (the load generator) read a spec as the store does."""

from __future__ import annotations

PRODUCTION = "production"  # the alias "" means when it is set
LATEST = "latest"  # the highest usable version


def version_number(spec: str) -> int | None:
    """The version a stripped spec names by number (ASCII digits), or None: "", "latest" or an
    alias."""
    return int(spec) if spec.isascii() and spec.isdigit() else None
