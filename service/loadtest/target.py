"""The server under test: the one channel to it, and what its model takes as input.

The load generator talks to `config.target` and nothing else. The channel ignores proxy
settings in the environment (`http_proxy`, `grpc_proxy`, ...), which would otherwise route
every call through another host, and skips DNS service-config lookups.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

import grpc

from service.client.credentials import Credentials
from service.errors import quote
from service.pb.seqserve.v1 import model_registry_pb2 as reg_pb
from service.pb.seqserve.v1 import model_registry_pb2_grpc as reg_grpc
from service.pb.seqserve.v1 import types_pb2 as types
from service.registry.version_spec import LATEST, VersionNumberTooLong, version_number

_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# Every channel of a load test has these, the client's (`--client-mux`) included.
CONNECT_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.enable_http_proxy", 0),  # only ever connect to the target itself
    ("grpc.service_config_disable_resolution", 1),  # no DNS TXT lookups for service config
)
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    *CONNECT_OPTIONS,
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.use_local_subchannel_pool", 1),  # each channel gets its own connection
)


def open_channel(target: str, credentials: Credentials | None = None) -> grpc.aio.Channel:
    return (credentials or Credentials.from_env()).channel(target, CHANNEL_OPTIONS)


_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def status_name(code: int) -> str:
    """google.rpc.Status code number → gRPC status name (e.g. 5 → NOT_FOUND)."""
    return _CODE_NAMES.get(code, f"CODE_{code}")


class TargetError(Exception):
    """The target cannot be load-tested as asked (unreachable, unknown model, wrong kind)."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: int
    input_kind: str  # "tokens" or "features"
    input_size: int  # vocabulary size (tokens) or frame width (features)

    def random_input(self, rng: random.Random, n: int) -> types.Input:
        """n random tokens, or n random feature frames."""
        if self.input_kind == "tokens":
            return types.Input(
                tokens=types.Tokens(ids=[rng.randrange(self.input_size) for _ in range(n)])
            )
        return types.Input(
            frames=types.Frames(values=[rng.gauss(0.0, 1.0) for _ in range(n * self.input_size)])
        )


async def fetch_model_info(channel: grpc.aio.Channel, model: str, version: str) -> ModelInfo:
    """Resolve `version` ("" / "latest" / number / alias) as the server does for a new session
    (`VersionRule.version_for`: the store's resolution, "latest" skipping a refused version),
    from what `GetModel` tells."""
    detail = (
        await reg_grpc.ModelRegistryStub(channel).GetModel(reg_pb.GetModelRequest(name=model))
    ).model
    wanted = version.strip()
    try:
        number = version_number(wanted)
    except VersionNumberTooLong as exc:
        raise TargetError(f"model {model!r} has no version {quote(wanted)} ({exc})") from None
    if number is not None:
        resolved = number
    elif wanted == "":
        resolved = detail.default_version  # the server's own resolution of ""
    elif wanted == LATEST:
        ok = [v.version for v in detail.versions if v.status == reg_pb.VERSION_STATUS_OK]
        resolved = max(ok, default=0)
    elif wanted in detail.aliases:
        resolved = detail.aliases[wanted]
    else:
        raise TargetError(f"model {model!r} has no alias {wanted!r}")
    if resolved == 0:  # "" or "latest", and every version refused
        raise TargetError(f"model {model!r} has no usable version")
    for entry in detail.versions:
        if entry.version == resolved:
            manifest = json.loads(entry.manifest_json or "{}")
            break
    else:
        raise TargetError(f"model {model!r} has no version {resolved}")
    spec = manifest.get("input", {})
    kind = spec.get("kind")
    if kind == "tokens":
        size = int(spec["vocab_size"])
    elif kind == "features":
        size = int(spec["dim"])
    else:
        raise TargetError(f"model {model!r} v{resolved}: manifest names no usable input kind")
    return ModelInfo(name=model, version=resolved, input_kind=kind, input_size=size)
