"""`seqserve` command line: one subcommand per module in `service/cli/`."""

from __future__ import annotations

import argparse
import importlib
import sys

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
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seqserve", description="Serve stateful LSTM and GRU sequence models over gRPC."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
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
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
