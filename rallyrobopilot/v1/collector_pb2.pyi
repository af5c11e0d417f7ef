from rallyrobopilot.v1 import sim_pb2 as _sim_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ImageEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_ENCODING_UNSPECIFIED: _ClassVar[ImageEncoding]
    IMAGE_ENCODING_RAW_RGB: _ClassVar[ImageEncoding]
    IMAGE_ENCODING_PNG: _ClassVar[ImageEncoding]
    IMAGE_ENCODING_JPEG: _ClassVar[ImageEncoding]

class RunSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_SOURCE_UNSPECIFIED: _ClassVar[RunSource]
    RUN_SOURCE_DRIVER: _ClassVar[RunSource]
    RUN_SOURCE_HUMAN: _ClassVar[RunSource]
    RUN_SOURCE_DAGGER: _ClassVar[RunSource]
IMAGE_ENCODING_UNSPECIFIED: ImageEncoding
IMAGE_ENCODING_RAW_RGB: ImageEncoding
IMAGE_ENCODING_PNG: ImageEncoding
IMAGE_ENCODING_JPEG: ImageEncoding
RUN_SOURCE_UNSPECIFIED: RunSource
RUN_SOURCE_DRIVER: RunSource
RUN_SOURCE_HUMAN: RunSource
RUN_SOURCE_DAGGER: RunSource

class RunStart(_message.Message):
    __slots__ = ("run_id", "track", "source", "driver_id", "width_px", "height_px", "encoding", "jpeg_quality", "perturbation_seed", "randomization_seed", "domain_randomization", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    TRACK_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DRIVER_ID_FIELD_NUMBER: _ClassVar[int]
    WIDTH_PX_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_PX_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    JPEG_QUALITY_FIELD_NUMBER: _ClassVar[int]
    PERTURBATION_SEED_FIELD_NUMBER: _ClassVar[int]
    RANDOMIZATION_SEED_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_RANDOMIZATION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    track: str
    source: RunSource
    driver_id: str
    width_px: int
    height_px: int
    encoding: ImageEncoding
    jpeg_quality: int
    perturbation_seed: int
    randomization_seed: int
    domain_randomization: bool
    labels: _containers.ScalarMap[str, str]
    def __init__(self, run_id: _Optional[str] = ..., track: _Optional[str] = ..., source: _Optional[_Union[RunSource, str]] = ..., driver_id: _Optional[str] = ..., width_px: _Optional[int] = ..., height_px: _Optional[int] = ..., encoding: _Optional[_Union[ImageEncoding, str]] = ..., jpeg_quality: _Optional[int] = ..., perturbation_seed: _Optional[int] = ..., randomization_seed: _Optional[int] = ..., domain_randomization: _Optional[bool] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class FrameRecord(_message.Message):
    __slots__ = ("run_id", "tick", "image", "applied_mask", "label_mask", "state", "rays_m", "progress_fraction", "wall_contact")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    TICK_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    APPLIED_MASK_FIELD_NUMBER: _ClassVar[int]
    LABEL_MASK_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RAYS_M_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FRACTION_FIELD_NUMBER: _ClassVar[int]
    WALL_CONTACT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    tick: int
    image: bytes
    applied_mask: int
    label_mask: int
    state: _sim_pb2.SimState
    rays_m: _containers.RepeatedScalarFieldContainer[float]
    progress_fraction: float
    wall_contact: bool
    def __init__(self, run_id: _Optional[str] = ..., tick: _Optional[int] = ..., image: _Optional[bytes] = ..., applied_mask: _Optional[int] = ..., label_mask: _Optional[int] = ..., state: _Optional[_Union[_sim_pb2.SimState, _Mapping]] = ..., rays_m: _Optional[_Iterable[float]] = ..., progress_fraction: _Optional[float] = ..., wall_contact: _Optional[bool] = ...) -> None: ...

class RunEnd(_message.Message):
    __slots__ = ("run_id", "frames", "finished", "lap_ticks")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    LAP_TICKS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    frames: int
    finished: bool
    lap_ticks: int
    def __init__(self, run_id: _Optional[str] = ..., frames: _Optional[int] = ..., finished: _Optional[bool] = ..., lap_ticks: _Optional[int] = ...) -> None: ...

class IngestRequest(_message.Message):
    __slots__ = ("start", "frame", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: RunStart
    frame: FrameRecord
    end: RunEnd
    def __init__(self, start: _Optional[_Union[RunStart, _Mapping]] = ..., frame: _Optional[_Union[FrameRecord, _Mapping]] = ..., end: _Optional[_Union[RunEnd, _Mapping]] = ...) -> None: ...

class IngestResponse(_message.Message):
    __slots__ = ("run_id", "acked_through_tick", "stored_frames", "duplicates", "ended")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ACKED_THROUGH_TICK_FIELD_NUMBER: _ClassVar[int]
    STORED_FRAMES_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    acked_through_tick: int
    stored_frames: int
    duplicates: int
    ended: bool
    def __init__(self, run_id: _Optional[str] = ..., acked_through_tick: _Optional[int] = ..., stored_frames: _Optional[int] = ..., duplicates: _Optional[int] = ..., ended: _Optional[bool] = ...) -> None: ...

class ListRunsRequest(_message.Message):
    __slots__ = ("track", "limit")
    TRACK_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    track: str
    limit: int
    def __init__(self, track: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class RunSummary(_message.Message):
    __slots__ = ("start", "stored_frames", "end", "started_unix_s")
    START_FIELD_NUMBER: _ClassVar[int]
    STORED_FRAMES_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    start: RunStart
    stored_frames: int
    end: RunEnd
    started_unix_s: float
    def __init__(self, start: _Optional[_Union[RunStart, _Mapping]] = ..., stored_frames: _Optional[int] = ..., end: _Optional[_Union[RunEnd, _Mapping]] = ..., started_unix_s: _Optional[float] = ...) -> None: ...

class ListRunsResponse(_message.Message):
    __slots__ = ("runs",)
    RUNS_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[RunSummary]
    def __init__(self, runs: _Optional[_Iterable[_Union[RunSummary, _Mapping]]] = ...) -> None: ...

class GetRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class GetRunResponse(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: RunSummary
    def __init__(self, run: _Optional[_Union[RunSummary, _Mapping]] = ...) -> None: ...
