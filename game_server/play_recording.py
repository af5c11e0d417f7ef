"""`rrp play --record`: the keyboard lap's ticks, rendered offscreen and streamed to a collector by a helper process.

The play window's own pixels are not what a model should learn from (window size, HUD, a pose interpolated
between ticks), and the offscreen renderer cannot run beside the window in one process (Panda3D allows one
ursina app per process). So the play loop hands each tick's state to a helper process over a pipe, as
length-prefixed `IngestRequest` messages (protobuf, no pickle); the helper renders each state with the very
renderer game servers use, so human and driver frames look alike, and streams them with the producer client.
The play loop never waits for either: a writer thread drains a queue into the pipe.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO, TextIO

from game_server import convert
from game_server.core.state import SimState
from game_server.core.track import Track
from game_server.core.tracks import load_track
from game_server.recording import (
    ENCODINGS,
    EncodingName,
    FrameSink,
    OpenProducer,
    Render,
    connect_collector,
    encode_image,
    frame_record,
)
from game_server.render.renderer import FrameSpec
from plumbing.errors import InvalidArgument
from plumbing.settings import nested, setting
from rallyrobopilot.v1 import collector_pb2

log = logging.getLogger(__name__)

_LENGTH = struct.Struct(">I")
MAX_PIPE_MESSAGE_BYTES = 1 << 20  # a record without its image is a few hundred bytes
HUMAN_DRIVER_ID = "keyboard"


@dataclass(frozen=True)
class PlayRecordConfig:
    collector: str = setting("", "collector host:port; none: one is started here with a Redis in --out")
    encoding: EncodingName = setting("png", "image encoding of the recorded frames")
    jpeg_quality: int = setting(90, "JPEG quality 1..100")
    width_px: int = setting(128, "frame width, pixels", flag="width", env="width")
    height_px: int = setting(96, "frame height, pixels", flag="height", env="height")


@dataclass(frozen=True)
class PlayConfig:
    """`rrp play`: a person at the keyboard, which track, and whether their laps become training data."""

    track: str = setting("oval", "track name: a built-in or gen-<seed>")
    record: bool = setting(
        False,
        "stream every tick (frame rendered offscreen from the tick's state, keys as labels) to a collector; "
        "R starts a new run",
    )
    recording: PlayRecordConfig = nested(PlayRecordConfig)
    out_dir: Path = setting(Path("out/play"), "with --record and no --collector: Redis data", flag="out", env="out")


@dataclass(frozen=True)
class RecordedRun:
    """What the helper reports for one run, once the collector acknowledged it."""

    run_id: str
    frames: int
    acked: int
    resent: int
    finished: bool


def write_message(stream: IO[bytes], message: collector_pb2.IngestRequest) -> None:
    body = message.SerializeToString()
    stream.write(_LENGTH.pack(len(body)) + body)


def read_messages(stream: BinaryIO) -> Iterator[collector_pb2.IngestRequest]:
    """The messages of a pipe until it closes; a message over the size bound is refused, not read."""
    while header := stream.read(_LENGTH.size):
        if len(header) < _LENGTH.size:
            raise InvalidArgument("truncated message length on the recording pipe")
        (size,) = _LENGTH.unpack(header)
        if size > MAX_PIPE_MESSAGE_BYTES:
            raise InvalidArgument(f"recording pipe message of {size} bytes exceeds {MAX_PIPE_MESSAGE_BYTES}")
        body = stream.read(size)
        if len(body) < size:
            raise InvalidArgument("truncated message on the recording pipe")
        yield collector_pb2.IngestRequest.FromString(body)


class PlayRecorder:
    """The `record_hook` of `run_play`: one run per lap attempt (R starts a new one, as ticks restart at 0)."""

    def __init__(self, config: PlayRecordConfig, track: str) -> None:
        self.config = config
        self.track = load_track(track)
        self._prefix = f"human-{track[:24]}-{time.strftime('%Y%m%dT%H%M%S')}"
        self._runs = 0
        self._run_id: str | None = None
        self._last_tick = -1
        self._frames = 0
        self._previous_contact = False
        self._finish_tick = 0
        self._outbox: queue.SimpleQueue[collector_pb2.IngestRequest | None] = queue.SimpleQueue()
        self._helper = subprocess.Popen(
            [sys.executable, "-m", "game_server.play_recording", config.collector],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self._writer = threading.Thread(target=self._write, daemon=True, name="play-recorder")
        self._writer.start()

    def __call__(self, state: SimState, mask: int, wall_contact: bool) -> None:
        """Called once per tick with the state the keys were applied to; `wall_contact` is of that tick."""
        if self._run_id is None or state.tick != self._last_tick + 1:
            self._end_run()
            self._start_run()
        assert self._run_id is not None
        if state.lap.finished and not self._finish_tick:
            self._finish_tick = state.lap.finish_tick
        # A FrameRecord's wall_contact is of the tick that led to its state: the previous call's.
        record = frame_record(self._run_id, self.track, state, b"", mask, mask, self._previous_contact)
        self._outbox.put(collector_pb2.IngestRequest(frame=record))
        self._previous_contact = wall_contact
        self._last_tick = state.tick
        self._frames += 1

    def close(self, timeout_s: float = 120.0) -> list[RecordedRun]:
        """Ends the run, waits until the helper has delivered every frame and returns its reports."""
        self._end_run()
        self._outbox.put(None)
        self._writer.join(timeout_s)
        assert self._helper.stdout is not None
        out = self._helper.stdout.read()  # the writer has closed the helper's stdin: it finishes and exits
        if self._helper.wait(timeout_s) != 0:
            raise RuntimeError(f"the recording helper failed with exit code {self._helper.returncode}")
        # Only the helper's report lines: a library may print something else on its stdout.
        return [RecordedRun(**json.loads(line)) for line in out.decode().splitlines() if line.startswith("{")]

    def _start_run(self) -> None:
        self._runs += 1
        self._run_id = f"{self._prefix}-{self._runs}"
        self._frames, self._previous_contact, self._finish_tick = 0, False, 0
        c = self.config
        start = collector_pb2.RunStart(
            run_id=self._run_id,
            track=self.track.name,
            source=collector_pb2.RUN_SOURCE_HUMAN,
            driver_id=HUMAN_DRIVER_ID,
            width_px=c.width_px,
            height_px=c.height_px,
            encoding=ENCODINGS[c.encoding],  # type: ignore[arg-type]
            jpeg_quality=c.jpeg_quality if c.encoding == "jpeg" else 0,
            labels={"input": "keyboard"},
        )
        self._outbox.put(collector_pb2.IngestRequest(start=start))

    def _end_run(self) -> None:
        if self._run_id is None:
            return
        end = collector_pb2.RunEnd(
            run_id=self._run_id, frames=self._frames, finished=self._finish_tick > 0, lap_ticks=self._finish_tick
        )
        self._outbox.put(collector_pb2.IngestRequest(end=end))
        self._run_id = None

    def _write(self) -> None:
        pipe = self._helper.stdin
        assert pipe is not None
        try:
            while (message := self._outbox.get()) is not None:
                write_message(pipe, message)
                if self._outbox.empty():
                    pipe.flush()
        except BrokenPipeError:
            log.error("the recording helper stopped; this lap is no longer recorded")
        finally:
            with contextlib.suppress(BrokenPipeError):
                pipe.close()


@dataclass
class _Run:
    start: collector_pb2.RunStart
    track: Track
    spec: FrameSpec
    producer: FrameSink
    sent: int = 0


def serve_pipe(
    stream: BinaryIO, collector: str, render: Render, out: TextIO, open_producer: OpenProducer = connect_collector
) -> None:
    """The helper's loop: renders and encodes each record's state, streams runs, reports each on `out`."""
    run: _Run | None = None
    for message in read_messages(stream):
        kind = message.WhichOneof("kind")
        if kind == "start":
            start = message.start
            spec = FrameSpec(start.width_px, start.height_px)
            run = _Run(start, load_track(start.track), spec, open_producer(collector, start))
            continue
        if run is None:
            raise InvalidArgument("a run's records must follow its start on the recording pipe")
        if kind == "frame":
            record = message.frame
            frame = render(run.track, convert.state_from_pb(record.state), run.spec)
            record.image = encode_image(frame, run.start.encoding, run.start.jpeg_quality)
            run.producer.send(record)
            run.sent += 1
        elif kind == "end":
            try:
                stats = run.producer.finish(message.end)
            finally:
                run.producer.close()
            report = RecordedRun(run.start.run_id, run.sent, stats.acked, stats.resent, message.end.finished)
            out.write(json.dumps(report.__dict__) + "\n")
            out.flush()
            run = None


def main() -> None:
    """The helper process of `rrp play --record` (never run by hand): ticks on stdin, one argument, the collector."""
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m game_server.play_recording COLLECTOR_HOST:PORT  (ticks on stdin)")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    from game_server.render import shared_renderer

    serve_pipe(sys.stdin.buffer, sys.argv[1], shared_renderer().render, sys.stdout)


if __name__ == "__main__":
    main()
