from rallyrobopilot.v1 import collector_pb2 as _collector_pb2
from rallyrobopilot.v1 import lap_pb2 as _lap_pb2
from rallyrobopilot.v1 import sim_pb2 as _sim_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DriveMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DRIVE_MODE_UNSPECIFIED: _ClassVar[DriveMode]
    DRIVE_MODE_LOCKSTEP: _ClassVar[DriveMode]
    DRIVE_MODE_REALTIME: _ClassVar[DriveMode]
DRIVE_MODE_UNSPECIFIED: DriveMode
DRIVE_MODE_LOCKSTEP: DriveMode
DRIVE_MODE_REALTIME: DriveMode

class WatchSessionRequest(_message.Message):
    __slots__ = ("session_id", "max_rate_hz")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    max_rate_hz: int
    def __init__(self, session_id: _Optional[str] = ..., max_rate_hz: _Optional[int] = ...) -> None: ...

class WatchSessionResponse(_message.Message):
    __slots__ = ("session_id", "track", "state", "progress_fraction", "skipped_states")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TRACK_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FRACTION_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_STATES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    track: str
    state: _sim_pb2.SimState
    progress_fraction: float
    skipped_states: int
    def __init__(self, session_id: _Optional[str] = ..., track: _Optional[str] = ..., state: _Optional[_Union[_sim_pb2.SimState, _Mapping]] = ..., progress_fraction: _Optional[float] = ..., skipped_states: _Optional[int] = ...) -> None: ...

class VerifyLapRequest(_message.Message):
    __slots__ = ("record",)
    RECORD_FIELD_NUMBER: _ClassVar[int]
    record: _lap_pb2.LapRecord
    def __init__(self, record: _Optional[_Union[_lap_pb2.LapRecord, _Mapping]] = ...) -> None: ...

class VerifyLapResponse(_message.Message):
    __slots__ = ("verdict",)
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    verdict: _lap_pb2.LapVerdict
    def __init__(self, verdict: _Optional[_Union[_lap_pb2.LapVerdict, _Mapping]] = ...) -> None: ...

class EvaluateBatchRequest(_message.Message):
    __slots__ = ("tasks",)
    TASKS_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[EvaluateRequest]
    def __init__(self, tasks: _Optional[_Iterable[_Union[EvaluateRequest, _Mapping]]] = ...) -> None: ...

class TaskError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class EvaluateBatchItem(_message.Message):
    __slots__ = ("response", "error")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    response: EvaluateResponse
    error: TaskError
    def __init__(self, response: _Optional[_Union[EvaluateResponse, _Mapping]] = ..., error: _Optional[_Union[TaskError, _Mapping]] = ...) -> None: ...

class EvaluateBatchResponse(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[EvaluateBatchItem]
    def __init__(self, items: _Optional[_Iterable[_Union[EvaluateBatchItem, _Mapping]]] = ...) -> None: ...

class Perturbation(_message.Message):
    __slots__ = ("seed", "start_probability", "max_duration_ticks")
    SEED_FIELD_NUMBER: _ClassVar[int]
    START_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    MAX_DURATION_TICKS_FIELD_NUMBER: _ClassVar[int]
    seed: int
    start_probability: float
    max_duration_ticks: int
    def __init__(self, seed: _Optional[int] = ..., start_probability: _Optional[float] = ..., max_duration_ticks: _Optional[int] = ...) -> None: ...

class RecordRequest(_message.Message):
    __slots__ = ("run_id", "track", "start_state", "program", "driver", "max_ticks", "perturbation", "frame_options", "encoding", "jpeg_quality", "collector_address", "driver_id", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    TRACK_FIELD_NUMBER: _ClassVar[int]
    START_STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRAM_FIELD_NUMBER: _ClassVar[int]
    DRIVER_FIELD_NUMBER: _ClassVar[int]
    MAX_TICKS_FIELD_NUMBER: _ClassVar[int]
    PERTURBATION_FIELD_NUMBER: _ClassVar[int]
    FRAME_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    JPEG_QUALITY_FIELD_NUMBER: _ClassVar[int]
    COLLECTOR_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DRIVER_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    track: str
    start_state: _sim_pb2.SimState
    program: _sim_pb2.ControlProgram
    driver: _sim_pb2.DriverParams
    max_ticks: int
    perturbation: Perturbation
    frame_options: _sim_pb2.FrameOptions
    encoding: _collector_pb2.ImageEncoding
    jpeg_quality: int
    collector_address: str
    driver_id: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, run_id: _Optional[str] = ..., track: _Optional[str] = ..., start_state: _Optional[_Union[_sim_pb2.SimState, _Mapping]] = ..., program: _Optional[_Union[_sim_pb2.ControlProgram, _Mapping]] = ..., driver: _Optional[_Union[_sim_pb2.DriverParams, _Mapping]] = ..., max_ticks: _Optional[int] = ..., perturbation: _Optional[_Union[Perturbation, _Mapping]] = ..., frame_options: _Optional[_Union[_sim_pb2.FrameOptions, _Mapping]] = ..., encoding: _Optional[_Union[_collector_pb2.ImageEncoding, str]] = ..., jpeg_quality: _Optional[int] = ..., collector_address: _Optional[str] = ..., driver_id: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class RecordResponse(_message.Message):
    __slots__ = ("run_id", "frames", "result", "resent_frames", "perturbed_ticks")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    RESENT_FRAMES_FIELD_NUMBER: _ClassVar[int]
    PERTURBED_TICKS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    frames: int
    result: _sim_pb2.LapResult
    resent_frames: int
    perturbed_ticks: int
    def __init__(self, run_id: _Optional[str] = ..., frames: _Optional[int] = ..., result: _Optional[_Union[_sim_pb2.LapResult, _Mapping]] = ..., resent_frames: _Optional[int] = ..., perturbed_ticks: _Optional[int] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetServerInfoResponse(_message.Message):
    __slots__ = ("evaluate_slots", "evaluate_running", "max_sessions", "open_sessions", "version")
    EVALUATE_SLOTS_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_RUNNING_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    OPEN_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    evaluate_slots: int
    evaluate_running: int
    max_sessions: int
    open_sessions: int
    version: str
    def __init__(self, evaluate_slots: _Optional[int] = ..., evaluate_running: _Optional[int] = ..., max_sessions: _Optional[int] = ..., open_sessions: _Optional[int] = ..., version: _Optional[str] = ...) -> None: ...

class ListTracksRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTracksResponse(_message.Message):
    __slots__ = ("tracks",)
    TRACKS_FIELD_NUMBER: _ClassVar[int]
    tracks: _containers.RepeatedCompositeFieldContainer[_sim_pb2.TrackSummary]
    def __init__(self, tracks: _Optional[_Iterable[_Union[_sim_pb2.TrackSummary, _Mapping]]] = ...) -> None: ...

class GetTrackRequest(_message.Message):
    __slots__ = ("track",)
    TRACK_FIELD_NUMBER: _ClassVar[int]
    track: str
    def __init__(self, track: _Optional[str] = ...) -> None: ...

class GetTrackResponse(_message.Message):
    __slots__ = ("track",)
    TRACK_FIELD_NUMBER: _ClassVar[int]
    track: _sim_pb2.Track
    def __init__(self, track: _Optional[_Union[_sim_pb2.Track, _Mapping]] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("track", "frame_options")
    TRACK_FIELD_NUMBER: _ClassVar[int]
    FRAME_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    track: str
    frame_options: _sim_pb2.FrameOptions
    def __init__(self, track: _Optional[str] = ..., frame_options: _Optional[_Union[_sim_pb2.FrameOptions, _Mapping]] = ...) -> None: ...

class CreateSessionResponse(_message.Message):
    __slots__ = ("session_id", "observation", "idle_timeout_s")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OBSERVATION_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    observation: _sim_pb2.Observation
    idle_timeout_s: int
    def __init__(self, session_id: _Optional[str] = ..., observation: _Optional[_Union[_sim_pb2.Observation, _Mapping]] = ..., idle_timeout_s: _Optional[int] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResetRequest(_message.Message):
    __slots__ = ("session_id", "state", "with_frame")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    WITH_FRAME_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    state: _sim_pb2.SimState
    with_frame: bool
    def __init__(self, session_id: _Optional[str] = ..., state: _Optional[_Union[_sim_pb2.SimState, _Mapping]] = ..., with_frame: _Optional[bool] = ...) -> None: ...

class ResetResponse(_message.Message):
    __slots__ = ("observation",)
    OBSERVATION_FIELD_NUMBER: _ClassVar[int]
    observation: _sim_pb2.Observation
    def __init__(self, observation: _Optional[_Union[_sim_pb2.Observation, _Mapping]] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("session_id", "controls", "with_frame")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CONTROLS_FIELD_NUMBER: _ClassVar[int]
    WITH_FRAME_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    controls: _sim_pb2.ControlProgram
    with_frame: bool
    def __init__(self, session_id: _Optional[str] = ..., controls: _Optional[_Union[_sim_pb2.ControlProgram, _Mapping]] = ..., with_frame: _Optional[bool] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("observation",)
    OBSERVATION_FIELD_NUMBER: _ClassVar[int]
    observation: _sim_pb2.Observation
    def __init__(self, observation: _Optional[_Union[_sim_pb2.Observation, _Mapping]] = ...) -> None: ...

class DriveStart(_message.Message):
    __slots__ = ("session_id", "mode", "with_frames", "max_ticks")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    WITH_FRAMES_FIELD_NUMBER: _ClassVar[int]
    MAX_TICKS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    mode: DriveMode
    with_frames: bool
    max_ticks: int
    def __init__(self, session_id: _Optional[str] = ..., mode: _Optional[_Union[DriveMode, str]] = ..., with_frames: _Optional[bool] = ..., max_ticks: _Optional[int] = ...) -> None: ...

class DriveCommand(_message.Message):
    __slots__ = ("tick", "controls")
    TICK_FIELD_NUMBER: _ClassVar[int]
    CONTROLS_FIELD_NUMBER: _ClassVar[int]
    tick: int
    controls: _sim_pb2.Controls
    def __init__(self, tick: _Optional[int] = ..., controls: _Optional[_Union[_sim_pb2.Controls, _Mapping]] = ...) -> None: ...

class DriveRequest(_message.Message):
    __slots__ = ("start", "command")
    START_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    start: DriveStart
    command: DriveCommand
    def __init__(self, start: _Optional[_Union[DriveStart, _Mapping]] = ..., command: _Optional[_Union[DriveCommand, _Mapping]] = ...) -> None: ...

class DriveResponse(_message.Message):
    __slots__ = ("observation", "applied_tick", "late_commands", "missed_ticks", "applied_controls")
    OBSERVATION_FIELD_NUMBER: _ClassVar[int]
    APPLIED_TICK_FIELD_NUMBER: _ClassVar[int]
    LATE_COMMANDS_FIELD_NUMBER: _ClassVar[int]
    MISSED_TICKS_FIELD_NUMBER: _ClassVar[int]
    APPLIED_CONTROLS_FIELD_NUMBER: _ClassVar[int]
    observation: _sim_pb2.Observation
    applied_tick: int
    late_commands: int
    missed_ticks: int
    applied_controls: _sim_pb2.Controls
    def __init__(self, observation: _Optional[_Union[_sim_pb2.Observation, _Mapping]] = ..., applied_tick: _Optional[int] = ..., late_commands: _Optional[int] = ..., missed_ticks: _Optional[int] = ..., applied_controls: _Optional[_Union[_sim_pb2.Controls, _Mapping]] = ...) -> None: ...

class RaceStart(_message.Message):
    __slots__ = ("session_ids", "with_frames", "max_ticks")
    SESSION_IDS_FIELD_NUMBER: _ClassVar[int]
    WITH_FRAMES_FIELD_NUMBER: _ClassVar[int]
    MAX_TICKS_FIELD_NUMBER: _ClassVar[int]
    session_ids: _containers.RepeatedScalarFieldContainer[str]
    with_frames: bool
    max_ticks: int
    def __init__(self, session_ids: _Optional[_Iterable[str]] = ..., with_frames: _Optional[bool] = ..., max_ticks: _Optional[int] = ...) -> None: ...

class RaceCommand(_message.Message):
    __slots__ = ("car", "command")
    CAR_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    car: int
    command: DriveCommand
    def __init__(self, car: _Optional[int] = ..., command: _Optional[_Union[DriveCommand, _Mapping]] = ...) -> None: ...

class RaceCommands(_message.Message):
    __slots__ = ("commands", "leave")
    COMMANDS_FIELD_NUMBER: _ClassVar[int]
    LEAVE_FIELD_NUMBER: _ClassVar[int]
    commands: _containers.RepeatedCompositeFieldContainer[RaceCommand]
    leave: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, commands: _Optional[_Iterable[_Union[RaceCommand, _Mapping]]] = ..., leave: _Optional[_Iterable[int]] = ...) -> None: ...

class RaceRequest(_message.Message):
    __slots__ = ("start", "commands")
    START_FIELD_NUMBER: _ClassVar[int]
    COMMANDS_FIELD_NUMBER: _ClassVar[int]
    start: RaceStart
    commands: RaceCommands
    def __init__(self, start: _Optional[_Union[RaceStart, _Mapping]] = ..., commands: _Optional[_Union[RaceCommands, _Mapping]] = ...) -> None: ...

class RaceCar(_message.Message):
    __slots__ = ("car", "drive")
    CAR_FIELD_NUMBER: _ClassVar[int]
    DRIVE_FIELD_NUMBER: _ClassVar[int]
    car: int
    drive: DriveResponse
    def __init__(self, car: _Optional[int] = ..., drive: _Optional[_Union[DriveResponse, _Mapping]] = ...) -> None: ...

class RaceResponse(_message.Message):
    __slots__ = ("cars",)
    CARS_FIELD_NUMBER: _ClassVar[int]
    cars: _containers.RepeatedCompositeFieldContainer[RaceCar]
    def __init__(self, cars: _Optional[_Iterable[_Union[RaceCar, _Mapping]]] = ...) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("track", "start_state", "program", "driver", "finish_gate", "max_ticks", "return_trajectory")
    TRACK_FIELD_NUMBER: _ClassVar[int]
    START_STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRAM_FIELD_NUMBER: _ClassVar[int]
    DRIVER_FIELD_NUMBER: _ClassVar[int]
    FINISH_GATE_FIELD_NUMBER: _ClassVar[int]
    MAX_TICKS_FIELD_NUMBER: _ClassVar[int]
    RETURN_TRAJECTORY_FIELD_NUMBER: _ClassVar[int]
    track: str
    start_state: _sim_pb2.SimState
    program: _sim_pb2.ControlProgram
    driver: _sim_pb2.DriverParams
    finish_gate: _sim_pb2.Gate
    max_ticks: int
    return_trajectory: bool
    def __init__(self, track: _Optional[str] = ..., start_state: _Optional[_Union[_sim_pb2.SimState, _Mapping]] = ..., program: _Optional[_Union[_sim_pb2.ControlProgram, _Mapping]] = ..., driver: _Optional[_Union[_sim_pb2.DriverParams, _Mapping]] = ..., finish_gate: _Optional[_Union[_sim_pb2.Gate, _Mapping]] = ..., max_ticks: _Optional[int] = ..., return_trajectory: _Optional[bool] = ...) -> None: ...

class EvaluateResponse(_message.Message):
    __slots__ = ("result", "trajectory")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    TRAJECTORY_FIELD_NUMBER: _ClassVar[int]
    result: _sim_pb2.LapResult
    trajectory: _sim_pb2.Trajectory
    def __init__(self, result: _Optional[_Union[_sim_pb2.LapResult, _Mapping]] = ..., trajectory: _Optional[_Union[_sim_pb2.Trajectory, _Mapping]] = ...) -> None: ...
