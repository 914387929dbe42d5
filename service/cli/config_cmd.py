"""`seqserve config show`: the effective configuration and where each value came from.

Takes the same `--config FILE` and setting flags as `serve`, and the same environment, so it
shows exactly what `serve` would run with, except that a URL's password (`--state-url
redis://:secret@host`) is shown as `***`; or, where `serve` would refuse to start (a bad value,
no model store, a file where the state directory should be, no such device), only `serve`'s
one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from service.cli.settings_flags import (
    InvalidSetting,
    add_config_argument,
    add_settings_arguments,
    load_from_args,
)
from service.config_sources import leaves, redact_url
from service.startup_checks import check_runnable


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="show the effective configuration")
    inner = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = inner.add_parser(
        "show",
        help="print every setting, its value and its source (default, config file, env, flag)",
        description="Print the configuration `serve` would run with, given the same flags, "
        "environment and --config file, and where each value came from.",
    )
    add_config_argument(show)
    show.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_settings_arguments(show)
    show.set_defaults(func=run_show)


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, str):
        return redact_url(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def run_show(args: argparse.Namespace) -> int:
    try:
        loaded = load_from_args(args)
        # What `serve` would refuse (no model store, ...) before anything is printed: its one
        # line and status 2, as `serve` gives, not a table of settings it would not run with.
        check_runnable(loaded.settings, loaded.sources)
    except InvalidSetting as exc:
        print(f"seqserve: {exc}", file=sys.stderr)
        return 2
    rows = []
    for leaf in leaves():
        value: Any = loaded.settings
        for part in leaf.path:
            value = getattr(value, part)
        rows.append((leaf.name, _plain(value), loaded.sources[leaf.name]))
    if args.json:
        out = {name: {"value": value, "source": source} for name, value, source in rows}
        print(json.dumps(out, indent=2))
    else:
        width = max(len(name) for name, _, _ in rows)
        shown = [json.dumps(v) for _, v, _ in rows]  # TOML-like: "text", true, 5
        vwidth = min(60, max(len(s) for s in shown))
        for (name, _, source), text in zip(rows, shown, strict=True):
            print(f"{name:<{width}}  {text:<{vwidth}}  {source}")
    return 0
