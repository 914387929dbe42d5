import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.rpc import status_pb2 as _status_pb2
from service.pb.seqserve.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CreateSessionRequest(_message.Message):
    __slots__ = ("model", "version", "seed", "ttl", "default_sampling", "prefix", "options", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    seed: int
    ttl: _duration_pb2.Duration
    default_sampling: _types_pb2.Sampling
    prefix: _types_pb2.Input
    options: _types_pb2.PredictionOptions
    request_id: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., seed: _Optional[int] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., default_sampling: _Optional[_Union[_types_pb2.Sampling, _Mapping]] = ..., prefix: _Optional[_Union[_types_pb2.Input, _Mapping]] = ..., options: _Optional[_Union[_types_pb2.PredictionOptions, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class CreateSessionResponse(_message.Message):
    __slots__ = ("session", "prediction", "per_position")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    PER_POSITION_FIELD_NUMBER: _ClassVar[int]
    session: _types_pb2.Session
    prediction: _types_pb2.Prediction
    per_position: _containers.RepeatedCompositeFieldContainer[_types_pb2.Prediction]
    def __init__(self, session: _Optional[_Union[_types_pb2.Session, _Mapping]] = ..., prediction: _Optional[_Union[_types_pb2.Prediction, _Mapping]] = ..., per_position: _Optional[_Iterable[_Union[_types_pb2.Prediction, _Mapping]]] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class GetSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: _types_pb2.Session
    def __init__(self, session: _Optional[_Union[_types_pb2.Session, _Mapping]] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: _types_pb2.Session
    def __init__(self, session: _Optional[_Union[_types_pb2.Session, _Mapping]] = ...) -> None: ...

class ForkSessionRequest(_message.Message):
    __slots__ = ("session_id", "ttl", "seed", "request_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    ttl: _duration_pb2.Duration
    seed: int
    request_id: str
    def __init__(self, session_id: _Optional[str] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., seed: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class ForkSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: _types_pb2.Session
    def __init__(self, session: _Optional[_Union[_types_pb2.Session, _Mapping]] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("session_id", "request_id", "input", "options", "expected_position")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_POSITION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    request_id: str
    input: _types_pb2.Input
    options: _types_pb2.PredictionOptions
    expected_position: int
    def __init__(self, session_id: _Optional[str] = ..., request_id: _Optional[str] = ..., input: _Optional[_Union[_types_pb2.Input, _Mapping]] = ..., options: _Optional[_Union[_types_pb2.PredictionOptions, _Mapping]] = ..., expected_position: _Optional[int] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("session_id", "request_id", "position", "prediction", "per_position")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    PER_POSITION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    request_id: str
    position: int
    prediction: _types_pb2.Prediction
    per_position: _containers.RepeatedCompositeFieldContainer[_types_pb2.Prediction]
    def __init__(self, session_id: _Optional[str] = ..., request_id: _Optional[str] = ..., position: _Optional[int] = ..., prediction: _Optional[_Union[_types_pb2.Prediction, _Mapping]] = ..., per_position: _Optional[_Iterable[_Union[_types_pb2.Prediction, _Mapping]]] = ...) -> None: ...

class StreamItem(_message.Message):
    __slots__ = ("session_id", "request_id", "input", "generate", "options", "expected_position")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    GENERATE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_POSITION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    request_id: str
    input: _types_pb2.Input
    generate: _types_pb2.GenerateSpec
    options: _types_pb2.PredictionOptions
    expected_position: int
    def __init__(self, session_id: _Optional[str] = ..., request_id: _Optional[str] = ..., input: _Optional[_Union[_types_pb2.Input, _Mapping]] = ..., generate: _Optional[_Union[_types_pb2.GenerateSpec, _Mapping]] = ..., options: _Optional[_Union[_types_pb2.PredictionOptions, _Mapping]] = ..., expected_position: _Optional[int] = ...) -> None: ...

class StreamRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[StreamItem]
    def __init__(self, items: _Optional[_Iterable[_Union[StreamItem, _Mapping]]] = ...) -> None: ...

class StreamReply(_message.Message):
    __slots__ = ("session_id", "request_id", "position", "prediction", "per_position", "token", "error")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    PER_POSITION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    request_id: str
    position: int
    prediction: _types_pb2.Prediction
    per_position: _containers.RepeatedCompositeFieldContainer[_types_pb2.Prediction]
    token: _types_pb2.GeneratedToken
    error: _status_pb2.Status
    def __init__(self, session_id: _Optional[str] = ..., request_id: _Optional[str] = ..., position: _Optional[int] = ..., prediction: _Optional[_Union[_types_pb2.Prediction, _Mapping]] = ..., per_position: _Optional[_Iterable[_Union[_types_pb2.Prediction, _Mapping]]] = ..., token: _Optional[_Union[_types_pb2.GeneratedToken, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...

class StreamResponse(_message.Message):
    __slots__ = ("replies",)
    REPLIES_FIELD_NUMBER: _ClassVar[int]
    replies: _containers.RepeatedCompositeFieldContainer[StreamReply]
    def __init__(self, replies: _Optional[_Iterable[_Union[StreamReply, _Mapping]]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("session_id", "prompt", "sampling", "request_id", "expected_position")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_POSITION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    prompt: _types_pb2.Input
    sampling: _types_pb2.Sampling
    request_id: str
    expected_position: int
    def __init__(self, session_id: _Optional[str] = ..., prompt: _Optional[_Union[_types_pb2.Input, _Mapping]] = ..., sampling: _Optional[_Union[_types_pb2.Sampling, _Mapping]] = ..., request_id: _Optional[str] = ..., expected_position: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("session_id", "position", "token")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    position: int
    token: _types_pb2.GeneratedToken
    def __init__(self, session_id: _Optional[str] = ..., position: _Optional[int] = ..., token: _Optional[_Union[_types_pb2.GeneratedToken, _Mapping]] = ...) -> None: ...
