"""The ingest core without gRPC or Redis: validation, batching, acknowledgements and bounded read-ahead."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterable, Iterator

import pytest

from collector.ingest import IngestLimits, Ingestor, validate_record, validate_start
from collector.store import AppendResult
from plumbing.errors import FailedPrecondition, InvalidArgument
from rallyrobopilot.v1.collector_pb2 import (
    FrameRecord,
    ImageEncoding,
    IngestRequest,
    IngestResponse,
    RunEnd,
    RunSource,
    RunStart,
)

LIMITS = IngestLimits()
START = RunStart(
    run_id="r1",
    track="oval",
    source=RunSource.RUN_SOURCE_HUMAN,
    width_px=4,
    height_px=2,
    encoding=ImageEncoding.IMAGE_ENCODING_RAW_RGB,
)
RAW = bytes(4 * 2 * 3)


class MemorySink:
    """Records what the core stores; `gate` lets a test hold writes back, as a slow Redis would."""

    def __init__(self) -> None:
        self.frames: dict[int, FrameRecord] = {}
        self.batches: list[int] = []
        self.ended: RunEnd | None = None
        self.gate = threading.Event()
        self.gate.set()

    def start_run(self, start: RunStart) -> int:
        return len(self.frames)

    def append(self, run_id: str, records: list[FrameRecord]) -> AppendResult:
        self.gate.wait()
        new = [r for r in records if r.tick not in self.frames]
        self.frames.update((r.tick, r) for r in new)
        self.batches.append(len(records))
        return AppendResult(len(new), len(records) - len(new), records[-1].tick, len(self.frames))

    def end_run(self, end: RunEnd) -> int:
        self.ended = end
        return len(self.frames)


def frames(ticks: Iterable[int], image: bytes = RAW) -> Iterator[IngestRequest]:
    for t in ticks:
        yield IngestRequest(frame=FrameRecord(run_id="r1", tick=t, image=image))


def test_a_run_is_stored_and_acknowledged_in_batches() -> None:
    sink = MemorySink()
    requests = [IngestRequest(start=START), *frames(range(200)), IngestRequest(end=RunEnd(run_id="r1", frames=200))]
    acks = list(Ingestor(sink, IngestLimits(batch_records=64)).run(iter(requests), lambda: True))
    assert sorted(sink.frames) == list(range(200))
    assert max(sink.batches) <= 64
    assert acks[-1] == IngestResponse(run_id="r1", acked_through_tick=199, stored_frames=200, ended=True)
    assert [a.acked_through_tick for a in acks] == sorted(a.acked_through_tick for a in acks)


def test_valid_records_before_a_bad_one_are_stored_and_acknowledged() -> None:
    sink = MemorySink()
    requests = [IngestRequest(start=START), *frames(range(5)), *frames([3])]
    acks: list[IngestResponse] = []
    with pytest.raises(InvalidArgument, match="strictly increase"):
        for ack in Ingestor(sink).run(iter(requests), lambda: True):
            acks.append(ack)
    assert sorted(sink.frames) == list(range(5)) and acks[-1].acked_through_tick == 4


def test_the_first_message_must_be_a_start() -> None:
    with pytest.raises(FailedPrecondition):
        list(Ingestor(MemorySink()).run(frames(range(1)), lambda: True))


@pytest.mark.parametrize(
    "change",
    [
        {"run_id": ""},
        {"run_id": "x" * 65},
        {"run_id": "a/b"},
        {"encoding": ImageEncoding.IMAGE_ENCODING_UNSPECIFIED},
        {"source": RunSource.RUN_SOURCE_UNSPECIFIED},
        {"width_px": 641},
        {"height_px": 0},
        {"encoding": ImageEncoding.IMAGE_ENCODING_JPEG, "jpeg_quality": 0},
        {"jpeg_quality": 90},
        {"track": ""},
        {"labels": {f"k{i}": "v" for i in range(33)}},
        {"labels": {"k": "v" * 257}},
    ],
)
def test_bad_starts_are_invalid(change: dict[str, object]) -> None:
    start = RunStart()
    start.CopyFrom(START)
    for key, value in change.items():
        if key == "labels":
            start.labels.update(value)  # type: ignore[call-overload]
        else:
            setattr(start, key, value)
    with pytest.raises(InvalidArgument):
        validate_start(start, LIMITS)


@pytest.mark.parametrize(
    ("encoding", "record"),
    [
        (1, FrameRecord(run_id="other", tick=1, image=RAW)),
        (1, FrameRecord(run_id="r1", tick=1, image=RAW + b"\0")),
        (1, FrameRecord(run_id="r1", tick=1, image=RAW, applied_mask=16)),
        (1, FrameRecord(run_id="r1", tick=1, image=RAW, rays_m=[0.0] * 65)),
        (2, FrameRecord(run_id="r1", tick=1, image=b"\xff\xd8\xff" + RAW)),
        (3, FrameRecord(run_id="r1", tick=1, image=b"\x89PNG\r\n\x1a\n" + RAW)),
        (2, FrameRecord(run_id="r1", tick=1, image=b"\x89PNG\r\n\x1a\n" + bytes(LIMITS.max_encoded_image_bytes))),
        (1, FrameRecord(run_id="r1", tick=0, image=RAW)),
    ],
)
def test_bad_records_are_invalid(encoding: int, record: FrameRecord) -> None:
    start = RunStart()
    start.CopyFrom(START)
    start.encoding = encoding  # type: ignore[assignment]
    start.jpeg_quality = 90 if encoding == ImageEncoding.IMAGE_ENCODING_JPEG else 0
    with pytest.raises(InvalidArgument):
        validate_record(record, start, 0, LIMITS)


def test_a_slow_sink_stops_the_reading_instead_of_buffering() -> None:
    """With writes held back, an endless producer is read only up to the byte budget, not without bound."""
    sink = MemorySink()
    sink.gate.clear()
    image = bytes(4 * 2 * 3)
    limits = IngestLimits(queue_records=10_000, inflight_bytes=20_000, batch_records=8)
    ingestor = Ingestor(sink, limits)
    consumed = itertools.count()

    def endless() -> Iterator[IngestRequest]:
        yield IngestRequest(start=START)
        for request in frames(itertools.count(), image):
            next(consumed)
            yield request

    stop = threading.Event()
    acks = ingestor.run(endless(), lambda: not stop.is_set())
    thread = threading.Thread(target=lambda: list(acks), daemon=True)
    thread.start()
    time.sleep(0.5)
    read = next(consumed)
    smallest_message = IngestRequest(frame=FrameRecord(run_id="r1", tick=1, image=image)).ByteSize()
    assert ingestor.budget.used <= limits.inflight_bytes
    assert read <= limits.inflight_bytes // smallest_message + 2  # + the start, + one waiting at the budget
    sink.gate.set()
    time.sleep(0.2)
    assert next(consumed) > read  # reading resumes as soon as Redis takes the writes
    stop.set()
    thread.join(5)
    assert not thread.is_alive()
