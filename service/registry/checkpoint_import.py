"""Turn a `torch.save(state_dict)` checkpoint into a served model's config and tensors.

Accepted: a flat state dict holding nn.LSTM / nn.GRU weights (`weight_ih_l0`, `weight_hh_l0`,
`bias_ih_l0`, `bias_hh_l0`, … with or without a prefix such as `rnn.` or `lstm.`) together with
the input layer (`embedding.weight`, or `input_proj.weight` + `input_proj.bias`) and the head
(`head.weight`, `head.bias`). A full SequenceModel state dict is the simplest case. Other module
names are mapped with `rename_prefixes` (e.g. `fc.` → `head.`).

The architecture is read off the shapes (hidden size, gate count → cell, layers, widths), so
nothing is guessed. Missing tensors are an error that says what is needed: random weights are
never invented. The file is read with `torch.load(weights_only=True)`, which refuses arbitrary
pickled objects.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from service.errors import InvalidCheckpoint, WeightsMismatch
from service.models import ModelConfig
from service.models.config import HeadKind, InputKind
from service.registry.weights import check_tensors

_RNN_KEY_RE = re.compile(
    r"^(?P<prefix>.*?)(?P<kind>weight_ih|weight_hh|bias_ih|bias_hh|weight_hr)"
    r"_l(?P<layer>\d+)(?P<reverse>_reverse)?$"
)
_RNN_PARTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
_CELL_BY_GATES = {4: "lstm", 3: "gru"}


@dataclass(frozen=True)
class ImportSpec:
    """How to read a checkpoint, and the provenance to record in the manifest."""

    rename_prefixes: tuple[tuple[str, str], ...] = ()  # (old, new) key prefixes, first match wins
    key: str | None = None  # the state dict is this entry of the saved dict (e.g. "model")
    input_kind: InputKind | None = None  # asserted against the tensors when given
    head_kind: HeadKind | None = None  # default: classification iff head width == vocabulary
    reset_after: bool = True  # GRU: True for torch's nn.GRU, False for the article's GRU
    tokenizer: str = "bytes"
    description: str = ""
    data: str = ""  # training data provenance; default names the checkpoint file
    steps: int = 0
    command: str | None = None


def checkpoint_to_model(
    path: Path, spec: ImportSpec
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read `path` and return the config it describes and its tensors under DESIGN's names."""
    tensors = _rename(_read_state_dict(path, spec.key), spec.rename_prefixes)
    where = str(path)
    rnn = _take_rnn(tensors, where)
    cell, hidden = _cell_and_hidden(rnn["weight_hh_l0"], where)
    embed_dim = _matrix(rnn, "weight_ih_l0", where)[1]
    out = {f"rnn.{k}": v for k, v in rnn.items()}

    input_kind, input_dim = _take_input(tensors, out, embed_dim, where)
    if spec.input_kind is not None and spec.input_kind != input_kind:
        raise InvalidCheckpoint(
            f"{where}: asked for {spec.input_kind} input, but the checkpoint has a {input_kind} "
            "input layer"
        )
    output_dim = _take_head(tensors, out, hidden, where)
    head_kind = spec.head_kind or (
        "classification" if input_kind == "tokens" and output_dim == input_dim else "regression"
    )
    if tensors:
        raise InvalidCheckpoint(
            f"{where}: tensors not part of the model: {', '.join(sorted(tensors))}; map them "
            "with rename_prefixes (--rename-prefix OLD=NEW) or remove them"
        )
    try:
        config = ModelConfig(
            cell="lstm" if cell == "lstm" else "gru",
            num_layers=sum(1 for k in rnn if k.startswith("weight_ih_l")),
            hidden_size=hidden,
            input_kind=input_kind,
            input_dim=input_dim,
            embed_dim=embed_dim,
            head_kind=head_kind,
            output_dim=output_dim,
            reset_after=spec.reset_after,
        )
    except AssertionError as exc:
        raise InvalidCheckpoint(f"{where}: {exc}") from exc
    try:
        check_tensors(out, config, where)
    except WeightsMismatch as exc:
        raise InvalidCheckpoint(exc.message) from exc
    return config, out


def _cell_and_hidden(weight_hh: torch.Tensor, where: str) -> tuple[str, int]:
    """The cell kind and hidden size `weight_hh_l0` ([gates * hidden, hidden]) describes."""
    shape = tuple(weight_hh.shape)
    rows, hidden = shape if len(shape) == 2 else (0, 0)
    gates = rows // hidden if hidden else 0
    cell = _CELL_BY_GATES.get(gates) if hidden and gates * hidden == rows else None
    if cell is None:
        raise InvalidCheckpoint(
            f"{where}: weight_hh_l0 has shape {list(shape)}: not an LSTM ([4*hidden, hidden]) "
            "or GRU ([3*hidden, hidden])"
        )
    return cell, hidden


def _matrix(tensors: Mapping[str, torch.Tensor], name: str, where: str) -> tuple[int, int]:
    """The shape of `tensors[name]`, which must be a matrix with no empty side: the
    architecture is read off its widths."""
    shape = tuple(tensors[name].shape)
    if len(shape) != 2 or 0 in shape:
        raise InvalidCheckpoint(f"{where}: {name} has shape {list(shape)}: expected a matrix")
    return shape[0], shape[1]


def _why_unreadable(exc: Exception) -> str:
    """One line for a file `torch.load(weights_only=True)` refused. Not torch's own message:
    it runs to several lines and suggests loading with `weights_only=False`, which would run
    whatever code a pickle carries."""
    text = str(exc)
    if "Weights only load failed" in text:
        found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
        detail = f" ({found.group(1).strip()})" if found else ""
        return f"holds more than tensors and plain containers: refused, none of it was run{detail}"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"not a torch checkpoint ({type(exc).__name__}{': ' + first[:200] if first else ''})"


def _read_state_dict(path: Path, key: str | None) -> dict[str, torch.Tensor]:
    try:
        with warnings.catch_warnings():  # its pickle-protocol note is not the user's business
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise InvalidCheckpoint(f"{path}: no such file") from exc
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, … for bad files
        raise InvalidCheckpoint(f"{path}: {_why_unreadable(exc)}") from exc
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            raise InvalidCheckpoint(f"{path}: has no entry {key!r}")
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise InvalidCheckpoint(f"{path}: expected a state dict, got {type(obj).__name__}")
    not_tensors = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise InvalidCheckpoint(
            f"{path}: entries that are not tensors: {', '.join(not_tensors)}; if the state dict "
            "is one of them, name it with --key"
        )
    result: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if not v.is_floating_point():
            raise InvalidCheckpoint(f"{path}: tensor {k!r} has dtype {v.dtype}, not floating point")
        result[str(k)] = v.to(torch.float32).contiguous()
    return result


def _rename(
    tensors: dict[str, torch.Tensor], renames: tuple[tuple[str, str], ...]
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        for old, new in renames:
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        if name in out:
            raise InvalidCheckpoint(f"renaming makes two tensors named {name!r}")
        out[name] = tensor
    return out


def _take_rnn(tensors: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Remove the recurrent weights from `tensors`, returned without their prefix."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for name in list(tensors):
        m = _RNN_KEY_RE.fullmatch(name)
        if m is None:
            continue
        if m["reverse"]:
            raise InvalidCheckpoint(f"{where}: {name}: bidirectional RNNs cannot serve a stream")
        if m["kind"] == "weight_hr":
            raise InvalidCheckpoint(f"{where}: {name}: LSTM projections (proj_size) unsupported")
        found.setdefault(m["prefix"], {})[f"{m['kind']}_l{m['layer']}"] = tensors.pop(name)
    if not found:
        raise InvalidCheckpoint(
            f"{where}: no recurrent weights found: expected nn.LSTM / nn.GRU names such as "
            "'weight_ih_l0' (optionally with a prefix, e.g. 'rnn.weight_ih_l0')"
        )
    if len(found) > 1:
        prefixes = ", ".join(repr(p) for p in sorted(found))
        raise InvalidCheckpoint(f"{where}: several recurrent modules ({prefixes}); keep one")
    rnn = next(iter(found.values()))
    layers = sum(1 for k in rnn if k.startswith("weight_ih_l"))
    missing = [
        f"{p}_l{k}" for k in range(max(layers, 1)) for p in _RNN_PARTS if f"{p}_l{k}" not in rnn
    ]
    extra = sorted(set(rnn) - {f"{p}_l{k}" for k in range(layers) for p in _RNN_PARTS})
    problems = []
    if missing:
        problems.append("missing " + ", ".join(missing))
    if extra:
        problems.append("unexpected " + ", ".join(extra))
    if problems:
        raise InvalidCheckpoint(f"{where}: incomplete recurrent weights: {'; '.join(problems)}")
    return rnn


def _take_input(
    tensors: dict[str, torch.Tensor], out: dict[str, torch.Tensor], embed_dim: int, where: str
) -> tuple[InputKind, int]:
    """Move the input layer from `tensors` to `out`; return its kind and width."""
    if "embedding.weight" in tensors:
        out["embedding.weight"] = tensors.pop("embedding.weight")
        return "tokens", _matrix(out, "embedding.weight", where)[0]
    if "input_proj.weight" in tensors and "input_proj.bias" in tensors:
        out["input_proj.weight"] = tensors.pop("input_proj.weight")
        out["input_proj.bias"] = tensors.pop("input_proj.bias")
        return "features", _matrix(out, "input_proj.weight", where)[1]
    raise InvalidCheckpoint(
        f"{where}: no input layer. The recurrent weights take {embed_dim} inputs; the checkpoint "
        f"also needs 'embedding.weight' [vocab_size, {embed_dim}] for token input, or "
        f"'input_proj.weight' [{embed_dim}, frame_dim] and 'input_proj.bias' [{embed_dim}] for "
        "frame input. Save them alongside (e.g. the whole model's state_dict) and map other "
        "names with --rename-prefix OLD=NEW"
    )


def _take_head(
    tensors: dict[str, torch.Tensor], out: dict[str, torch.Tensor], hidden: int, where: str
) -> int:
    """Move the head from `tensors` to `out`; return its output width."""
    if "head.weight" in tensors and "head.bias" in tensors:
        out["head.weight"] = tensors.pop("head.weight")
        out["head.bias"] = tensors.pop("head.bias")
        return _matrix(out, "head.weight", where)[0]
    raise InvalidCheckpoint(
        f"{where}: no head. The checkpoint needs 'head.weight' [outputs, {hidden}] and "
        "'head.bias' [outputs] (a Linear over the last hidden state: outputs = vocab_size for "
        "next-token classification, or the regression width); map other names with "
        "--rename-prefix OLD=NEW"
    )
