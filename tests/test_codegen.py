"""The seqserve.v1 protos: lint-clean, committed generated code up to date, and usable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from service import codegen

BUF = Path(sys.executable).parent / "buf"


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_committed_gen_matches_protos(tmp_path: Path) -> None:
    codegen.generate(tmp_path / "gen")
    fresh, committed = _tree(tmp_path / "gen"), _tree(codegen.DEFAULT_OUT)
    assert sorted(fresh) == sorted(committed), "run `python -m service.codegen`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated files {stale}: run `python -m service.codegen`"


def test_buf_lint_is_clean() -> None:
    assert BUF.is_file(), f"buf CLI not found at {BUF} (pip install buf-bin)"
    result = subprocess.run(
        [str(BUF), "lint"], cwd=codegen.PROTO_ROOT, capture_output=True, text=True, timeout=60
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0 and not report.strip(), report


def test_generated_modules_import_and_name_services() -> None:
    from service.pb import SERVICE_NAMES
    from service.pb.seqserve.v1 import model_registry_pb2_grpc, session_service_pb2_grpc

    assert SERVICE_NAMES == ("seqserve.v1.ModelRegistry", "seqserve.v1.SessionService")
    assert hasattr(session_service_pb2_grpc, "SessionServiceServicer")
    assert hasattr(model_registry_pb2_grpc, "ModelRegistryServicer")


def test_stream_request_round_trip() -> None:
    from service.pb.seqserve.v1 import session_service_pb2 as ss
    from service.pb.seqserve.v1 import types_pb2 as t

    request = ss.StreamRequest(
        items=[
            ss.StreamItem(
                session_id="s-1",
                request_id="r-1",
                input=t.Input(tokens=t.Tokens(ids=[72, 105])),
                options=t.PredictionOptions(top_k=3, per_position=True),
            ),
            ss.StreamItem(
                session_id="s-2",
                request_id="r-2",
                input=t.Input(text="hi"),
                generate=t.GenerateSpec(
                    sampling=t.Sampling(temperature=0.0, max_tokens=8, stop_strings=["\n"])
                ),
            ),
        ]
    )
    parsed = ss.StreamRequest.FromString(request.SerializeToString())
    assert parsed == request
    first, second = parsed.items
    assert (first.session_id, first.request_id) == ("s-1", "r-1")
    assert first.input.WhichOneof("kind") == "tokens"
    assert list(first.input.tokens.ids) == [72, 105]
    assert not first.HasField("generate")
    assert second.input.WhichOneof("kind") == "text"
    sampling = second.generate.sampling
    # temperature 0 (greedy) must stay distinguishable from "unset" (inherit the default).
    assert sampling.HasField("temperature") and sampling.temperature == 0.0
    assert not sampling.HasField("top_p")


def test_stream_reply_carries_in_band_error_and_finish_reason() -> None:
    from google.rpc import code_pb2, status_pb2

    from service.pb.seqserve.v1 import session_service_pb2 as ss
    from service.pb.seqserve.v1 import types_pb2 as t

    response = ss.StreamResponse(
        replies=[
            ss.StreamReply(
                session_id="s-1",
                request_id="r-1",
                position=5,
                token=t.GeneratedToken(id=10, text="\n", finish_reason=t.FINISH_REASON_STOP_STRING),
            ),
            ss.StreamReply(
                session_id="s-9",
                request_id="r-2",
                error=status_pb2.Status(code=code_pb2.NOT_FOUND, message="unknown session"),
            ),
        ]
    )
    parsed = ss.StreamResponse.FromString(response.SerializeToString())
    done, failed = parsed.replies
    assert done.token.finish_reason == t.FINISH_REASON_STOP_STRING
    assert not done.HasField("error")
    assert failed.error.code == code_pb2.NOT_FOUND
    assert not failed.HasField("token") and not failed.HasField("prediction")
