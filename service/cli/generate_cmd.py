"""`seqserve generate`: a client that streams a generation to the terminal."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import sys
import time

import grpc

from service.client import credentials
from service.client.client import SeqServeClient
from service.client.errors import DeadlineExceededError, SeqServeError
from service.client.session import ClientSession
from service.client.target_address import check_target


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="stream a generation from a running server")
    p.add_argument("--target", default="127.0.0.1:50051", help="server address H:P")
    credentials.add_arguments(p)
    p.add_argument("--model", required=True)
    p.add_argument("--version", default="", help='"" = production alias or latest')
    p.add_argument("--prompt", required=True)
    unset = "unset: the session's default sampling (server default %s)"
    p.add_argument(
        "--max-tokens",
        type=int,
        default=200,
        help="most tokens to generate (this command's default; a call that does not say gets "
        "the session's default, 16 on the server)",
    )
    p.add_argument("--temperature", type=float, help="0 = greedy; " + unset % "1.0")
    p.add_argument("--top-k", type=int, help="keep the K likeliest tokens; " + unset % "0, off")
    p.add_argument("--top-p", type=float, help="nucleus cut; " + unset % "1.0, off")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="makes the output reproducible")
    p.add_argument(
        "--timeout",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="the whole command's deadline: connecting, retries and the generation (unset: "
        "none, but an unreachable target is given up after the client's 30 s of retries)",
    )
    p.set_defaults(func=run)


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if not (seconds > 0 and math.isfinite(seconds)):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, not {value}")
    return seconds


CLOSE_ATTEMPTS = 40  # x 50 ms: a cancelled generation lets go of its session within this
# A session opened before `--timeout` ran out is still closed: its close gets at least this.
CLOSE_SECONDS = 1.0


async def _generate(args: argparse.Namespace) -> None:
    deadline = None if args.timeout is None else time.monotonic() + args.timeout

    def left() -> float | None:  # of `--timeout`, for each call (the client's DeadlineExceeded)
        return None if deadline is None else max(deadline - time.monotonic(), 0.0)

    async with SeqServeClient(args.target, credentials=credentials.from_args(args)) as client:
        session = await client.create_session(
            args.model, args.version, seed=args.seed, timeout=left()
        )
        try:
            sys.stdout.write(args.prompt)
            pieces = session.generate(
                args.prompt,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                top_k=args.top_k,
                top_p=args.top_p,
                stop=args.stop,
                timeout=left(),
            )
            async with contextlib.aclosing(pieces):  # a reader gone (`| head`) cancels the call
                async for piece in pieces:
                    sys.stdout.write(piece.text)
                    sys.stdout.flush()
            sys.stdout.write("\n")
        except grpc.aio.AioRpcError:
            sys.stdout.write("\n")  # the line the prompt began ends before the error's
            sys.stdout.flush()
            raise
        finally:
            limit = left()
            await _close(session, None if limit is None else max(limit, CLOSE_SECONDS))


async def _close(session: ClientSession, timeout: float | None) -> None:
    """Close the session; a generation cancelled just now may still hold it for a moment
    (the server answers ABORTED, one request at a time), so wait for it briefly."""
    for attempt in range(CLOSE_ATTEMPTS):
        try:
            await session.close(timeout=timeout)
            return
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.ABORTED or attempt == CLOSE_ATTEMPTS - 1:
                raise
            await asyncio.sleep(0.05)


def run(args: argparse.Namespace) -> int:
    try:
        check_target(args.target)  # as `loadtest` checks it, before gRPC sees it
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        # A reader that goes away (`| head`) ends it with BrokenPipeError once `_generate` has
        # closed the session; `seqserve`'s entry point ends the command quietly (status 0).
        asyncio.run(_generate(args))
    except grpc.aio.AioRpcError as exc:
        print(f"error: {_failure(exc, args.timeout)}", file=sys.stderr)
        return 1
    except (credentials.PlaintextToken, credentials.CredentialFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _failure(exc: grpc.aio.AioRpcError, timeout: float | None) -> str:
    """The error line's text: the status, or that `--timeout` ran out (no call has a deadline
    but the one it sets), with the failure being retried when it did (say, UNAVAILABLE)."""
    if timeout is not None and isinstance(exc, DeadlineExceededError):
        last = exc.__cause__
        why = f"; the last attempt: {last}" if isinstance(last, SeqServeError) else ""
        return f"DEADLINE_EXCEEDED: not done within --timeout {timeout:g} s{why}"
    return f"{exc.code().name}: {exc.details()}"
