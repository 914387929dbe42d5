"""`seqserve train`: train a model on real offline data and publish it as a new version.

Two tasks: `text` (a byte-level LM over Python standard-library source) and `series` (a
next-week forecaster over the Mauna Loa CO2 series). Flags left out take the task's defaults
below. The manifest records the data set, steps, seed, final loss, the validation figures next
to a trivial baseline's, and `command`: the full command line, every training flag spelled out,
so the run can be repeated even if defaults change.

Every run compares its validation figures with the baseline's. A model that does not beat the
baseline (too few steps, too high a learning rate) is published with a warning on stderr; with
`--require-baseline` it is not published at all.

Exit codes: 0 published; 1 the data or store refused; 2 a bad argument; 3 not published
because `--require-baseline` was given and validation did not beat the baseline.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from service.cli.settings_flags import store_path
from service.config_sources import load
from service.errors import InvalidArgument, SeqServeError
from service.registry.aliases import validate_alias_name

if TYPE_CHECKING:  # torch and training are imported when the command runs: --help stays fast
    from service.models import CellKind
    from service.training.trainer import BaselineShortfall, TrainResult

EXIT_WORSE_THAN_BASELINE = 3


@dataclass(frozen=True)
class TaskDefaults:
    name: str
    cell: CellKind
    reset_after: bool
    layers: int
    hidden: int
    embed: int
    steps: int
    batch: int
    seq_len: int
    lr: float


# What `seqserve train --task X` trains when no other flag is given: the shipped models.
TASK_DEFAULTS: dict[str, TaskDefaults] = {
    "text": TaskDefaults(
        name="bytes-lstm", cell="lstm", reset_after=True, layers=2, hidden=256, embed=64,
        steps=2400, batch=32, seq_len=128, lr=3e-3,
    ),
    "series": TaskDefaults(
        name="co2-gru", cell="gru", reset_after=False, layers=1, hidden=64, embed=16,
        steps=600, batch=32, seq_len=156, lr=3e-3,
    ),
}  # fmt: skip

# Flags that decide the weights, in the order `command` spells them out.
_RECORDED_FLAGS = (
    "task", "name", "cell", "reset_after", "layers", "hidden", "embed", "steps", "batch",
    "seq_len", "lr", "seed", "threads", "eval_bytes",
)  # fmt: skip


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model and publish it to the store",
        description="Train a model on offline data and publish it as a new version.",
    )
    p.add_argument(
        "--task",
        choices=sorted(TASK_DEFAULTS),
        default="text",
        help="text: byte LM on stdlib source; series: CO2 forecaster (default: text)",
    )
    p.add_argument("--name", help="model name in the store (default: bytes-lstm / co2-gru)")
    p.add_argument("--cell", choices=("lstm", "gru"), help="recurrent cell")
    p.add_argument(
        "--reset-after",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="GRU: torch's reset-after cell, or (--no-reset-after) the article's "
        "(default: on, except off for --task series)",
    )
    p.add_argument("--layers", type=_positive_int, help="stacked recurrent layers")
    p.add_argument("--hidden", type=_positive_int, help="hidden size H")
    p.add_argument("--embed", type=_positive_int, help="embedding / input projection width")
    p.add_argument("--steps", type=_positive_int, help="optimiser steps")
    p.add_argument("--batch", type=_positive_int, help="sequences per step")
    p.add_argument("--seq-len", type=_positive_int, help="time steps per sequence (BPTT window)")
    p.add_argument("--lr", type=_positive_float, help="peak learning rate (Adam, cosine decay)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and data order")
    # One thread by default: on a shared or busy CPU, extra OpenMP threads spin against other
    # processes and a step can get ten times slower (measured on the 2-core dev machine).
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="torch intra-op threads (results are repeatable per thread count)",
    )
    p.add_argument(
        "--eval-bytes",
        type=_positive_int,
        default=None,
        help="text: score only the first N held-out bytes (default: all)",
    )
    p.add_argument("--alias", help="also point this alias (e.g. production) at the new version")
    p.add_argument(
        "--require-baseline",
        action="store_true",
        help="publish only if every validation figure beats the trivial baseline's "
        "(otherwise exit 3 and write nothing; without it: publish with a warning)",
    )
    p.add_argument(
        "--store",
        type=store_path,
        default=None,
        help="store root (default: SEQSERVE_MODEL_STORE, else ./model_store)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train)  # fmt: skip


def resolve_options(args: argparse.Namespace) -> argparse.Namespace:
    """Fill every flag left out with the task's default; the result is what `command` records."""
    defaults = TASK_DEFAULTS[args.task]
    resolved = argparse.Namespace(**vars(args))
    for field in ("name", "cell", "reset_after", "layers", "hidden", "embed", "steps", "batch",
                  "seq_len", "lr"):  # fmt: skip
        if getattr(resolved, field) is None:
            setattr(resolved, field, getattr(defaults, field))
    if resolved.alias is not None:  # before training and publishing, not after
        validate_alias_name(resolved.alias)
    if resolved.eval_bytes is not None and resolved.task != "text":
        raise InvalidArgument("--eval-bytes applies to --task text only")
    if resolved.cell == "lstm":
        if args.reset_after is not None:
            raise InvalidArgument("--reset-after / --no-reset-after apply to a GRU only")
        resolved.reset_after = True  # meaningless for an LSTM; keep the manifest's default
    return resolved


def canonical_command(args: argparse.Namespace) -> str:
    """`seqserve train` with every weight-deciding flag written out."""
    words = ["seqserve", "train"]
    for field in _RECORDED_FLAGS:
        value = getattr(args, field)
        flag = "--" + field.replace("_", "-")
        if field == "reset_after":
            if args.cell == "gru":
                words.append(flag if value else "--no-reset-after")
        elif value is not None:
            words += [flag, str(value)]
    if args.alias:
        words += ["--alias", args.alias]
    return shlex.join(words)


def run_train(args: argparse.Namespace) -> int:
    import torch

    from service.registry.manifest import Training
    from service.registry.store import ModelStore
    from service.training.series_task import train_series
    from service.training.text_task import train_text
    from service.training.trainer import TrainOptions, baseline_shortfalls

    try:
        resolved = resolve_options(args)
        options = TrainOptions(
            cell=resolved.cell,
            reset_after=resolved.reset_after,
            num_layers=resolved.layers,
            hidden_size=resolved.hidden,
            embed_dim=resolved.embed,
            steps=resolved.steps,
            batch_size=resolved.batch,
            seq_len=resolved.seq_len,
            lr=resolved.lr,
            seed=resolved.seed,
        )
        # The composition root for this command: settings loaded as `serve` loads them (a bad
        # variable is its one line naming it), and only without --store.
        store = ModelStore(args.store if args.store is not None else load().settings.model_store)
        torch.set_num_threads(resolved.threads)
        progress = not args.no_progress
        result: TrainResult
        if resolved.task == "text":
            result = train_text(options, progress=progress, max_eval_bytes=resolved.eval_bytes)
        else:
            result = train_series(options, progress=progress)
        shortfalls = baseline_shortfalls(result)
        _warn(shortfalls, refused=args.require_baseline)
        if shortfalls and args.require_baseline:
            return EXIT_WORSE_THAN_BASELINE
        training = Training(
            data=result.data,
            steps=options.steps,
            seed=options.seed,
            final_loss=result.final_loss,
            validation=result.validation,
            baselines=result.baselines,
            command=canonical_command(resolved),
        )
        manifest = store.publish(
            resolved.name,
            result.config,
            result.state_dict,
            description=result.description,
            training=training,
        )
        if resolved.alias:
            store.set_alias(manifest.name, resolved.alias, manifest.version)
    except SeqServeError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2 if isinstance(exc, InvalidArgument) else 1
    print(f"published {manifest.name} version {manifest.version} to {store.root}")
    for metric, value in result.validation.items():
        base = result.baselines.get(metric)
        versus = f" (baseline {base:.4f})" if base is not None else ""
        print(f"  validation {metric}: {value:.4f}{versus}")
    if resolved.alias:
        print(f"  alias {resolved.alias} → {manifest.version}")
    return 0


def _warn(shortfalls: list[BaselineShortfall], *, refused: bool) -> None:
    if not shortfalls:
        return
    figures = ", ".join(
        f"{s.metric} {s.value:.4f} vs baseline {s.baseline:.4f}" for s in shortfalls
    )
    print(
        f"warning: validation is no better than the trivial baseline ({figures}; lower is "
        "better): train longer (--steps) or check the learning rate",
        file=sys.stderr,
    )
    if refused:
        print("error: --require-baseline: not published; the store is unchanged", file=sys.stderr)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value
