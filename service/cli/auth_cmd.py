"""`seqserve auth add-token`: a new random token for a principal, its hash appended to the
tokens file the server reads (`--auth-tokens`); the token is printed once and stored nowhere."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("auth", help="manage the tokens file")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser("add-token", help="create a token for a principal and print it")
    add.add_argument("--file", type=Path, required=True, help="the tokens file (created 0600)")
    add.add_argument("--principal", required=True, help="who the token is for")
    add.add_argument("--role", choices=["client", "admin", "proxy"], default="client")
    add.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from service.errors import InvalidArgument
    from service.security.tokens import add_token

    try:
        token = add_token(args.file, args.principal, args.role)
    except (InvalidArgument, OSError) as exc:
        print(f"seqserve auth: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    print(token)
    print(
        f"token for {args.principal} ({args.role}) added to {args.file}; it is shown only now",
        file=sys.stderr,
    )
    return 0
