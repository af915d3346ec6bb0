from moe.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Segment(_message.Message):
    __slots__ = ("layer", "expert", "rows")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert: int
    rows: int
    def __init__(self, layer: _Optional[int] = ..., expert: _Optional[int] = ..., rows: _Optional[int] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("hidden", "segments", "session", "rows", "pad")
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    PAD_FIELD_NUMBER: _ClassVar[int]
    hidden: _common_pb2.Tensor
    segments: _containers.RepeatedCompositeFieldContainer[Segment]
    session: str
    rows: int
    pad: bytes
    def __init__(self, hidden: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., segments: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ..., session: _Optional[str] = ..., rows: _Optional[int] = ..., pad: _Optional[bytes] = ...) -> None: ...

class ForwardReply(_message.Message):
    __slots__ = ("output", "pad")
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    PAD_FIELD_NUMBER: _ClassVar[int]
    output: _common_pb2.Tensor
    pad: bytes
    def __init__(self, output: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., pad: _Optional[bytes] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class AttachRequest(_message.Message):
    __slots__ = ("kind", "dtype", "capacity_rows", "hidden_size", "names", "handles", "events", "device_uuid")
    KIND_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_ROWS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    HANDLES_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    kind: str
    dtype: str
    capacity_rows: int
    hidden_size: int
    names: _containers.RepeatedScalarFieldContainer[str]
    handles: _containers.RepeatedScalarFieldContainer[bytes]
    events: _containers.RepeatedScalarFieldContainer[bytes]
    device_uuid: str
    def __init__(self, kind: _Optional[str] = ..., dtype: _Optional[str] = ..., capacity_rows: _Optional[int] = ..., hidden_size: _Optional[int] = ..., names: _Optional[_Iterable[str]] = ..., handles: _Optional[_Iterable[bytes]] = ..., events: _Optional[_Iterable[bytes]] = ..., device_uuid: _Optional[str] = ...) -> None: ...

class AttachReply(_message.Message):
    __slots__ = ("session", "doorbell")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    DOORBELL_FIELD_NUMBER: _ClassVar[int]
    session: str
    doorbell: str
    def __init__(self, session: _Optional[str] = ..., doorbell: _Optional[str] = ...) -> None: ...

class DetachRequest(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: str
    def __init__(self, session: _Optional[str] = ...) -> None: ...

class DetachReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoReply(_message.Message):
    __slots__ = ("served", "hidden_size", "dtype", "device", "calls", "rows", "in_flight", "doorbell")
    SERVED_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    DOORBELL_FIELD_NUMBER: _ClassVar[int]
    served: _containers.RepeatedCompositeFieldContainer[_common_pb2.ExpertKey]
    hidden_size: int
    dtype: str
    device: str
    calls: int
    rows: int
    in_flight: int
    doorbell: str
    def __init__(self, served: _Optional[_Iterable[_Union[_common_pb2.ExpertKey, _Mapping]]] = ..., hidden_size: _Optional[int] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., calls: _Optional[int] = ..., rows: _Optional[int] = ..., in_flight: _Optional[int] = ..., doorbell: _Optional[str] = ...) -> None: ...
