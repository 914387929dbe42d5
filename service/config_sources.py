"""Builds the one `Settings` object from its sources and says where each value came from.

Precedence, highest first: command-line flags > `SEQSERVE_*` environment variables > the TOML
config file (`--config FILE`) > the defaults in `service/settings.py`. A bad value from any of
them is an `InvalidSetting` whose message is one line naming the setting, its flags and its
environment variable; the command line prints it and exits 2.
"""

from __future__ import annotations

import difflib
import json
import os
import tomllib
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import SettingsError

from service.settings import (
    Flag,
    Settings,
    data_dir_variable,
    environment_values,
)

ENV_PREFIX = "SEQSERVE_"


class InvalidSetting(ValueError):
    """A setting that cannot be used; `str()` is the one-line message."""


@dataclass(frozen=True)
class Leaf:
    """One setting: a field of `Settings` or of one of its sections."""

    path: tuple[str, ...]  # ("sessions", "pool_bytes")
    info: FieldInfo

    @property
    def name(self) -> str:
        return ".".join(self.path)

    @property
    def flag(self) -> str:
        """The generated flag: `--sessions.pool-bytes`, `--log-level`."""
        return "--" + ".".join(p.replace("_", "-") for p in self.path)

    @property
    def aliases(self) -> tuple[str, ...]:
        return tuple(n for m in self.info.metadata if isinstance(m, Flag) for n in m.names)

    @property
    def env(self) -> str:
        return ENV_PREFIX + "__".join(self.path).upper()

    @property
    def default(self) -> Any:
        return self.info.get_default(call_default_factory=True)

    @property
    def is_bool(self) -> bool:
        return self.info.annotation is bool

    @property
    def is_list(self) -> bool:
        return typing.get_origin(self.info.annotation) is list

    @property
    def optional(self) -> bool:
        return type(None) in typing.get_args(self.info.annotation)

    @property
    def choices(self) -> tuple[str, ...]:
        if typing.get_origin(self.info.annotation) is typing.Literal:
            return tuple(str(a) for a in typing.get_args(self.info.annotation))
        return ()


def _is_section(info: FieldInfo) -> bool:
    ann = info.annotation
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def leaves(model: type[BaseModel] = Settings, prefix: tuple[str, ...] = ()) -> Iterator[Leaf]:
    """Every setting, walking the model (sections recursively), in declaration order."""
    for name, info in model.model_fields.items():
        if _is_section(info):
            assert isinstance(info.annotation, type)
            yield from leaves(info.annotation, (*prefix, name))
        else:
            yield Leaf((*prefix, name), info)


def leaf_by_path() -> dict[tuple[str, ...], Leaf]:
    return {leaf.path: leaf for leaf in leaves()}


@dataclass
class Loaded:
    settings: Settings
    # setting name -> "default" | "config file F" | "env V" | "flag"; a default derived from an
    # environment variable names it: "env SEQSERVE_DATA_DIR" for the spill directory in it.
    sources: dict[str, str]


def read_config_file(path: Path) -> dict[str, Any]:
    """The TOML file's values, nested like the model (`[server]`, `[engine]`, …)."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise InvalidSetting(f"config file {path}: no such file") from None
    except OSError as exc:
        raise InvalidSetting(f"config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidSetting(f"config file {path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:  # TOML is UTF-8; a Latin-1 comment is enough to fail
        raise InvalidSetting(
            f"config file {path}: not UTF-8 text (byte {exc.start}); save it as UTF-8"
        ) from None
    known = leaf_by_path()
    sections = {p[0] for p in known if len(p) > 1}
    for key, value in data.items():
        if key in sections:
            if not isinstance(value, dict):
                raise InvalidSetting(f"config file {path}: `{key}` must be a [{key}] table")
            for sub in value:
                if (key, sub) not in known:
                    raise InvalidSetting(
                        f"config file {path}: unknown setting {key}.{sub}"
                        + _nearest((key, sub), known)
                    )
                value[sub] = _no_bool_number(known[key, sub], value[sub])
        elif (key,) not in known:
            raise InvalidSetting(f"config file {path}: unknown setting {key}")
        else:
            data[key] = _no_bool_number(known[key,], value)
    return data


def _no_bool_number(leaf: Leaf, value: Any) -> Any:
    """A TOML `true`/`false` given to a number setting, as the words the environment would
    give: refused as there ("must be an integer, got false"), not read as 1 or 0 (pydantic
    takes a bool for an int: `metrics_port = false` bound a random port, not none)."""
    if isinstance(value, bool):
        kinds = typing.get_args(leaf.info.annotation) or (leaf.info.annotation,)
        if bool not in kinds and (int in kinds or float in kinds):
            return "true" if value else "false"
    return value


def _env_layer() -> dict[str, Any]:
    try:
        return environment_values()
    except SettingsError as exc:  # e.g. SEQSERVE_SERVER='{not json'
        raise InvalidSetting(f"invalid environment: {_not_json() or exc}") from None


def _not_json() -> str | None:
    """The message for the variable pydantic-settings could not parse, when it is one whose
    value must be JSON (a list or table setting, a whole section): its own error names only
    the section."""
    environ = {name.upper(): value for name, value in os.environ.items()}
    for leaf in leaves():
        value = environ.get(leaf.env)
        if value is not None and _is_json_valued(leaf) and not _parses(value):
            kind, example = "table", "{}"
            if leaf.is_list:  # the flag's comma list, as the JSON the variable takes
                kind, example = "list", json.dumps([v.strip() for v in value.split(",")])
            return (
                f"{leaf.env}={value!r}: {leaf.name} takes a JSON {kind} in the environment, "
                f"e.g. {leaf.env}='{example}'"
            )
    for name, info in Settings.model_fields.items():
        env = ENV_PREFIX + name.upper()
        value = environ.get(env)
        if value is not None and _is_section(info) and not _parses(value):
            return f"{env}={value!r}: a whole section is a JSON object (or set {env}__<NAME>)"
    return None


# SEQSERVE_* variables that are not settings but are read elsewhere: the data directory the
# defaults derive from, and the client's token.
_OTHER_VARIABLES = frozenset({"SEQSERVE_DATA_DIR", "SEQSERVE_TOKEN"})


def unknown_environment() -> list[str]:
    """A warning for each `SEQSERVE_*` variable that names no setting (a misspelled section,
    `SEQSERVE_SESSION__POOL_BYTES`, is otherwise ignored without a word), with the nearest
    setting's variable when one is close."""
    known = {leaf.env for leaf in leaves()} | _OTHER_VARIABLES
    known |= {ENV_PREFIX + name.upper() for name in Settings.model_fields}  # whole sections
    found = []
    for name in sorted(os.environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known:
            continue
        near = difflib.get_close_matches(upper, sorted(known), n=1, cutoff=0.8)
        hint = f"; did you mean {near[0]}?" if near else ""
        found.append(f"{name} is not a setting and is ignored{hint}")
    return found


def _is_json_valued(leaf: Leaf) -> bool:
    origin = typing.get_origin(leaf.info.annotation)
    return origin in (list, dict, set, tuple)


def _parses(value: str) -> bool:
    try:
        json.loads(value)
    except ValueError:
        return False
    return True


def _flat(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for key, value in tree.items():
        path = (*prefix, key)
        if isinstance(value, dict) and not prefix:
            out.update(_flat(value, path))
        else:
            out[path] = value
    return out


def _nest(flat: dict[tuple[str, ...], Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def load(
    flags: dict[tuple[str, ...], Any] | None = None, config_file: Path | None = None
) -> Loaded:
    """Settings from flags (setting path -> value as given), env, the config file and defaults."""
    layers: list[tuple[str, dict[tuple[str, ...], Any]]] = []
    if config_file is not None:
        layers.append((f"config file {config_file}", _flat(read_config_file(config_file))))
    env = _flat(_env_layer())
    layers.append(("env", env))
    layers.append(("flag", dict(flags or {})))
    merged: dict[tuple[str, ...], Any] = {}
    sources: dict[tuple[str, ...], str] = {}
    for source, values in layers:
        for path, value in values.items():
            merged[path] = value
            sources[path] = source
    for path, source in sources.items():
        if source == "env":
            sources[path] = "env " + _variable_of(path)
    known = leaf_by_path()
    try:
        settings = Settings.model_validate(_nest(merged))
    except ValidationError as exc:
        raise InvalidSetting(describe(exc, sources)) from None
    names = {leaf.path: leaf.name for leaf in known.values()}
    shown = {names[p]: sources.get(p, "default") for p in known}
    if shown["sessions.spill_dir"] == "default" and (variable := data_dir_variable()):
        shown["sessions.spill_dir"] = f"env {variable}"  # spill/ in the data directory it names
    return Loaded(settings, shown)


def _variable_of(path: tuple[str, ...]) -> str:
    """The variable that set the setting at `path`: its own, or its section's JSON
    (`SEQSERVE_SESSIONS='{"ttl_seconds": 30}'`), named as set."""
    own = ENV_PREFIX + "__".join(path).upper()
    upper = {name.upper() for name in os.environ}
    if own in upper or len(path) < 2:
        return own
    section = ENV_PREFIX + path[0].upper()
    return f"{section} (its {'.'.join(path[1:])})" if section in upper else own


def _what(err: Any) -> str:
    kind, ctx = err["type"], err.get("ctx") or {}
    for key, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
        if key in ctx and kind.startswith(("greater", "less")):
            return f"must be {op} {ctx[key]}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return "must be an integer"
    if kind in ("float_parsing", "float_type"):
        return "must be a number"
    if kind == "finite_number":
        return "must be a finite number"
    if kind in ("bool_parsing", "bool_type"):
        return "must be true or false"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}"
    if kind == "string_pattern_mismatch":
        return f"must match {ctx.get('pattern')}"
    if kind == "string_too_short":
        return "must not be empty"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return msg[:1].lower() + msg[1:]


def redact_url(text: str) -> str:
    """`text` with a URL's password (`redis://:secret@host`, `?password=secret`) as `***`:
    a configuration printed to a terminal or a log must not carry it."""
    if "://" not in text:
        return text
    try:
        parts = urlsplit(text)
    except ValueError:  # not a URL after all (an unclosed "[")
        return text
    netloc, query = parts.netloc, parts.query
    userinfo, at, host = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:***@{host}"
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() == "password" for k, _ in pairs):
            query = urlencode(
                [(k, "***" if k.lower() == "password" else v) for k, v in pairs], safe="*"
            )
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _shown(value: Any) -> str:
    text = repr(value) if value == "" or isinstance(value, dict) else str(value)
    text = redact_url(text)
    return text if len(text) <= 80 else text[:77] + "..."


def describe(exc: ValidationError, sources: dict[tuple[str, ...], str] | None = None) -> str:
    """One line for a validation error: the first problem, naming the setting."""
    errors = exc.errors()
    err = errors[0]
    path = tuple(str(p) for p in err["loc"])
    known = leaf_by_path()
    # An item of a list setting (`engine.preload.0`) is told as the setting's.
    at = next((n for n in range(len(path), 0, -1) if path[:n] in known), len(path))
    leaf, item = known.get(path[:at]), path[at:]
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    source = (sources or {}).get(path) or (sources or {}).get(path[:at])
    origin = f" [from {source}]" if source else ""
    if leaf is None:
        name = ".".join(path) or "settings"
        if err["type"] == "extra_forbidden":
            return f"unknown setting {name}{origin}{_nearest(path, known)}{more}"
        return f"invalid settings {name}: {_what(err)}{origin}{more}"
    names = ", ".join((*leaf.aliases, leaf.flag, leaf.env))
    got = f", got {_shown(err['input'])}" if "input" in err else ""
    which = f" (item {int(item[0]) + 1})" if item and item[0].isdigit() else ""
    return f"invalid setting {leaf.name}{which} ({names}): {_what(err)}{got}{origin}{more}"


def _nearest(path: tuple[str, ...], known: dict[tuple[str, ...], Leaf]) -> str:
    """ "; did you mean server.port (SEQSERVE_SERVER__PORT)?" for a misspelled setting."""
    siblings = {p[-1]: leaf for p, leaf in known.items() if p[:-1] == path[:-1]}
    near = difflib.get_close_matches(path[-1], sorted(siblings), n=1, cutoff=0.6) if path else []
    if not near:
        return ""
    leaf = siblings[near[0]]
    return f"; did you mean {leaf.name} ({leaf.flag}, {leaf.env})?"
