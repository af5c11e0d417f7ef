from rallyrobopilot.v1 import sim_pb2 as _sim_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LapRefusal(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LAP_REFUSAL_UNSPECIFIED: _ClassVar[LapRefusal]
    LAP_REFUSAL_UNKNOWN_TRACK: _ClassVar[LapRefusal]
    LAP_REFUSAL_IMPOSSIBLE_START: _ClassVar[LapRefusal]
    LAP_REFUSAL_NOT_FINISHED: _ClassVar[LapRefusal]
    LAP_REFUSAL_KEYS_PAST_FINISH: _ClassVar[LapRefusal]
    LAP_REFUSAL_LAP_TICKS_MISMATCH: _ClassVar[LapRefusal]
    LAP_REFUSAL_WALL_CONTACTS_MISMATCH: _ClassVar[LapRefusal]
    LAP_REFUSAL_FINAL_STATE_MISMATCH: _ClassVar[LapRefusal]
LAP_REFUSAL_UNSPECIFIED: LapRefusal
LAP_REFUSAL_UNKNOWN_TRACK: LapRefusal
LAP_REFUSAL_IMPOSSIBLE_START: LapRefusal
LAP_REFUSAL_NOT_FINISHED: LapRefusal
LAP_REFUSAL_KEYS_PAST_FINISH: LapRefusal
LAP_REFUSAL_LAP_TICKS_MISMATCH: LapRefusal
LAP_REFUSAL_WALL_CONTACTS_MISMATCH: LapRefusal
LAP_REFUSAL_FINAL_STATE_MISMATCH: LapRefusal

class LapRecord(_message.Message):
    __slots__ = ("track", "start_state", "keys", "claimed_lap_ticks", "claimed_wall_contacts", "claimed_final_state", "model_version", "driver_id", "data_source", "driven_at")
    TRACK_FIELD_NUMBER: _ClassVar[int]
    START_STATE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    CLAIMED_LAP_TICKS_FIELD_NUMBER: _ClassVar[int]
    CLAIMED_WALL_CONTACTS_FIELD_NUMBER: _ClassVar[int]
    CLAIMED_FINAL_STATE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DRIVER_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_SOURCE_FIELD_NUMBER: _ClassVar[int]
    DRIVEN_AT_FIELD_NUMBER: _ClassVar[int]
    track: str
    start_state: _sim_pb2.SimState
    keys: bytes
    claimed_lap_ticks: int
    claimed_wall_contacts: int
    claimed_final_state: _sim_pb2.SimState
    model_version: str
    driver_id: str
    data_source: str
    driven_at: str
    def __init__(self, track: _Optional[str] = ..., start_state: _Optional[_Union[_sim_pb2.SimState, _Mapping]] = ..., keys: _Optional[bytes] = ..., claimed_lap_ticks: _Optional[int] = ..., claimed_wall_contacts: _Optional[int] = ..., claimed_final_state: _Optional[_Union[_sim_pb2.SimState, _Mapping]] = ..., model_version: _Optional[str] = ..., driver_id: _Optional[str] = ..., data_source: _Optional[str] = ..., driven_at: _Optional[str] = ...) -> None: ...

class LapVerdict(_message.Message):
    __slots__ = ("verified", "refusal", "reason", "replayed", "record_id")
    VERIFIED_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    verified: bool
    refusal: LapRefusal
    reason: str
    replayed: _sim_pb2.LapResult
    record_id: str
    def __init__(self, verified: _Optional[bool] = ..., refusal: _Optional[_Union[LapRefusal, str]] = ..., reason: _Optional[str] = ..., replayed: _Optional[_Union[_sim_pb2.LapResult, _Mapping]] = ..., record_id: _Optional[str] = ...) -> None: ...
