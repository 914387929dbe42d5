"""`seqserve predict`: offline prediction straight from the store, no server.

Feeds the input from a zero state in one `run_chunk` call and prints the prediction after the
last input: the next-token top-k for a token model, the output vector for a regression model.
`--json` prints exactly `{"model","version","position","top":[{"id","prob","text"}…]}` or
`{"model","version","position","values":[…]}`.

Exit codes: 0 success; 1 the store refused (not found, digest mismatch); 2 a bad argument or
setting (a device this torch does not have, as `serve` refuses it).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from typing import TYPE_CHECKING, Any

from service.cli.settings_flags import store_path
from service.config_sources import InvalidSetting, load
from service.errors import InvalidArgument, SeqServeError
from service.startup_checks import check_device

if TYPE_CHECKING:  # torch and the store are imported when the command runs: --help stays fast
    import torch

    from service.registry.manifest import Manifest
    from service.registry.store import VerifiedModel


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "predict",
        help="offline prediction from the store",
        description="Load a model from the store, feed the input from a zero state and print "
        "the prediction after the last input.",
    )
    p.add_argument("--model", required=True, help="model name")
    p.add_argument(
        "--version", default="", help="version, alias or 'latest' (default: production, latest)"
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="text, tokenized by the model's tokenizer")
    source.add_argument("--tokens", help="comma-separated token ids, e.g. 72,105")
    source.add_argument("--frames", help="comma-separated floats, a multiple of the frame width")
    p.add_argument("--top-k", type=int, default=None, help="entries in a token prediction")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--store", type=store_path, default=None, help="store root (default: settings)")
    p.set_defaults(func=_predict)


_NEGATIVE_NUMBER = re.compile(r"-\.?\d")  # "-0.5,0.3", "-.5,1", "-1e15,0,0"


def join_negative_frames(argv: list[str]) -> list[str]:
    """`predict`'s arguments with `--frames -0.5,0.3` given as `--frames=-0.5,0.3`.

    argparse takes a value that starts with "-" for an option unless it is one plain negative
    number, so a list of frames starting with a negative value would be refused with a usage
    error. A flag that abbreviates `--frames` (argparse accepts those) is joined the same way;
    nothing after `--` is touched."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return out + argv[i:]
        if (
            len(arg) >= 3
            and "--frames".startswith(arg)
            and i + 1 < len(argv)
            and _NEGATIVE_NUMBER.match(argv[i + 1])
        ):
            out.append(f"{arg}={argv[i + 1]}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


def _predict(args: argparse.Namespace) -> int:
    from service.registry.store import ModelStore
    from service.registry.version_rule import VersionRule

    # The composition root for this command: settings loaded as `serve` loads them (a bad
    # variable is its one line naming it).
    settings = load().settings
    try:
        check_device(settings)
    except InvalidSetting as exc:
        print(f"seqserve: {exc}", file=sys.stderr)  # one line, as `serve` says it
        return 2
    store = ModelStore(args.store if args.store is not None else settings.model_store)
    top_k = settings.engine.default_top_k if args.top_k is None else args.top_k
    try:
        if top_k < 1:
            raise InvalidArgument(f"--top-k must be at least 1, got {top_k}")
        model = store.model(args.model)
        # The server's rule: "latest" (or "" with no `production` alias) skips a newest version
        # whose weights fail their digest, for the next older one.
        version = VersionRule().version_for(model, args.version)
        manifest = model.usable(version).manifest
        assert manifest is not None, "usable versions have a manifest"
        # Check the input against the manifest before paying for a load.
        inputs = parse_input(manifest, text=args.text, tokens=args.tokens, frames=args.frames)
        loaded = store.load(args.model, version, device=settings.engine.device)
    except SeqServeError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2 if isinstance(exc, InvalidArgument) else 1
    result = predict(loaded, inputs, top_k)
    if args.json:
        print(json.dumps(result))
    else:
        print(_format(result))
    return 0


def parse_input(
    manifest: Manifest, *, text: str | None, tokens: str | None, frames: str | None
) -> torch.Tensor:
    """The input as a batch of one: token ids [1, T] (int64) or frames [1, T, D] (float32).
    Raises InvalidArgument with a message fit for a terminal."""
    import torch

    from service.engine.model_input import MAX_FRAME_VALUE
    from service.models.tokenizer import get_tokenizer
    from service.registry.manifest import TokensInput

    spec = manifest.input
    if isinstance(spec, TokensInput):
        if frames is not None:
            raise InvalidArgument(
                f"{manifest.name!r} takes tokens (vocabulary {spec.vocab_size}), not frames; "
                "use --text or --tokens"
            )
        if text is not None:
            if not text:
                raise InvalidArgument("--text is empty")
            try:
                ids = get_tokenizer(spec.tokenizer).encode(text)
            except UnicodeEncodeError as exc:
                # Bytes that are not UTF-8 in argv arrive as surrogate escapes; the server
                # takes text as UTF-8 only (a protobuf string), so refuse it as it would.
                raise InvalidArgument(
                    f"--text is not UTF-8 (from character {exc.start}); give such bytes as --tokens"
                ) from None
        else:
            assert tokens is not None
            ids = [int(x) for x in _split_numbers(tokens, "--tokens", int)]
            bad = [i for i in ids if not 0 <= i < spec.vocab_size]
            if bad:
                raise InvalidArgument(
                    f"token id {bad[0]} out of range: {manifest.name!r} has vocabulary "
                    f"{spec.vocab_size} (ids 0..{spec.vocab_size - 1})"
                )
        return torch.tensor([ids], dtype=torch.int64)  # [1, T]
    if frames is None:
        raise InvalidArgument(
            f"{manifest.name!r} takes frames of {spec.dim} floats, not text or tokens; use --frames"
        )
    values = _split_numbers(frames, "--frames", float)
    if len(values) % spec.dim:
        raise InvalidArgument(
            f"--frames has {len(values)} values, not a multiple of the frame width {spec.dim}"
        )
    # The server's bounds, on the values as the model takes them (1e300 is no float32).
    floats = torch.tensor(values, dtype=torch.float32)
    if not all(math.isfinite(v) for v in values) or not bool(torch.isfinite(floats).all()):
        raise InvalidArgument("--frames values must be finite numbers (as float32)")
    if bool((floats.abs() > MAX_FRAME_VALUE).any()):
        raise InvalidArgument(f"--frames values must be within ±{MAX_FRAME_VALUE:g}")
    return floats.view(1, -1, spec.dim)  # [1, T, D]


def predict(loaded: VerifiedModel, inputs: torch.Tensor, top_k: int) -> dict[str, Any]:
    """Run `inputs` [1, T(, D)] from a zero state; the JSON-shaped prediction after the last."""
    import torch

    model = loaded.model
    device = next(model.parameters()).device
    steps = inputs.shape[1]
    out, _ = model.run_chunk(
        inputs.to(device), model.zero_state(1, device), torch.tensor([steps])
    )  # out [1, output_dim]
    result: dict[str, Any] = {
        "model": loaded.manifest.name,
        "version": loaded.manifest.version,
        "position": steps,
    }
    if loaded.tokenizer is None:
        result["values"] = out[0].cpu().tolist()
        return result
    probs = torch.softmax(out[0].float(), dim=-1)  # [V]
    top = torch.topk(probs, k=min(top_k, probs.shape[0]))
    result["top"] = [
        {"id": int(i), "prob": float(p), "text": loaded.tokenizer.decode_one(int(i))}
        for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
    ]
    return result


def _split_numbers(text: str, flag: str, kind: type[int] | type[float]) -> list[float]:
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in parts):
        raise InvalidArgument(f"{flag} expects comma-separated numbers, e.g. 1,2,3; got {text!r}")
    try:
        return [kind(p) for p in parts]
    except ValueError as exc:
        raise InvalidArgument(f"{flag}: {exc}") from exc


def _format(result: dict[str, Any]) -> str:
    head = f"{result['model']} version {result['version']}, position {result['position']}"
    if "values" in result:
        return head + "\n" + "  ".join(f"{v:.6g}" for v in result["values"])
    lines = [head, f"{'RANK':<5} {'ID':>4}  {'PROB':>8}  TEXT"]
    for rank, item in enumerate(result["top"], start=1):
        lines.append(f"{rank:<5} {item['id']:>4}  {item['prob']:8.4f}  {item['text']!r}")
    return "\n".join(lines)
