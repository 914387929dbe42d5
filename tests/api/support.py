"""Helpers shared by the API tests: request builders, reading Stream replies, asserting statuses,
and the NumPy reference of the article's equations run over a store's weights file."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2, status_pb2

from service.errors import REASONS
from service.pb.seqserve.v1 import session_service_pb2 as pb
from service.pb.seqserve.v1 import types_pb2 as types
from tests.polling import until


def _load_reference() -> ModuleType:
    """tests/models/reference.py, by path (tests/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "models" / "reference.py"
    name = "seqserve_tests_reference"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


ref = _load_reference()

# ---- requests --------------------------------------------------------------------------------


def tokens(*ids: int) -> types.Input:
    return types.Input(tokens=types.Tokens(ids=list(ids)))


def text(s: str) -> types.Input:
    return types.Input(text=s)


def frames(values: Iterable[float]) -> types.Input:
    return types.Input(frames=types.Frames(values=[float(v) for v in values]))


def item(
    session_id: str,
    request_id: str,
    inp: types.Input | None = None,
    *,
    generate: types.Sampling | None = None,
    top_k: int = 0,
    per_position: bool = False,
) -> pb.StreamItem:
    msg = pb.StreamItem(
        session_id=session_id,
        request_id=request_id,
        options=types.PredictionOptions(top_k=top_k, per_position=per_position),
    )
    if inp is not None:
        msg.input.CopyFrom(inp)
    if generate is not None:
        msg.generate.sampling.CopyFrom(generate)
    return msg


async def read_replies(
    call: Any, request_ids: Iterable[str], *, generate: Iterable[str] = ()
) -> dict[str, list[pb.StreamReply]]:
    """Read Stream responses until every request id has its reply: one for an input item, the
    reply with a finish_reason (or an error) for a generate item. Replies by request id, in
    arrival order."""
    gen_ids = set(generate)
    waiting = set(request_ids) | gen_ids
    out: dict[str, list[pb.StreamReply]] = {}
    while waiting:
        message = await call.read()
        assert message is not grpc.aio.EOF, f"stream ended; still waiting for {sorted(waiting)}"
        for reply in message.replies:
            out.setdefault(reply.request_id, []).append(reply)
            ended = (
                reply.error.code != 0
                or reply.request_id not in gen_ids
                or reply.token.finish_reason != types.FINISH_REASON_UNSPECIFIED
            )
            if ended:
                waiting.discard(reply.request_id)
            if reply.error.code != 0:  # an in-band error carries its reason like a call's
                check_error_info(reply.error)
    return out


async def expect_status(
    awaitable: Any,
    code: grpc.StatusCode,
    *needles: str,
    reason: str | None = None,
    by_grpc: bool = False,
) -> str:
    """Await a unary call; assert it fails with `code`, a message containing `needles`, and an
    ErrorInfo detail whose reason is a row of `code` in the error table (`reason`, if given).
    `by_grpc`: the status comes from gRPC itself (e.g. a message over its size limit), which
    carries no details."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await awaitable
    details = err.value.details() or ""
    assert err.value.code() == code, f"expected {code.name}, got {err.value.code()}: {details}"
    for needle in needles:
        assert needle in details, f"{needle!r} not in {details!r}"
    if not by_grpc:
        status = status_pb2.Status()
        for key, value in err.value.trailing_metadata() or ():
            if key == "grpc-status-details-bin":
                status.ParseFromString(value)
        assert status.code == code_value(code), f"no status details on {code.name}: {details}"
        check_error_info(status, reason)
    return details


def check_error_info(status: status_pb2.Status, reason: str | None = None) -> str:
    """Assert `status` carries a seqserve.v1 ErrorInfo whose reason is a row of its code in the
    error table (and is `reason`, if given); returns the reason."""
    infos = []
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            infos.append(info)
    assert len(infos) == 1, f"expected one ErrorInfo on {status}"
    assert infos[0].domain == "seqserve.v1"
    got = infos[0].reason
    assert REASONS.get(got) is not None and REASONS[got].value[0] == status.code, (got, status)
    if reason is not None:
        assert got == reason, f"expected reason {reason}, got {got}: {status.message}"
    return got


async def expect_stream_status(
    call: Any, code: grpc.StatusCode, *needles: str, reason: str | None = None
) -> str:
    """Drain a server-streaming call; assert it ends with `code` (as `expect_status`)."""

    async def drain() -> None:
        async for _ in call:
            pass

    return await expect_status(drain(), code, *needles, reason=reason)


def code_value(code: grpc.StatusCode) -> int:
    return int(code.value[0])


# ---- the reference -----------------------------------------------------------------------------


class ReferenceSession:
    """The article's equations (tests/models/reference.py) in float64 over the weights file a
    version serves, read by name; keeps h (and c) between chunks like a server session."""

    def __init__(self, store_root: Path, model: str, version: int = 1) -> None:
        version_dir = store_root / model / str(version)
        self.manifest = json.loads((version_dir / "manifest.json").read_text())
        self.weights = ref.load_safetensors(version_dir / "weights.safetensors")
        self.config = ref.as_ref_config(self.manifest)
        self.h: np.ndarray | None = None
        self.c: np.ndarray | None = None
        self.position = 0

    @property
    def frame_dim(self) -> int:
        return int(self.manifest["input"]["dim"])

    def feed(self, chunk: Sequence[int] | Sequence[float]) -> np.ndarray:
        """Consume one chunk; returns the head output at each of its positions [T, out]
        (logits for a token model, values for a regression model)."""
        if self.config.input_kind == "tokens":
            inputs = np.asarray(chunk, dtype=np.int64)[None, :]  # [1, T]
        else:
            inputs = np.asarray(chunk, dtype=np.float64).reshape(1, -1, self.frame_dim)
        out = ref.run_model(self.weights, self.config, inputs, h0=self.h, c0=self.c)
        self.h, self.c = out.h, out.c
        self.position += inputs.shape[1]
        return out.outputs[0]


REL_TOL = 1e-5  # relative error allowed on a served probability (float32 against float64)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def assert_matches_reference(
    pred: types.Prediction, head_out: np.ndarray, tol: float = 1e-5
) -> None:
    """One served prediction against the reference head output at the same position."""
    if pred.WhichOneof("kind") == "regression":
        np.testing.assert_allclose(list(pred.regression.values), head_out, rtol=0, atol=tol)
        return
    assert pred.WhichOneof("kind") == "tokens"
    probs = softmax(head_out)
    served = [(t.id, t.prob) for t in pred.tokens.top]
    assert served, "empty token prediction"
    ids = [i for i, _ in served]
    np.testing.assert_allclose([p for _, p in served], probs[ids], rtol=0, atol=tol)
    # Probabilities of a 256-way softmax are small, so also hold them to a relative bound.
    np.testing.assert_allclose([p for _, p in served], probs[ids], rtol=REL_TOL, atol=0)
    assert [p for _, p in served] == sorted((p for _, p in served), reverse=True)
    rest = np.delete(probs, ids)
    # The served ids are the k most likely (up to float noise between near-equal tokens).
    assert rest.size == 0 or float(probs[ids].min()) >= float(rest.max()) - tol


def top_ids(pred: types.Prediction) -> list[int]:
    return [t.id for t in pred.tokens.top]


def top_probs(pred: types.Prediction) -> list[float]:
    return [t.prob for t in pred.tokens.top]


def rpc_counts(server: Any, method: str) -> dict[str, float]:
    """RPCs of `method` a server's metric has recorded (`seqserve_rpc_duration_seconds`), by
    status code, over both protocols (gRPC and HTTP)."""
    counts: dict[str, float] = {}
    for family in server.metrics.registry.collect():
        if family.name != "seqserve_rpc_duration_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_count") and sample.labels.get("method") == method:
                code = sample.labels["code"]
                counts[code] = counts.get(code, 0.0) + sample.value
    return counts


async def recorded_rpcs(server: Any, method: str, calls: int = 1) -> dict[str, float]:
    """The counts for `method` once `calls` calls have finished (streams are recorded when
    they end, after the client has gone)."""

    def recorded() -> dict[str, float] | None:
        counts = rpc_counts(server, method)
        return counts if sum(counts.values()) >= calls else None

    return await until(
        recorded,
        10,
        f"{calls} {method} calls recorded",
        interval=0.02,
        detail=lambda: f"{method}: {rpc_counts(server, method)}",
    )
