"""Recording an episode for the dataset: drive, perturb, render every tick's frame and stream it to a collector."""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
from PIL import Image

from game_server import convert
from game_server.core import episode, physics
from game_server.core.drivers import RayDriver
from game_server.core.episode import Perturbation
from game_server.core.physics import RunResult
from game_server.core.state import SimState
from game_server.core.track import Track
from game_server.core.tracks import load_track
from game_server.evaluation import result_to_pb
from game_server.game import as_policy
from game_server.render.renderer import FrameSpec
from plumbing.channels import ClientTLS
from plumbing.errors import Cancelled, InvalidArgument, Unavailable
from rallyrobopilot.v1 import collector_pb2, game_pb2

# Image encodings by the name a person types (`--encoding png`).
ENCODINGS: dict[str, int] = {
    "raw": collector_pb2.IMAGE_ENCODING_RAW_RGB,
    "png": collector_pb2.IMAGE_ENCODING_PNG,
    "jpeg": collector_pb2.IMAGE_ENCODING_JPEG,
}
EncodingName = Literal["raw", "png", "jpeg"]
RUN_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_RECORD_TICKS = 100_000
DEFAULT_JPEG_QUALITY = 90
MAX_LABELS = 32
MAX_LABEL_BYTES = 256
MAX_DRIVER_ID = 64
MAX_ADDRESS_CHARS = 256
# A producer connection's patience: how long a send or the final acknowledgement may wait, how many
# reconnections it tries, and for how long a collector (or its Redis) may be down, before the recording
# fails with UNAVAILABLE: a restart of up to 30 s is ridden out, resuming after the last acknowledged tick.
COLLECTOR_TIMEOUT_S = 10.0
COLLECTOR_RECONNECTS = 3
COLLECTOR_OUTAGE_BUDGET_S = 45.0
PRODUCER_WINDOW = 256

Render = Callable[[Track, SimState, FrameSpec], np.ndarray]


class DeliveryStats(Protocol):
    """What a producer reports once its run is finished."""

    @property
    def acked(self) -> int: ...

    @property
    def resent(self) -> int: ...


class FrameSink(Protocol):
    """The producer side of CollectorService.Ingest for one run (collector.client.RunProducer)."""

    def send(self, record: collector_pb2.FrameRecord) -> None: ...

    def finish(self, end: collector_pb2.RunEnd | None) -> DeliveryStats: ...

    def close(self) -> None: ...


OpenProducer = Callable[[str, collector_pb2.RunStart], FrameSink]


def connect_collector(address: str, start: collector_pb2.RunStart, tls: ClientTLS | None = None) -> FrameSink:
    """The real producer: a reconnecting Ingest stream to the collector at `address` (TLS when `tls` has a CA)."""
    from collector.client import RunProducer

    return RunProducer(
        address,
        start,
        window=PRODUCER_WINDOW,
        timeout_s=COLLECTOR_TIMEOUT_S,
        reconnect_attempts=COLLECTOR_RECONNECTS,
        outage_budget_s=COLLECTOR_OUTAGE_BUDGET_S,
        tls=tls,
    )


@dataclass(frozen=True)
class RecordSpec:
    """One episode to record: the policy whose intended controls are the labels, and how frames are sent."""

    run_id: str
    track: str
    start: SimState | None
    policy: bytes | RayDriver  # an open-loop program (one mask per tick) or a closed-loop driver
    max_ticks: int
    frame: FrameSpec
    encoding: int  # collector_pb2.ImageEncoding
    collector_address: str
    jpeg_quality: int = 0  # 0: DEFAULT_JPEG_QUALITY
    perturbation: Perturbation | None = None
    driver_id: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    source: int = collector_pb2.RUN_SOURCE_DRIVER


@dataclass(frozen=True)
class RecordOutcome:
    run_id: str
    frames: int
    result: RunResult
    resent_frames: int
    perturbed_ticks: int


def validate(spec: RecordSpec) -> None:
    """Everything a collector would refuse, and more, refused before a frame is rendered."""
    if not RUN_ID.fullmatch(spec.run_id):
        raise InvalidArgument("run_id must be 1..64 characters of [A-Za-z0-9._-]")
    if not 1 <= spec.max_ticks <= MAX_RECORD_TICKS:
        raise InvalidArgument(f"max_ticks must be in [1, {MAX_RECORD_TICKS}]")
    if isinstance(spec.policy, bytes):
        if len(spec.policy) > MAX_RECORD_TICKS:
            raise InvalidArgument(f"a program runs at most {MAX_RECORD_TICKS} ticks")
        physics.validate_masks(spec.policy)
        if spec.perturbation is not None:
            raise InvalidArgument("an open-loop program cannot be perturbed: its labels would not fit the states")
    if spec.perturbation is not None:
        spec.perturbation.validate()
    if spec.encoding not in (
        collector_pb2.IMAGE_ENCODING_RAW_RGB,
        collector_pb2.IMAGE_ENCODING_PNG,
        collector_pb2.IMAGE_ENCODING_JPEG,
    ):
        raise InvalidArgument("encoding must be RAW_RGB, PNG or JPEG")
    if not 0 <= spec.jpeg_quality <= 100:
        raise InvalidArgument("jpeg_quality must be in [1, 100] (0: the default)")
    if not spec.collector_address:
        raise InvalidArgument("collector_address is required")
    if len(spec.collector_address) > MAX_ADDRESS_CHARS:
        raise InvalidArgument(f"collector_address is at most {MAX_ADDRESS_CHARS} characters")
    if len(spec.driver_id) > MAX_DRIVER_ID:
        raise InvalidArgument(f"driver_id is at most {MAX_DRIVER_ID} characters")
    if len(spec.labels) > MAX_LABELS or any(
        len(k.encode()) > MAX_LABEL_BYTES or len(v.encode()) > MAX_LABEL_BYTES for k, v in spec.labels.items()
    ):
        raise InvalidArgument(f"at most {MAX_LABELS} labels of at most {MAX_LABEL_BYTES} bytes each")


def encode_image(frame: np.ndarray, encoding: int, jpeg_quality: int) -> bytes:
    """A frame as the collector stores it; PNG at the fastest compression, since it is lossless anyway."""
    if encoding == collector_pb2.IMAGE_ENCODING_RAW_RGB:
        return np.ascontiguousarray(frame, dtype=np.uint8).tobytes()
    buffer = io.BytesIO()
    if encoding == collector_pb2.IMAGE_ENCODING_PNG:
        Image.fromarray(frame).save(buffer, format="PNG", compress_level=1)
    else:
        Image.fromarray(frame).save(buffer, format="JPEG", quality=jpeg_quality)
    return buffer.getvalue()


def frame_record(
    run_id: str,
    track: Track,
    state: SimState,
    image: bytes,
    applied: int,
    label: int,
    wall_contact: bool,
    rays: Sequence[float] | None = None,
) -> collector_pb2.FrameRecord:
    """The record of one tick: the state the frame shows, its sensors, and the controls applied to it."""
    return collector_pb2.FrameRecord(
        run_id=run_id,
        tick=state.tick,
        image=image,
        applied_mask=applied,
        label_mask=label,
        state=convert.state_to_pb(state),
        rays_m=physics.raycast(track, state.car, state.lap.segment) if rays is None else rays,
        progress_fraction=physics.progress_fraction(track, state.lap),
        wall_contact=wall_contact,
    )


def run_start(spec: RecordSpec, quality: int) -> collector_pb2.RunStart:
    return collector_pb2.RunStart(
        run_id=spec.run_id,
        track=spec.track,
        source=spec.source,  # type: ignore[arg-type]
        driver_id=spec.driver_id,
        width_px=spec.frame.width,
        height_px=spec.frame.height,
        encoding=spec.encoding,  # type: ignore[arg-type]
        jpeg_quality=quality,
        perturbation_seed=spec.perturbation.seed if spec.perturbation else 0,
        randomization_seed=spec.frame.seed if spec.frame.randomize else 0,
        domain_randomization=spec.frame.randomize,
        labels=dict(spec.labels),
    )


def record_episode(
    spec: RecordSpec,
    render: Render,
    open_producer: OpenProducer = connect_collector,
    stop: Callable[[], bool] | None = None,
) -> RecordOutcome:
    """Drives the episode tick by tick and streams each tick's frame, returning once all are acknowledged.

    Each tick: the frame of the current state (before the controls), the policy's intended mask (the label),
    the applied mask (the label, or the perturbation's keys), then one physics step with the applied mask.
    Without perturbations the trajectory and lap are exactly those of Evaluate with the same policy.
    `stop`, looked at every tick, ends the episode with Cancelled once the caller has left.
    """
    validate(spec)
    track = load_track(spec.track)
    if spec.start is not None:
        physics.validate_state(track, spec.start)
    start = track.base_state if spec.start is None else spec.start
    quality = (spec.jpeg_quality or DEFAULT_JPEG_QUALITY) if spec.encoding == collector_pb2.IMAGE_ENCODING_JPEG else 0
    producer = open_producer(spec.collector_address, run_start(spec, quality))
    frames = 0

    def send(tick: episode.Tick) -> None:
        nonlocal frames
        if stop is not None and stop():
            raise Cancelled(f"run {spec.run_id}: stopped after {tick.index} ticks, the caller left")
        image = encode_image(render(track, tick.state, spec.frame), spec.encoding, quality)
        producer.send(
            frame_record(spec.run_id, track, tick.state, image, tick.applied, tick.intended, tick.contact, tick.rays)
        )
        frames += 1

    try:
        run = episode.run_episode(
            track,
            start,
            as_policy(spec.policy, track),
            max_ticks=spec.max_ticks,
            perturbation=spec.perturbation,
            on_tick=send,
            with_rays=True,
        )
        result = run.result
        end = collector_pb2.RunEnd(
            run_id=spec.run_id, frames=frames, finished=result.finished, lap_ticks=result.lap_ticks
        )
        stats = producer.finish(end)
    finally:
        producer.close()
    if stats.acked < frames:
        raise Unavailable(f"the collector acknowledged {stats.acked} of {frames} frames of run {spec.run_id}")
    return RecordOutcome(spec.run_id, frames, result, stats.resent, run.perturbed_ticks)


def record_in_process(request: game_pb2.RecordRequest) -> game_pb2.RecordResponse:
    """What a game server answers to `request`, recorded here with this process's renderer."""
    from game_server.render import shared_renderer

    return outcome_to_pb(record_episode(spec_from_pb(request), shared_renderer().render))


def spec_from_pb(request: game_pb2.RecordRequest) -> RecordSpec:
    """A RecordRequest as core objects; structural checks here, the rest in `validate`."""
    start = convert.state_from_pb(request.start_state) if request.HasField("start_state") else None
    policy: bytes | RayDriver
    which = request.WhichOneof("policy")
    if which == "driver":
        policy = RayDriver(tuple(request.driver.params), request.driver.kind, request.driver.recovering)
    elif which == "program":
        policy = request.program.masks
    else:
        raise InvalidArgument("give a program or a driver")
    width, height = convert.frame_size(request.frame_options)
    options = request.frame_options
    frame = FrameSpec(width, height, options.domain_randomization, options.randomization_seed)
    perturbation = None
    if request.HasField("perturbation"):
        p = request.perturbation
        perturbation = Perturbation(p.seed, p.start_probability, p.max_duration_ticks)
    return RecordSpec(
        run_id=request.run_id,
        track=request.track,
        start=start,
        policy=policy,
        max_ticks=request.max_ticks,
        frame=frame,
        encoding=request.encoding,
        collector_address=request.collector_address,
        jpeg_quality=request.jpeg_quality,
        perturbation=perturbation,
        driver_id=request.driver_id,
        labels=dict(request.labels),
    )


def outcome_to_pb(outcome: RecordOutcome) -> game_pb2.RecordResponse:
    return game_pb2.RecordResponse(
        run_id=outcome.run_id,
        frames=outcome.frames,
        result=result_to_pb(outcome.result),
        resent_frames=outcome.resent_frames,
        perturbed_ticks=outcome.perturbed_ticks,
    )
