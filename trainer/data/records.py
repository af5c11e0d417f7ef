"""Recorded frames as plain Python: run metadata, image decoding and the `Sample` every data tool reads."""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image

from rallyrobopilot.v1 import collector_pb2 as pb

LABEL_KEYS = ("forward", "back", "left", "right")  # bit i of a control mask is LABEL_KEYS[i]
MAX_MASK = 15
MAX_IMAGE_PIXELS = 640 * 480  # the renderer's largest frame (sim.proto FrameOptions)
RAY_COUNT = 15

ENCODING_NAMES = {
    pb.IMAGE_ENCODING_RAW_RGB: "raw_rgb",
    pb.IMAGE_ENCODING_PNG: "png",
    pb.IMAGE_ENCODING_JPEG: "jpeg",
}
SOURCE_NAMES = {pb.RUN_SOURCE_DRIVER: "driver", pb.RUN_SOURCE_HUMAN: "human", pb.RUN_SOURCE_DAGGER: "dagger"}


class DataError(ValueError):
    """Stored data that breaks the schema or cannot be decoded; the message names the run or file."""


@dataclass(frozen=True)
class RunInfo:
    """A run's metadata (its `RunStart`, start time and `RunEnd` if any), independent of where it is stored."""

    run_id: str
    track: str
    source: str
    driver_id: str
    width_px: int
    height_px: int
    encoding: str
    jpeg_quality: int
    started_unix_s: float
    end_frames: int | None = None  # frames the producer said it sent, from RunEnd; None before the end arrived
    finished: bool = False
    lap_ticks: int = 0

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.height_px, self.width_px, 3)


def run_info_from_start(start: pb.RunStart, started_unix_s: float, end: pb.RunEnd | None) -> RunInfo:
    """Checks a RunStart before any frame is decoded with it, so a bad header fails once, clearly."""
    if start.encoding not in ENCODING_NAMES:
        raise DataError(f"run {start.run_id!r}: unknown image encoding {start.encoding}")
    if not (start.width_px > 0 and start.height_px > 0 and start.width_px * start.height_px <= MAX_IMAGE_PIXELS):
        raise DataError(f"run {start.run_id!r}: image size {start.width_px}x{start.height_px} is out of bounds")
    return RunInfo(
        run_id=start.run_id,
        track=start.track,
        source=SOURCE_NAMES.get(start.source, "unspecified"),
        driver_id=start.driver_id,
        width_px=start.width_px,
        height_px=start.height_px,
        encoding=ENCODING_NAMES[start.encoding],
        jpeg_quality=start.jpeg_quality,
        started_unix_s=started_unix_s,
        end_frames=None if end is None else end.frames,
        finished=False if end is None else end.finished,
        lap_ticks=0 if end is None else end.lap_ticks,
    )


def decode_image(data: bytes, run: RunInfo) -> np.ndarray:
    """The (H, W, 3) uint8 image of one record; the size is checked before pixels are decoded (no bombs)."""
    h, w, _ = run.image_shape
    if run.encoding == "raw_rgb":
        if len(data) != h * w * 3:
            raise DataError(f"run {run.run_id!r}: raw image has {len(data)} bytes, expected {h * w * 3}")
        return np.frombuffer(data, dtype=np.uint8).reshape(h, w, 3).copy()
    expected_format = "PNG" if run.encoding == "png" else "JPEG"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[expected_format]) as image:
                if image.size != (w, h):
                    raise DataError(f"run {run.run_id!r}: image is {image.size[0]}x{image.size[1]}, expected {w}x{h}")
                return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise DataError(f"run {run.run_id!r}: cannot decode {expected_format} image of {len(data)} bytes") from exc


@dataclass(frozen=True, eq=False)
class Sample:
    """One decoded frame with its labels and the state it shows; what datasets, shards and validation share."""

    run_id: str
    track: str
    tick: int
    image: np.ndarray  # (H, W, 3) uint8
    speed_m_per_s: float
    label_mask: int  # the driver's intended keys: the target
    applied_mask: int  # the keys actually applied (possibly perturbed)
    rays_m: np.ndarray  # (15,) float64
    progress_fraction: float
    wall_contact: bool
    x_m: float
    y_m: float
    heading_rad: float
    segment: int  # centre-line segment the car was projected onto (track coverage)


def sample_from_record(record: pb.FrameRecord, run: RunInfo) -> Sample:
    """Decodes and checks one record of `run`: a record of another run or with out-of-range masks is refused."""
    if record.run_id != run.run_id:
        raise DataError(f"run {run.run_id!r}: holds a record of run {record.run_id!r}")
    if record.label_mask > MAX_MASK or record.applied_mask > MAX_MASK:
        raise DataError(f"run {run.run_id!r} tick {record.tick}: control masks must be within 0..{MAX_MASK}")
    if len(record.rays_m) != RAY_COUNT:
        raise DataError(f"run {run.run_id!r} tick {record.tick}: {len(record.rays_m)} rays, expected {RAY_COUNT}")
    car = record.state.car
    return Sample(
        run_id=run.run_id,
        track=run.track,
        tick=record.tick,
        image=decode_image(record.image, run),
        speed_m_per_s=car.speed_m_per_s,
        label_mask=record.label_mask,
        applied_mask=record.applied_mask,
        rays_m=np.asarray(record.rays_m, dtype=np.float64),
        progress_fraction=record.progress_fraction,
        wall_contact=record.wall_contact,
        x_m=car.x_m,
        y_m=car.y_m,
        heading_rad=car.heading_rad,
        segment=record.state.lap.segment,
    )


class FrameSource(Protocol):
    """Where runs come from (Redis or exported shards): the one interface datasets and validation read."""

    def runs(self, track: str | None = None) -> list[RunInfo]:
        """Runs in a stable order (start time, then id), optionally of one track."""
        ...

    def samples(self, run_id: str) -> Iterator[Sample]:
        """The run's frames in stored (tick) order."""
        ...
