"""`<model>/aliases.json`: alias name → version, e.g. `{"production": 3, "staging": 4}`.

Writers replace the file atomically (temp file + rename), so a reader polling the store sees the
old map or the new one, never half of it. Read-modify-write cycles take an advisory lock, so a
CLI and a server moving aliases at the same time do not lose each other's change.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

from service.errors import FailedPrecondition, InvalidArgument, quote
from service.registry.atomic import replace_durably
from service.registry.version_spec import MAX_VERSION

ALIASES_FILE = "aliases.json"
LOCK_FILE = ".aliases.lock"

# "latest" is implicit (the highest version) and digits are version numbers, so neither can
# be an alias: a spec string must mean one thing.
_ALIAS_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
RESERVED_ALIASES = frozenset({"latest"})


class AliasFileError(ValueError):
    """aliases.json exists but cannot be used; the message names the file and the problem."""


def validate_alias_name(alias: str) -> None:
    if alias in RESERVED_ALIASES:
        raise InvalidArgument(
            f"alias {quote(alias)} is reserved: it always means the highest version"
        )
    if not _ALIAS_RE.fullmatch(alias):
        raise InvalidArgument(
            f"invalid alias {quote(alias)}: use a lowercase letter then letters, digits, '_', '.' "
            "or '-' (at most 64 characters); digits alone name versions"
        )


def read_aliases(model_dir: Path) -> dict[str, int]:
    """The aliases on disk ({} when there is no file). Raises AliasFileError if malformed."""
    path = model_dir / ALIASES_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:  # undecodable, not JSON, a number of 4,300+ digits
        raise AliasFileError(f"{path}: unreadable: {exc}") from exc
    if not isinstance(raw, dict):
        raise AliasFileError(f"{path}: expected an object of alias → version")
    aliases: dict[str, int] = {}
    for alias, version in raw.items():
        try:
            validate_alias_name(alias)
        except InvalidArgument as exc:
            raise AliasFileError(f"{path}: {exc.message}") from exc
        # bool is an int subclass; `true` is not a version. Nor is a number past the folders'.
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise AliasFileError(
                f"{path}: alias {alias!r}: version must be a positive integer, got {version!r}"
            )
        if version > MAX_VERSION:
            raise AliasFileError(  # (not echoed: no version has as many digits)
                f"{path}: alias {alias!r}: version must be at most {MAX_VERSION}"
            )
        aliases[alias] = version
    return aliases


def write_aliases(model_dir: Path, aliases: Mapping[str, int]) -> None:
    """Replace aliases.json atomically; the caller holds `aliases_locked`. Raises
    FailedPrecondition when the store cannot be written."""
    body = json.dumps(dict(sorted(aliases.items())), indent=2) + "\n"
    try:
        replace_durably(model_dir / ALIASES_FILE, body.encode("utf-8"))
    except OSError as exc:
        raise _unwritable(model_dir, exc) from exc


@contextlib.contextmanager
def aliases_locked(model_dir: Path) -> Iterator[None]:
    """Hold the model's alias lock (advisory, released when the block ends). Raises
    FailedPrecondition when the lock file cannot be opened: the store is read-only (a
    ReadOnlyMany volume), full or not ours to write, so no alias can change."""
    try:
        lock = (model_dir / LOCK_FILE).open("a")
    except OSError as exc:
        raise _unwritable(model_dir, exc) from exc
    with lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _unwritable(model_dir: Path, exc: OSError) -> FailedPrecondition:
    # The model's name, not the folder: clients never see the server's paths.
    return FailedPrecondition(
        f"cannot change the aliases of {model_dir.name!r}: the model store cannot be written "
        f"({exc.strerror or exc})"
    )
