from rallyrobopilot.v1 import game_pb2 as _game_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MapEvaluateRequest(_message.Message):
    __slots__ = ("tasks",)
    TASKS_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[_game_pb2.EvaluateRequest]
    def __init__(self, tasks: _Optional[_Iterable[_Union[_game_pb2.EvaluateRequest, _Mapping]]] = ...) -> None: ...

class MapEvaluateResponse(_message.Message):
    __slots__ = ("index", "response", "error")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    index: int
    response: _game_pb2.EvaluateResponse
    error: _game_pb2.TaskError
    def __init__(self, index: _Optional[int] = ..., response: _Optional[_Union[_game_pb2.EvaluateResponse, _Mapping]] = ..., error: _Optional[_Union[_game_pb2.TaskError, _Mapping]] = ...) -> None: ...

class GetPoolStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerStatus(_message.Message):
    __slots__ = ("address", "healthy", "capacity", "in_flight", "done", "failed")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    address: str
    healthy: bool
    capacity: int
    in_flight: int
    done: int
    failed: int
    def __init__(self, address: _Optional[str] = ..., healthy: _Optional[bool] = ..., capacity: _Optional[int] = ..., in_flight: _Optional[int] = ..., done: _Optional[int] = ..., failed: _Optional[int] = ...) -> None: ...

class GetPoolStatusResponse(_message.Message):
    __slots__ = ("servers", "in_flight", "pending", "done", "retried", "failed")
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    RETRIED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    servers: _containers.RepeatedCompositeFieldContainer[ServerStatus]
    in_flight: int
    pending: int
    done: int
    retried: int
    failed: int
    def __init__(self, servers: _Optional[_Iterable[_Union[ServerStatus, _Mapping]]] = ..., in_flight: _Optional[int] = ..., pending: _Optional[int] = ..., done: _Optional[int] = ..., retried: _Optional[int] = ..., failed: _Optional[int] = ...) -> None: ...
