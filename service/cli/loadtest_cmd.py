"""`seqserve loadtest`: drive a running server with concurrent sessions and report on it."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from service.client import credentials
from service.loadtest.config import LoadConfig

if TYPE_CHECKING:  # the rest when the command runs: numpy stays out of `seqserve --help`
    from service.loadtest import LoadReport


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "loadtest",
        help="put session-aware load on a running server",
        description="Open N sessions on the server at --target and drive them for --duration "
        "seconds: in closed loops (each session sends, waits for the answer, thinks, repeats), "
        "or with --rate R in an open loop (requests arrive as a Poisson process at R per "
        "second, each on an idle session, latency measured from the intended send time). "
        "Report tokens/s, latency percentiles and errors. Contacts the --target address and "
        "nothing else.",
    )
    d = LoadConfig(target="")
    p.add_argument("--target", default="127.0.0.1:50051", help="server address H:P")
    credentials.add_arguments(p)
    p.add_argument("--sessions", type=int, default=d.sessions, help="concurrent sessions (>= 1)")
    p.add_argument("--duration", type=float, default=d.duration_seconds, help="seconds measured")
    p.add_argument("--json", type=Path, help="write the report as JSON here ('-' = stdout)")
    p.add_argument(
        "--plot",
        type=Path,
        help="write a PNG: latency distribution with p50/p99, latency and throughput over time",
    )
    p.add_argument("--model", default=d.model)
    p.add_argument(
        "--version",
        default=d.version,
        help='"" (production alias, else latest), "latest", a number or an alias',
    )
    p.add_argument(
        "--tokens-per-message",
        type=int,
        default=d.tokens_per_message,
        help="inputs per feed item (tokens, or frames for a feature model)",
    )
    p.add_argument(
        "--think-ms",
        type=float,
        default=d.think_ms,
        help="mean pause between a session's turns (uniform ±50%%)",
    )
    p.add_argument(
        "--generate-fraction",
        type=float,
        default=d.generate_fraction,
        help="share of turns that generate (0..1)",
    )
    p.add_argument(
        "--generate-via",
        choices=("rpc", "stream"),
        default=d.generate_via,
        help="the Generate RPC, or a generate item on the session's Stream",
    )
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="tokens per generation")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument(
        "--multiplex",
        type=int,
        default=d.multiplex,
        help="sessions per Stream, one frame per tick with one item each",
    )
    p.add_argument(
        "--client-mux",
        action="store_true",
        help="each session awaits its own feeds on one Python client, which coalesces them "
        "into one Stream message per event-loop tick (an app's one-token-per-call pattern)",
    )
    p.add_argument(
        "--history",
        type=int,
        default=d.history,
        help="inputs fed to each session before the clock starts",
    )
    p.add_argument("--top-k", type=int, default=d.top_k, help="top-k per prediction (0 = server)")
    p.add_argument(
        "--warmup", type=float, default=d.warmup_seconds, help="seconds of load before measuring"
    )
    p.add_argument(
        "--invalid-sessions",
        type=int,
        default=d.invalid_sessions,
        help="extra sessions with ids the server never issued (exercises errors)",
    )
    p.add_argument(
        "--rate",
        type=float,
        default=d.rate,
        help="open loop: mean requests per second over all sessions, Poisson arrivals "
        "(0 = closed loop); --sessions caps how many are in flight",
    )
    p.add_argument(
        "--late-ms",
        type=float,
        default=d.late_ms,
        help="open loop: a request sent this long after its arrival is counted late",
    )
    p.add_argument(
        "--max-lag",
        type=float,
        default=d.max_lag_seconds,
        help="open loop: seconds a request may wait for a free session before it is dropped",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--ready-timeout",
        type=float,
        default=d.ready_timeout_seconds,
        help="seconds to wait for the server to accept connections",
    )
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=run)  # fmt: skip


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    return LoadConfig(
        target=args.target,
        model=args.model,
        version=args.version,
        sessions=args.sessions,
        duration_seconds=args.duration,
        warmup_seconds=args.warmup,
        tokens_per_message=args.tokens_per_message,
        think_ms=args.think_ms,
        generate_fraction=args.generate_fraction,
        generate_via=args.generate_via,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        multiplex=args.multiplex,
        client_mux=args.client_mux,
        history=args.history,
        top_k=args.top_k,
        invalid_sessions=args.invalid_sessions,
        seed=args.seed,
        ready_timeout_seconds=args.ready_timeout,
        rate=args.rate,
        late_ms=args.late_ms,
        max_lag_seconds=args.max_lag,
    )


def run(args: argparse.Namespace) -> int:
    from service.loadtest import TargetError, run_load
    from service.loadtest.progress import ProgressPrinter
    from service.loadtest.report import check_writable

    try:
        config = config_from_args(args)
        config.validate()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        creds = credentials.from_args(args)
        if args.json is not None and str(args.json) != "-":
            check_writable(args.json)  # not after the whole run
    except credentials.CredentialFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: --json {args.json}: {exc.strerror}", file=sys.stderr)
        return 2
    printer = None if args.quiet else ProgressPrinter(sys.stderr)
    try:
        report = asyncio.run(run_load(config, progress=printer, credentials=creds))
    except TargetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except credentials.PlaintextToken as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if printer is not None:
            printer.finish()
    return _output(report, args)


def _output(report: LoadReport, args: argparse.Namespace) -> int:
    to_stdout = args.json is not None and str(args.json) == "-"
    print(report.render_text(), file=sys.stderr if to_stdout else sys.stdout)
    if to_stdout:
        import json

        print(json.dumps(report.to_dict(), indent=2))
    elif args.json is not None:
        try:
            report.write_json(args.json)
        except OSError as exc:  # e.g. the disk filled during the run
            print(f"error: --json {args.json}: {exc.strerror}", file=sys.stderr)
            return 1
    if args.plot is not None:
        from service.loadtest.plot import PlotUnavailable, write_plot

        try:
            write_plot(report, args.plot)
        except PlotUnavailable as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    # Nothing answered at all (no session, every call failed): a failed load test.
    return 0 if report.tokens > 0 else 1
