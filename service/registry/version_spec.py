"""How a version spec names a version: the words and the one rule for numbers, with no torch
to import, so the client-side tools (the load generator) read a spec as the store does."""

from __future__ import annotations

PRODUCTION = "production"  # the alias "" means when it is set
LATEST = "latest"  # the highest usable version

# The store's version folders are 1 to MAX_VERSION (versions are int64 on the wire).
MAX_VERSION = 999_999_999
# A number of more digits names no version. It is not converted (Python's int() refuses over
# 4,300 digits) nor echoed whole.
MAX_VERSION_DIGITS = 18


class VersionNumberTooLong(ValueError):
    """A spec of more digits than any version's number has (leading zeros aside)."""


def version_digits(spec: str) -> str | None:
    """The number a stripped spec names, as its digits without leading zeros ("0" for zeros
    alone), or None: "", "latest" or an alias. One spelling per number: "01" and "1" are one."""
    if not (spec.isascii() and spec.isdigit()):
        return None
    return spec.lstrip("0") or "0"


def version_number(spec: str) -> int | None:
    """The version a stripped spec names by number (ASCII digits), or None: "", "latest" or an
    alias. VersionNumberTooLong (a ValueError) for a number of more than MAX_VERSION_DIGITS
    digits: no version has it."""
    digits = version_digits(spec)
    if digits is None:
        return None
    if len(digits) > MAX_VERSION_DIGITS:
        raise VersionNumberTooLong(
            f"a version number has at most {MAX_VERSION_DIGITS} digits, got {len(digits)}"
        )
    return int(digits)
