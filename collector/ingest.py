"""The Ingest stream's state machine: validate, batch, store, acknowledge, with memory bounded by flow control."""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from collector import metrics
from collector.store import AppendResult
from plumbing.errors import DomainError, FailedPrecondition, InvalidArgument, quote, status_name
from plumbing.settings import setting
from rallyrobopilot.v1.collector_pb2 import (
    FrameRecord,
    ImageEncoding,
    IngestRequest,
    IngestResponse,
    RunEnd,
    RunSource,
    RunStart,
)

log = logging.getLogger(__name__)

RUN_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_MAGIC = {
    ImageEncoding.IMAGE_ENCODING_PNG: b"\x89PNG\r\n\x1a\n",
    ImageEncoding.IMAGE_ENCODING_JPEG: b"\xff\xd8\xff",
}
_MAX_MASK = 15
_MAX_RAYS = 64
_MAX_RAY_M = 1e6
_MAX_ABS = 1e12  # any coordinate, speed or distance of a real state is far inside this
# The largest tick a record may carry: its Redis entry ID (tick + 1) must fit in 64 bits, with room.
MAX_TICK = 2**48
_WAIT_SLICE_S = 0.25  # how often blocked threads look whether their stream is still alive


@dataclass(frozen=True)
class IngestLimits:
    """Bounds on what one stream may send, and on the memory the collector spends on all streams together."""

    max_width_px: int = setting(640, "widest frame accepted, pixels")
    max_height_px: int = setting(480, "tallest frame accepted, pixels")
    max_encoded_image_bytes: int = setting(2 * 1024 * 1024, "largest encoded image accepted, bytes")
    max_labels: int = setting(32, "labels per run at most")
    max_label_bytes: int = setting(256, "longest label key or value, bytes")
    max_text_bytes: int = setting(256, "longest track name or driver id, bytes")
    batch_records: int = setting(64, "records written per Redis round trip")
    queue_records: int = setting(256, "records read ahead of Redis, per stream")
    inflight_bytes: int = setting(
        64 * 1024 * 1024, "bytes read from all streams but not yet stored before reading pauses"
    )


class FrameSink(Protocol):
    """Where validated records go (`collector.store.FrameStore`)."""

    def start_run(self, start: RunStart) -> int: ...

    def append(self, run_id: str, records: list[FrameRecord]) -> AppendResult: ...

    def end_run(self, end: RunEnd) -> int: ...


class ByteBudget:
    """Bytes read from all streams but not yet in Redis; readers wait here when Redis falls behind."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.used = 0
        self._cond = threading.Condition()

    def acquire(self, n: int, alive: Callable[[], bool]) -> bool:
        """Waits for room for n bytes (a message larger than the whole budget waits for an empty budget)."""
        with self._cond:
            while self.used > 0 and self.used + n > self.limit:
                if not alive():
                    return False
                self._cond.wait(_WAIT_SLICE_S)
            self.used += n
            return True

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


@dataclass
class _Item:
    request: IngestRequest | None  # None: the client closed its side (or broke off: error is set)
    nbytes: int = 0
    error: BaseException | None = None


class _ReadAhead:
    """A bounded queue between a stream's reader thread and its writer; closing it returns its bytes."""

    def __init__(self, capacity: int, budget: ByteBudget) -> None:
        self.capacity = capacity
        self.budget = budget
        self._items: deque[_Item] = deque()
        self._cond = threading.Condition()
        self.closed = False

    def put(self, item: _Item) -> bool:
        with self._cond:
            while len(self._items) >= self.capacity and not self.closed:
                self._cond.wait(_WAIT_SLICE_S)
            if self.closed:
                self.budget.release(item.nbytes)
                return False
            self._items.append(item)
            self._cond.notify_all()
            return True

    def take(self, max_items: int, timeout_s: float) -> list[_Item]:
        """Up to max_items already read; waits only while there are none."""
        with self._cond:
            if not self._items:
                self._cond.wait(timeout_s)
            items = [self._items.popleft() for _ in range(min(max_items, len(self._items)))]
            self._cond.notify_all()
            return items

    def close(self) -> None:
        with self._cond:
            self.closed = True
            for item in self._items:
                self.budget.release(item.nbytes)
            self._items.clear()
            self._cond.notify_all()


def validate_start(start: RunStart, limits: IngestLimits) -> None:
    if not RUN_ID.fullmatch(start.run_id):
        raise InvalidArgument(f"run_id must be 1..64 characters of [A-Za-z0-9._-], got {quote(start.run_id)}")
    if start.encoding not in ImageEncoding.values() or start.encoding == ImageEncoding.IMAGE_ENCODING_UNSPECIFIED:
        raise InvalidArgument("RunStart.encoding must be RAW_RGB, PNG or JPEG")
    if start.source not in RunSource.values() or start.source == RunSource.RUN_SOURCE_UNSPECIFIED:
        raise InvalidArgument("RunStart.source must be DRIVER, HUMAN or DAGGER")
    if not (1 <= start.width_px <= limits.max_width_px and 1 <= start.height_px <= limits.max_height_px):
        raise InvalidArgument(
            f"image size {start.width_px}x{start.height_px} px is outside 1x1..{limits.max_width_px}x"
            f"{limits.max_height_px}"
        )
    if start.encoding == ImageEncoding.IMAGE_ENCODING_JPEG:
        if not 1 <= start.jpeg_quality <= 100:
            raise InvalidArgument(f"jpeg_quality must be 1..100 for JPEG, got {start.jpeg_quality}")
    elif start.jpeg_quality != 0:
        raise InvalidArgument("jpeg_quality must be 0 unless the encoding is JPEG")
    for name, text in (("track", start.track), ("driver_id", start.driver_id)):
        if len(text.encode()) > limits.max_text_bytes:
            raise InvalidArgument(f"{name} is longer than {limits.max_text_bytes} bytes")
    if not start.track:
        raise InvalidArgument("RunStart.track is required")
    if len(start.labels) > limits.max_labels:
        raise InvalidArgument(f"at most {limits.max_labels} labels, got {len(start.labels)}")
    for key, value in start.labels.items():
        if len(key.encode()) > limits.max_label_bytes or len(value.encode()) > limits.max_label_bytes:
            raise InvalidArgument(
                f"label {quote(key, 40)}: keys and values are limited to {limits.max_label_bytes} bytes"
            )


def _finite(tick: int, name: str, values: Iterable[float], low: float, high: float) -> None:
    for value in values:
        if not (math.isfinite(value) and low <= value <= high):
            raise InvalidArgument(f"tick {tick}: {name} must be finite and within [{low:g}, {high:g}], got {value!r}")


def validate_record(record: FrameRecord, start: RunStart, last_tick: int | None, limits: IngestLimits) -> None:
    if record.run_id != start.run_id:
        raise InvalidArgument(f"record of run {quote(record.run_id)} on the stream of run {start.run_id!r}")
    if record.tick > MAX_TICK:
        raise InvalidArgument(f"tick {record.tick} is beyond the largest tick a run may hold, {MAX_TICK}")
    if last_tick is not None and record.tick <= last_tick:
        raise InvalidArgument(f"tick {record.tick} after tick {last_tick}: ticks must strictly increase")
    if record.applied_mask > _MAX_MASK or record.label_mask > _MAX_MASK:
        raise InvalidArgument(
            f"tick {record.tick}: control masks are 0..15, got applied {record.applied_mask} label {record.label_mask}"
        )
    if len(record.rays_m) > _MAX_RAYS:
        raise InvalidArgument(f"tick {record.tick}: at most {_MAX_RAYS} rays, got {len(record.rays_m)}")
    _finite(record.tick, "rays_m", record.rays_m, 0.0, _MAX_RAY_M)
    _finite(record.tick, "progress_fraction", (record.progress_fraction,), 0.0, 1.0)
    if record.HasField("state"):
        car, lap = record.state.car, record.state.lap
        _finite(record.tick, "state", (car.x_m, car.y_m, car.heading_rad, car.speed_m_per_s), -_MAX_ABS, _MAX_ABS)
        _finite(record.tick, "state", (lap.progress_m, lap.arc_m), -_MAX_ABS, _MAX_ABS)
    size = len(record.image)
    if start.encoding == ImageEncoding.IMAGE_ENCODING_RAW_RGB:
        expected = start.width_px * start.height_px * 3
        if size != expected:
            raise InvalidArgument(
                f"tick {record.tick}: a raw {start.width_px}x{start.height_px} RGB image is {expected} bytes,"
                f" got {size}"
            )
        return
    if size > limits.max_encoded_image_bytes:
        raise InvalidArgument(
            f"tick {record.tick}: encoded image of {size} bytes exceeds {limits.max_encoded_image_bytes} bytes"
        )
    magic = _MAGIC[start.encoding]
    if not record.image.startswith(magic):
        name = ImageEncoding.Name(start.encoding).removeprefix("IMAGE_ENCODING_")
        raise InvalidArgument(f"tick {record.tick}: image is not a {name} file (bad magic bytes)")


class Ingestor:
    """Runs Ingest streams against one sink; the byte budget is shared by all of them."""

    def __init__(self, sink: FrameSink, limits: IngestLimits | None = None) -> None:
        self.sink = sink
        self.limits = limits or IngestLimits()
        self.budget = ByteBudget(self.limits.inflight_bytes)
        metrics.INGESTORS.track(self)

    def run(self, requests: Iterator[IngestRequest], alive: Callable[[], bool]) -> Iterator[IngestResponse]:
        """Answers one stream: an acknowledgement after every batch Redis stored, then the stream's end.

        A reader thread pulls requests into a bounded queue only while the byte budget has room; when Redis
        is slower than the producers, it stops pulling and gRPC's flow control holds the producers back.
        """
        ahead = _ReadAhead(self.limits.queue_records, self.budget)
        reader = threading.Thread(target=self._read, args=(requests, ahead, alive), daemon=True, name="ingest-read")
        reader.start()
        try:
            with metrics.STREAMS.track_inprogress():
                yield from _Stream(self.sink, self.limits).serve(ahead, alive)
        except Exception as exc:
            metrics.ERRORS.labels(status_name(exc)).inc()
            raise
        finally:
            ahead.close()

    def _read(self, requests: Iterator[IngestRequest], ahead: _ReadAhead, alive: Callable[[], bool]) -> None:
        def open_() -> bool:
            return alive() and not ahead.closed

        try:
            for request in requests:
                nbytes = request.ByteSize()
                if not self.budget.acquire(nbytes, open_):
                    return
                if not ahead.put(_Item(request, nbytes)):
                    return
        except Exception as exc:  # the client cancelled or the connection broke: the writer ends the stream
            ahead.put(_Item(None, error=exc))
            return
        ahead.put(_Item(None))


class _Stream:
    """State of one stream: started, records in tick order, ended."""

    def __init__(self, sink: FrameSink, limits: IngestLimits) -> None:
        self.sink = sink
        self.limits = limits
        self.start: RunStart | None = None
        self.last_tick: int | None = None
        self.stored_frames = 0
        self.duplicates = 0
        self.ended = False

    def ack(self) -> IngestResponse:
        assert self.start is not None
        metrics.ACKS.inc()
        return IngestResponse(
            run_id=self.start.run_id,
            acked_through_tick=self.last_tick or 0,
            stored_frames=self.stored_frames,
            duplicates=self.duplicates,
            ended=self.ended,
        )

    def serve(self, ahead: _ReadAhead, alive: Callable[[], bool]) -> Iterator[IngestResponse]:
        while True:
            items = ahead.take(self.limits.batch_records, _WAIT_SLICE_S)
            if not items:
                if not alive():
                    return
                continue
            frames: list[FrameRecord] = []
            try:
                for item in items:
                    request = item.request
                    if request is None:
                        if isinstance(item.error, DomainError):
                            raise item.error  # e.g. bytes that do not decode: the client hears why
                        if item.error is not None:
                            log.debug("ingest stream broke off: %r", item.error)
                            return
                        if self.start is None:
                            raise FailedPrecondition("the Ingest stream ended before its RunStart")
                        if frames:
                            yield self._store(frames)
                        return
                    kind = request.WhichOneof("kind")
                    if kind == "frame":
                        if self.start is None:
                            raise FailedPrecondition("the first message of an Ingest stream must be a RunStart")
                        validate_record(request.frame, self.start, self.last_tick, self.limits)
                        frames.append(request.frame)
                        self.last_tick = request.frame.tick
                        continue
                    if frames:
                        yield self._store(frames)
                        frames = []
                    if kind == "start":
                        yield self._begin(request.start)
                    elif kind == "end":
                        yield self._end(request.end)
                        return
                    else:
                        raise InvalidArgument("an IngestRequest must hold a start, a frame or an end")
                if frames:
                    yield self._store(frames)
            except InvalidArgument:
                if frames:  # store what was valid before the bad record, so the producer's acks are exact
                    yield self._store(frames)
                raise
            finally:
                for item in items:
                    ahead.budget.release(item.nbytes)

    def _begin(self, start: RunStart) -> IngestResponse:
        if self.start is not None:
            raise FailedPrecondition("an Ingest stream carries one run: a second RunStart is not allowed")
        validate_start(start, self.limits)
        self.stored_frames = self.sink.start_run(start)
        self.start = start
        log.info("run %s: stream started (%d frames already stored)", start.run_id, self.stored_frames)
        return self.ack()

    def _store(self, frames: list[FrameRecord]) -> IngestResponse:
        assert self.start is not None
        started = time.perf_counter()
        result = self.sink.append(self.start.run_id, frames)
        metrics.REDIS_WRITE.observe(time.perf_counter() - started)
        metrics.FRAMES_STORED.inc(result.stored)
        metrics.BYTES_STORED.inc(result.stored_bytes)
        metrics.DUPLICATES.inc(result.duplicates)
        self.stored_frames = result.stored_frames
        self.duplicates += result.duplicates
        return self.ack()

    def _end(self, end: RunEnd) -> IngestResponse:
        if self.start is None:
            raise FailedPrecondition("the first message of an Ingest stream must be a RunStart")
        if end.run_id != self.start.run_id:
            raise InvalidArgument(f"RunEnd of run {quote(end.run_id)} on the stream of run {self.start.run_id!r}")
        self.stored_frames = self.sink.end_run(end)
        self.ended = True
        log.info("run %s: ended, %d frames stored", end.run_id, self.stored_frames)
        return self.ack()
