"""`seqserve` command line: one subcommand per module in `service/cli/`."""

from __future__ import annotations

import argparse
import importlib
import os
import select
import sys
from typing import Any

# Each module exposes `register(subparsers)`, which adds its subcommand and sets `func`
# (called with the parsed args, returning an exit code).
COMMAND_MODULES = (
    "service.cli.serve_cmd",
    "service.cli.predict_cmd",
    "service.cli.generate_cmd",
    "service.cli.models_cmd",
    "service.cli.train_cmd",
    "service.cli.loadtest_cmd",
    "service.cli.auth_cmd",
    "service.cli.config_cmd",
)
# Command modules import only argparse-level things at the top (torch, grpc and the engine are
# imported inside the command's function), so `--help` and `--version` stay fast.


class _ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Appends `(default: X)` to a flag's help, except where there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Every subcommand's help shows its flags' defaults."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _ShowDefaults)
        super().__init__(*args, **kwargs)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("seqserve")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="seqserve", description="Serve stateful LSTM and GRU sequence models over gRPC."
    )
    parser.add_argument("--version", action="version", version=f"seqserve {version()}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # not written yet; the others still work
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["predict"]:  # frames may start with a negative value: `--frames -0.5,…`
        from service.cli.predict_cmd import join_negative_frames

        argv = join_negative_frames(argv)
    args = build_parser().parse_args(argv)
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from service.config_sources import InvalidSetting, describe

    try:
        return int(args.func(args) or 0)
    except InvalidSetting as exc:
        print(f"seqserve: {exc}", file=sys.stderr)
    except SettingsError as exc:  # a command that built Settings() from a bad environment
        print(f"seqserve: invalid environment: {exc}", file=sys.stderr)
    except ValidationError as exc:
        if not exc.title.endswith("Settings"):
            raise
        print(f"seqserve: {describe(exc)}", file=sys.stderr)
    return 2


def run() -> None:
    """Console-script entry point."""
    try:
        code = _main_process()
        sys.stdout.flush()  # a reader that went away shows here, not at interpreter exit
    except BrokenPipeError:
        if not _stdout_gone():
            raise  # another pipe broke: a real error
        # `seqserve config show | head -1`: the reader had what it wanted and closed the pipe.
        # Not an error (status 0, as `generate` always did); stdout goes to /dev/null so the
        # interpreter's own flush at exit cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = 0
    except KeyboardInterrupt:  # Ctrl-C: the command's `async with` blocks have closed up
        print("seqserve: interrupted", file=sys.stderr)
        code = 130  # 128 + SIGINT, as a shell reports it
    sys.exit(code)


def _main_process() -> int:
    """`main()`; for `serve` under its start-up signal handlers from the process's first
    moment, before the parser imports the commands: model loading can take seconds, and a
    SIGTERM meanwhile is a stop (one line, status 0), not a death."""
    if sys.argv[1:2] != ["serve"]:
        return main()
    from service.cli.serve_cmd import STARTUP_SIGNALS  # imports little

    return STARTUP_SIGNALS.guard(main)


def _stdout_gone() -> bool:
    """Whether standard output is a pipe whose reader has gone away (poll reports an error on
    such a pipe's writing end)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll, or no real descriptor
        return False


if __name__ == "__main__":
    run()
