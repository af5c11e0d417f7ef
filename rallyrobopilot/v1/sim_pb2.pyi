from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Vec2(_message.Message):
    __slots__ = ("x_m", "y_m")
    X_M_FIELD_NUMBER: _ClassVar[int]
    Y_M_FIELD_NUMBER: _ClassVar[int]
    x_m: float
    y_m: float
    def __init__(self, x_m: _Optional[float] = ..., y_m: _Optional[float] = ...) -> None: ...

class Gate(_message.Message):
    __slots__ = ("a", "b")
    A_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    a: Vec2
    b: Vec2
    def __init__(self, a: _Optional[_Union[Vec2, _Mapping]] = ..., b: _Optional[_Union[Vec2, _Mapping]] = ...) -> None: ...

class CarState(_message.Message):
    __slots__ = ("x_m", "y_m", "heading_rad", "speed_m_per_s")
    X_M_FIELD_NUMBER: _ClassVar[int]
    Y_M_FIELD_NUMBER: _ClassVar[int]
    HEADING_RAD_FIELD_NUMBER: _ClassVar[int]
    SPEED_M_PER_S_FIELD_NUMBER: _ClassVar[int]
    x_m: float
    y_m: float
    heading_rad: float
    speed_m_per_s: float
    def __init__(self, x_m: _Optional[float] = ..., y_m: _Optional[float] = ..., heading_rad: _Optional[float] = ..., speed_m_per_s: _Optional[float] = ...) -> None: ...

class LapState(_message.Message):
    __slots__ = ("next_checkpoint", "checkpoints_passed", "progress_m", "arc_m", "segment", "wall_contacts", "finished", "finish_tick")
    NEXT_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTS_PASSED_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_M_FIELD_NUMBER: _ClassVar[int]
    ARC_M_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    WALL_CONTACTS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_TICK_FIELD_NUMBER: _ClassVar[int]
    next_checkpoint: int
    checkpoints_passed: int
    progress_m: float
    arc_m: float
    segment: int
    wall_contacts: int
    finished: bool
    finish_tick: int
    def __init__(self, next_checkpoint: _Optional[int] = ..., checkpoints_passed: _Optional[int] = ..., progress_m: _Optional[float] = ..., arc_m: _Optional[float] = ..., segment: _Optional[int] = ..., wall_contacts: _Optional[int] = ..., finished: _Optional[bool] = ..., finish_tick: _Optional[int] = ...) -> None: ...

class SimState(_message.Message):
    __slots__ = ("tick", "car", "lap")
    TICK_FIELD_NUMBER: _ClassVar[int]
    CAR_FIELD_NUMBER: _ClassVar[int]
    LAP_FIELD_NUMBER: _ClassVar[int]
    tick: int
    car: CarState
    lap: LapState
    def __init__(self, tick: _Optional[int] = ..., car: _Optional[_Union[CarState, _Mapping]] = ..., lap: _Optional[_Union[LapState, _Mapping]] = ...) -> None: ...

class Controls(_message.Message):
    __slots__ = ("forward", "back", "left", "right")
    FORWARD_FIELD_NUMBER: _ClassVar[int]
    BACK_FIELD_NUMBER: _ClassVar[int]
    LEFT_FIELD_NUMBER: _ClassVar[int]
    RIGHT_FIELD_NUMBER: _ClassVar[int]
    forward: bool
    back: bool
    left: bool
    right: bool
    def __init__(self, forward: _Optional[bool] = ..., back: _Optional[bool] = ..., left: _Optional[bool] = ..., right: _Optional[bool] = ...) -> None: ...

class ControlProgram(_message.Message):
    __slots__ = ("masks",)
    MASKS_FIELD_NUMBER: _ClassVar[int]
    masks: bytes
    def __init__(self, masks: _Optional[bytes] = ...) -> None: ...

class DriverParams(_message.Message):
    __slots__ = ("kind", "params", "recovering")
    KIND_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    RECOVERING_FIELD_NUMBER: _ClassVar[int]
    kind: str
    params: _containers.RepeatedScalarFieldContainer[float]
    recovering: bool
    def __init__(self, kind: _Optional[str] = ..., params: _Optional[_Iterable[float]] = ..., recovering: _Optional[bool] = ...) -> None: ...

class TrackSummary(_message.Message):
    __slots__ = ("name", "description", "difficulty", "length_m")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    DIFFICULTY_FIELD_NUMBER: _ClassVar[int]
    LENGTH_M_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    difficulty: int
    length_m: float
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., difficulty: _Optional[int] = ..., length_m: _Optional[float] = ...) -> None: ...

class Track(_message.Message):
    __slots__ = ("name", "description", "centerline", "half_width_m", "left_wall", "right_wall", "start_line", "finish_line", "checkpoints", "base_state", "length_m", "difficulty")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CENTERLINE_FIELD_NUMBER: _ClassVar[int]
    HALF_WIDTH_M_FIELD_NUMBER: _ClassVar[int]
    LEFT_WALL_FIELD_NUMBER: _ClassVar[int]
    RIGHT_WALL_FIELD_NUMBER: _ClassVar[int]
    START_LINE_FIELD_NUMBER: _ClassVar[int]
    FINISH_LINE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    BASE_STATE_FIELD_NUMBER: _ClassVar[int]
    LENGTH_M_FIELD_NUMBER: _ClassVar[int]
    DIFFICULTY_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    centerline: _containers.RepeatedCompositeFieldContainer[Vec2]
    half_width_m: _containers.RepeatedScalarFieldContainer[float]
    left_wall: _containers.RepeatedCompositeFieldContainer[Vec2]
    right_wall: _containers.RepeatedCompositeFieldContainer[Vec2]
    start_line: Gate
    finish_line: Gate
    checkpoints: _containers.RepeatedCompositeFieldContainer[Gate]
    base_state: SimState
    length_m: float
    difficulty: int
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., centerline: _Optional[_Iterable[_Union[Vec2, _Mapping]]] = ..., half_width_m: _Optional[_Iterable[float]] = ..., left_wall: _Optional[_Iterable[_Union[Vec2, _Mapping]]] = ..., right_wall: _Optional[_Iterable[_Union[Vec2, _Mapping]]] = ..., start_line: _Optional[_Union[Gate, _Mapping]] = ..., finish_line: _Optional[_Union[Gate, _Mapping]] = ..., checkpoints: _Optional[_Iterable[_Union[Gate, _Mapping]]] = ..., base_state: _Optional[_Union[SimState, _Mapping]] = ..., length_m: _Optional[float] = ..., difficulty: _Optional[int] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("width_px", "height_px", "rgb")
    WIDTH_PX_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_PX_FIELD_NUMBER: _ClassVar[int]
    RGB_FIELD_NUMBER: _ClassVar[int]
    width_px: int
    height_px: int
    rgb: bytes
    def __init__(self, width_px: _Optional[int] = ..., height_px: _Optional[int] = ..., rgb: _Optional[bytes] = ...) -> None: ...

class FrameOptions(_message.Message):
    __slots__ = ("width_px", "height_px", "domain_randomization", "randomization_seed")
    WIDTH_PX_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_PX_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_RANDOMIZATION_FIELD_NUMBER: _ClassVar[int]
    RANDOMIZATION_SEED_FIELD_NUMBER: _ClassVar[int]
    width_px: int
    height_px: int
    domain_randomization: bool
    randomization_seed: int
    def __init__(self, width_px: _Optional[int] = ..., height_px: _Optional[int] = ..., domain_randomization: _Optional[bool] = ..., randomization_seed: _Optional[int] = ...) -> None: ...

class Observation(_message.Message):
    __slots__ = ("state", "rays_m", "progress_fraction", "wall_contact", "lap_ticks", "frame")
    STATE_FIELD_NUMBER: _ClassVar[int]
    RAYS_M_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FRACTION_FIELD_NUMBER: _ClassVar[int]
    WALL_CONTACT_FIELD_NUMBER: _ClassVar[int]
    LAP_TICKS_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    state: SimState
    rays_m: _containers.RepeatedScalarFieldContainer[float]
    progress_fraction: float
    wall_contact: bool
    lap_ticks: int
    frame: Frame
    def __init__(self, state: _Optional[_Union[SimState, _Mapping]] = ..., rays_m: _Optional[_Iterable[float]] = ..., progress_fraction: _Optional[float] = ..., wall_contact: _Optional[bool] = ..., lap_ticks: _Optional[int] = ..., frame: _Optional[_Union[Frame, _Mapping]] = ...) -> None: ...

class LapResult(_message.Message):
    __slots__ = ("finished", "lap_ticks", "lap_time_s", "progress_m", "progress_fraction", "checkpoints_passed", "wall_contacts", "ticks", "final_state")
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    LAP_TICKS_FIELD_NUMBER: _ClassVar[int]
    LAP_TIME_S_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_M_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FRACTION_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTS_PASSED_FIELD_NUMBER: _ClassVar[int]
    WALL_CONTACTS_FIELD_NUMBER: _ClassVar[int]
    TICKS_FIELD_NUMBER: _ClassVar[int]
    FINAL_STATE_FIELD_NUMBER: _ClassVar[int]
    finished: bool
    lap_ticks: int
    lap_time_s: float
    progress_m: float
    progress_fraction: float
    checkpoints_passed: int
    wall_contacts: int
    ticks: int
    final_state: SimState
    def __init__(self, finished: _Optional[bool] = ..., lap_ticks: _Optional[int] = ..., lap_time_s: _Optional[float] = ..., progress_m: _Optional[float] = ..., progress_fraction: _Optional[float] = ..., checkpoints_passed: _Optional[int] = ..., wall_contacts: _Optional[int] = ..., ticks: _Optional[int] = ..., final_state: _Optional[_Union[SimState, _Mapping]] = ...) -> None: ...

class Trajectory(_message.Message):
    __slots__ = ("x_m", "y_m", "heading_rad", "speed_m_per_s", "wall_contact_ticks")
    X_M_FIELD_NUMBER: _ClassVar[int]
    Y_M_FIELD_NUMBER: _ClassVar[int]
    HEADING_RAD_FIELD_NUMBER: _ClassVar[int]
    SPEED_M_PER_S_FIELD_NUMBER: _ClassVar[int]
    WALL_CONTACT_TICKS_FIELD_NUMBER: _ClassVar[int]
    x_m: _containers.RepeatedScalarFieldContainer[float]
    y_m: _containers.RepeatedScalarFieldContainer[float]
    heading_rad: _containers.RepeatedScalarFieldContainer[float]
    speed_m_per_s: _containers.RepeatedScalarFieldContainer[float]
    wall_contact_ticks: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, x_m: _Optional[_Iterable[float]] = ..., y_m: _Optional[_Iterable[float]] = ..., heading_rad: _Optional[_Iterable[float]] = ..., speed_m_per_s: _Optional[_Iterable[float]] = ..., wall_contact_ticks: _Optional[_Iterable[int]] = ...) -> None: ...
