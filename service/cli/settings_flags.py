"""Command-line flags generated from the `Settings` model: one per setting, no hand-kept list.

Each setting `section.field_name` is `--section.field-name` (top-level ones `--field-name`),
plus the short names its field declares with `flag(...)` (`--port`, `--store`, `--ttl`, …).
Help is the field's docstring with its default and environment variable. Values are passed on
as given and validated by the model, so a bad flag gets the same one-line error as a bad
environment variable or config file entry.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from service.config_sources import InvalidSetting, Leaf, Loaded, leaves, load

_DEST = "setting:"  # prefix of the Namespace attributes that hold settings


def _metavar(leaf: Leaf) -> str:
    if leaf.choices:
        return "{" + ",".join(leaf.choices) + "}"
    ann = str(leaf.info.annotation)
    if leaf.is_list:
        return "A,B,…"
    for word, meta in (("Path", "PATH"), ("int", "N"), ("float", "X")):
        if word in ann:
            return "SECONDS" if meta == "X" and leaf.path[-1].endswith("seconds") else meta
    return "TEXT"


def _help(leaf: Leaf) -> str:
    doc = " ".join((leaf.info.description or "").split())
    default = leaf.default
    shown = (
        "unset" if default is None or default == [] else repr(default) if default == "" else default
    )
    return f"{doc} [default: {shown}; env {leaf.env}]".replace("%", "%%")


def store_path(text: str) -> Path:
    """`--store`'s argparse type: a path, not an empty string (which would be the current
    directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a directory, not be empty")
    return Path(text)


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML file of settings ([server], [engine], [sessions], [security] tables); "
        "flags > SEQSERVE_* env > this file > defaults",
    )


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, in groups by section."""
    groups: dict[str, Any] = {}
    for leaf in leaves():
        section = leaf.path[0] if len(leaf.path) > 1 else ""
        if section not in groups:
            title = f"[{section}] settings" if section else "settings"
            groups[section] = parser.add_argument_group(title)
        names = [leaf.flag, *leaf.aliases]
        dest = _DEST + leaf.name
        if leaf.is_bool:
            groups[section].add_argument(
                *names, dest=dest, action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS, help=_help(leaf),
            )  # fmt: skip
        else:
            groups[section].add_argument(
                *names, dest=dest, metavar=_metavar(leaf), default=argparse.SUPPRESS,
                help=_help(leaf),
            )  # fmt: skip


def given_flags(args: argparse.Namespace) -> dict[tuple[str, ...], Any]:
    """The settings given as flags: setting path -> value (still a string, except booleans)."""
    by_name = {leaf.name: leaf for leaf in leaves()}
    out: dict[tuple[str, ...], Any] = {}
    for key, value in vars(args).items():
        if not key.startswith(_DEST):
            continue
        leaf = by_name[key.removeprefix(_DEST)]
        if leaf.optional and value == "":
            value = None  # `--tls-cert ''` unsets it
        elif leaf.is_list and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        out[leaf.path] = value
    return out


def flags_argv(args: argparse.Namespace, skip: tuple[str, ...] = ()) -> list[str]:
    """The given setting flags again, as an argv (for worker processes), `skip`ped names out."""
    argv: list[str] = []
    for leaf in leaves():
        value = getattr(args, _DEST + leaf.name, None)
        if value is None or leaf.name in skip:
            continue
        if leaf.is_bool:
            argv.append(leaf.flag if value else "--no-" + leaf.flag[2:])
        else:
            argv.append(f"{leaf.flag}={value}")
    config = getattr(args, "config", None)
    return ([f"--config={config}"] if config is not None else []) + argv


def load_from_args(args: argparse.Namespace) -> Loaded:
    """Settings from the parsed flags, the environment and `--config`; raises InvalidSetting."""
    return load(given_flags(args), getattr(args, "config", None))


__all__ = [
    "InvalidSetting",
    "add_config_argument",
    "add_settings_arguments",
    "flags_argv",
    "given_flags",
    "load_from_args",
]
