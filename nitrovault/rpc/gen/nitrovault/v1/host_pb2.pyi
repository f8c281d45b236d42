import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CredentialsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Credentials(_message.Message):
    __slots__ = ("access_key_id", "secret_access_key", "session_token", "expiration", "region")
    ACCESS_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SECRET_ACCESS_KEY_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRATION_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    access_key_id: str
    secret_access_key: str
    session_token: str
    expiration: _timestamp_pb2.Timestamp
    region: str
    def __init__(self, access_key_id: _Optional[str] = ..., secret_access_key: _Optional[str] = ..., session_token: _Optional[str] = ..., expiration: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., region: _Optional[str] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("model_id", "offset", "length")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    offset: int
    length: int
    def __init__(self, model_id: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("data", "offset", "total_size")
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    offset: int
    total_size: int
    def __init__(self, data: _Optional[bytes] = ..., offset: _Optional[int] = ..., total_size: _Optional[int] = ...) -> None: ...

class StatusReport(_message.Message):
    __slots__ = ("state", "reason", "step", "enclave_cid")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[StatusReport.State]
        BOOTING: _ClassVar[StatusReport.State]
        SERVING: _ClassVar[StatusReport.State]
        FAILED: _ClassVar[StatusReport.State]
        DEGRADED: _ClassVar[StatusReport.State]
        DRAINING: _ClassVar[StatusReport.State]
        STOPPED: _ClassVar[StatusReport.State]
    STATE_UNSPECIFIED: StatusReport.State
    BOOTING: StatusReport.State
    SERVING: StatusReport.State
    FAILED: StatusReport.State
    DEGRADED: StatusReport.State
    DRAINING: StatusReport.State
    STOPPED: StatusReport.State
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ENCLAVE_CID_FIELD_NUMBER: _ClassVar[int]
    state: StatusReport.State
    reason: str
    step: str
    enclave_cid: int
    def __init__(self, state: _Optional[_Union[StatusReport.State, str]] = ..., reason: _Optional[str] = ..., step: _Optional[str] = ..., enclave_cid: _Optional[int] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AuditBatch(_message.Message):
    __slots__ = ("boot_id", "lines", "enclave_cid")
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    ENCLAVE_CID_FIELD_NUMBER: _ClassVar[int]
    boot_id: str
    lines: _containers.RepeatedScalarFieldContainer[bytes]
    enclave_cid: int
    def __init__(self, boot_id: _Optional[str] = ..., lines: _Optional[_Iterable[bytes]] = ..., enclave_cid: _Optional[int] = ...) -> None: ...

class Label(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: str
    def __init__(self, name: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class CounterSample(_message.Message):
    __slots__ = ("name", "labels", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    labels: _containers.RepeatedCompositeFieldContainer[Label]
    value: float
    def __init__(self, name: _Optional[str] = ..., labels: _Optional[_Iterable[_Union[Label, _Mapping]]] = ..., value: _Optional[float] = ...) -> None: ...

class GaugeSample(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: float
    def __init__(self, name: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...

class HistogramSample(_message.Message):
    __slots__ = ("name", "labels", "bounds", "counts", "sum", "count")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    BOUNDS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    SUM_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    name: str
    labels: _containers.RepeatedCompositeFieldContainer[Label]
    bounds: _containers.RepeatedScalarFieldContainer[float]
    counts: _containers.RepeatedScalarFieldContainer[int]
    sum: float
    count: int
    def __init__(self, name: _Optional[str] = ..., labels: _Optional[_Iterable[_Union[Label, _Mapping]]] = ..., bounds: _Optional[_Iterable[float]] = ..., counts: _Optional[_Iterable[int]] = ..., sum: _Optional[float] = ..., count: _Optional[int] = ...) -> None: ...

class MetricsReport(_message.Message):
    __slots__ = ("boot_id", "enclave_cid", "counters", "histograms", "gauges")
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    ENCLAVE_CID_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    HISTOGRAMS_FIELD_NUMBER: _ClassVar[int]
    GAUGES_FIELD_NUMBER: _ClassVar[int]
    boot_id: str
    enclave_cid: int
    counters: _containers.RepeatedCompositeFieldContainer[CounterSample]
    histograms: _containers.RepeatedCompositeFieldContainer[HistogramSample]
    gauges: _containers.RepeatedCompositeFieldContainer[GaugeSample]
    def __init__(self, boot_id: _Optional[str] = ..., enclave_cid: _Optional[int] = ..., counters: _Optional[_Iterable[_Union[CounterSample, _Mapping]]] = ..., histograms: _Optional[_Iterable[_Union[HistogramSample, _Mapping]]] = ..., gauges: _Optional[_Iterable[_Union[GaugeSample, _Mapping]]] = ...) -> None: ...

class ControlRequest(_message.Message):
    __slots__ = ("enclave_cid",)
    ENCLAVE_CID_FIELD_NUMBER: _ClassVar[int]
    enclave_cid: int
    def __init__(self, enclave_cid: _Optional[int] = ...) -> None: ...

class ControlCommand(_message.Message):
    __slots__ = ("kind", "deadline_s")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[ControlCommand.Kind]
        DRAIN: _ClassVar[ControlCommand.Kind]
    KIND_UNSPECIFIED: ControlCommand.Kind
    DRAIN: ControlCommand.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    kind: ControlCommand.Kind
    deadline_s: float
    def __init__(self, kind: _Optional[_Union[ControlCommand.Kind, str]] = ..., deadline_s: _Optional[float] = ...) -> None: ...
