"""RunProducer: streams one run's records to the collector, with backpressure, reconnection and resending."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType

import grpc
from opentelemetry import context as otel_context

from plumbing import errors, telemetry
from plumbing.channels import ClientTLS, open_channel
from rallyrobopilot.v1 import collector_pb2_grpc
from rallyrobopilot.v1.collector_pb2 import FrameRecord, IngestRequest, IngestResponse, RunEnd, RunStart

log = logging.getLogger(__name__)

_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED}
_ERROR_OF: dict[grpc.StatusCode, type[errors.DomainError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
}
_CHANNEL_OPTIONS = [
    # Reconnect to a restarted collector within a fraction of a second, not gRPC's default of up to minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
_WAIT_SLICE_S = 0.1


@dataclass(frozen=True)
class ProducerStats:
    """What happened to a run's records, from the producer's side."""

    frames: int  # records given to send()
    acked: int  # records the collector acknowledged (stored, or already stored)
    resent: int  # records sent again after a reconnect
    duplicates: int  # resent records the collector found already stored and skipped
    reconnects: int  # streams opened after the first
    stored_frames: int  # frames Redis holds for the run, as last reported


class RunProducer:
    """Sends one run to a collector from inside a game loop, exactly once into Redis.

    `send()` returns at once while fewer than `window` records await acknowledgement and blocks otherwise
    (backpressure). A background thread runs the Ingest stream; when it breaks (collector restarted,
    UNAVAILABLE) it reconnects with backoff and resends every unacknowledged record, which the collector
    skips if Redis already holds it. After `reconnect_attempts` attempts in a row without progress, once
    `outage_budget_s` has passed since the last progress (a collector or Redis restart is ridden out), or on a
    status that retrying cannot fix (INVALID_ARGUMENT, ...), the next call raises the matching `plumbing.errors`
    exception with the collector's message. No acknowledgement for `timeout_s` while records wait counts as
    a broken stream.
    """

    def __init__(
        self,
        address: str,
        start: RunStart,
        *,
        window: int = 256,
        timeout_s: float = 30.0,
        reconnect_attempts: int = 8,
        stream_deadline_s: float = 6 * 3600.0,
        outage_budget_s: float = 0.0,
        tls: ClientTLS | None = None,
    ) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self.address = address
        self.start = start
        self.window = window
        self.timeout_s = timeout_s
        self.reconnect_attempts = reconnect_attempts
        self.outage_budget_s = outage_budget_s
        self.stream_deadline_s = stream_deadline_s
        self._cond = threading.Condition()
        self._pending: deque[FrameRecord] = deque()  # sent, not yet acknowledged, in tick order
        self._acked = 0  # records acknowledged; the sequence number of _pending[0]
        self._sent = 0  # records given to send()
        self._high_water = 0  # records ever put on a stream; below it, sending again is a resend
        self._resent = 0
        self._duplicates = 0
        self._reconnects = 0
        self._stored_frames = 0
        self._stream_duplicates = 0  # the current stream's running count, as the collector reports it
        self._last_progress = time.monotonic()
        self._finishing = False
        self._end: RunEnd | None = None
        self._done = False
        self._closed = False
        self._stalled = False
        self._error: errors.DomainError | None = None
        self._call: grpc.Future | None = None
        self._channel = telemetry.instrument_channel(open_channel(address, tls, _CHANNEL_OPTIONS), "collector-producer")
        self._stub = collector_pb2_grpc.CollectorServiceStub(self._channel)
        # The stream runs on its own thread: carry the caller's trace context there, so that the collector's
        # spans join the trace of the game server's Record call.
        self._trace_context = otel_context.get_current()
        self._thread = threading.Thread(target=self._run_in_context, daemon=True, name=f"producer-{start.run_id}")
        self._thread.start()

    def _run_in_context(self) -> None:
        token = otel_context.attach(self._trace_context)
        try:
            self._run()
        finally:
            otel_context.detach(token)

    # caller side
    def send(self, record: FrameRecord) -> None:
        """Queues a record (ticks strictly increasing); blocks while `window` records await acknowledgement."""
        with self._cond:
            self._raise_if_failed()
            if self._finishing or self._closed:
                raise errors.FailedPrecondition(f"run {self.start.run_id} is finished; no more records")
            while len(self._pending) >= self.window:
                self._wait()
            if not self._pending:
                self._last_progress = time.monotonic()
            self._pending.append(record)
            self._sent += 1
            self._cond.notify_all()

    def finish(self, end: RunEnd | None = None) -> ProducerStats:
        """Sends the end (its run_id and frames default to this run's) and waits until everything is stored."""
        with self._cond:
            self._raise_if_failed()
            if end is not None:
                end = RunEnd(
                    run_id=end.run_id or self.start.run_id,
                    frames=end.frames or self._sent,
                    finished=end.finished,
                    lap_ticks=end.lap_ticks,
                )
            self._end = end
            self._finishing = True
            self._last_progress = time.monotonic()
            self._cond.notify_all()
            while not self._done:
                self._wait()
        self.close()
        return self.stats()

    def stats(self) -> ProducerStats:
        with self._cond:
            return ProducerStats(
                frames=self._sent,
                acked=self._acked,
                resent=self._resent,
                duplicates=self._duplicates,
                reconnects=self._reconnects,
                stored_frames=self._stored_frames,
            )

    def close(self) -> None:
        """Stops the stream (unacknowledged records are dropped) and releases the channel."""
        with self._cond:
            self._closed = True
            call = self._call
            self._cond.notify_all()
        if call is not None:
            call.cancel()
        if threading.current_thread() is not self._thread:
            self._thread.join(self.timeout_s)
        self._channel.close()

    def __enter__(self) -> RunProducer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _wait(self) -> None:
        """One slice of waiting for the background thread (lock held); a silent collector counts as broken."""
        self._raise_if_failed()
        if self._closed:
            raise errors.FailedPrecondition(f"the producer of run {self.start.run_id} is closed")
        if (
            (self._pending or self._finishing)
            and time.monotonic() - self._last_progress > self.timeout_s
            and not self._stalled
        ):
            log.warning("run %s: no acknowledgement for %.0fs; reconnecting", self.start.run_id, self.timeout_s)
            self._stalled = True
            if self._call is not None:
                self._call.cancel()
        self._cond.wait(_WAIT_SLICE_S)

    # background side
    def _run(self) -> None:
        failures = 0
        outage_since = time.monotonic()
        while True:
            over = threading.Event()
            progressed = False
            code: grpc.StatusCode | None = None
            details = ""
            try:
                call = self._stub.Ingest(self._requests(over), timeout=self.stream_deadline_s)
                with self._cond:
                    if self._closed:
                        call.cancel()
                    self._call = call
                first = True
                for response in call:
                    progressed = self._on_response(response, first) or progressed
                    first = False
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details() or ""
            finally:
                over.set()
            with self._cond:
                self._call = None
                stalled, self._stalled = self._stalled, False
                if self._closed or self._done:
                    return
                if code is not None and code not in _RETRYABLE and not (code == grpc.StatusCode.CANCELLED and stalled):
                    self._fail(_ERROR_OF.get(code, errors.Unavailable), f"{code.name}: {details}")
                    return
                if self._finishing and self._end is None and not self._pending and code is None:
                    self._done = True
                    self._cond.notify_all()
                    return
            if progressed:
                failures, outage_since = 0, time.monotonic()
            else:
                failures += 1
            if failures > self.reconnect_attempts and time.monotonic() - outage_since >= self.outage_budget_s:
                with self._cond:
                    reason = f"{code.name}: {details}" if code is not None else "the stream ended early"
                    self._fail(errors.Unavailable, f"unreachable after {self.reconnect_attempts} reconnects: {reason}")
                return
            delay = min(2.0, 0.1 * 2 ** max(0, failures - 1))
            log.info("run %s: stream broke (%s); reconnecting in %.1fs", self.start.run_id, code, delay)
            with self._cond:
                self._reconnects += 1
                self._cond.wait_for(lambda: self._closed, delay)

    def _fail(self, cls: type[errors.DomainError], reason: str) -> None:
        self._error = cls(f"collector at {self.address}, run {self.start.run_id}: {reason}")
        log.error("%s", self._error)
        self._cond.notify_all()

    def _requests(self, over: threading.Event) -> Iterator[IngestRequest]:
        """One stream's messages: the start, every unacknowledged record, new records, then the end."""
        yield IngestRequest(start=self.start)
        seq = 0
        while True:
            with self._cond:
                seq = max(seq, self._acked)
                while seq >= self._sent and not self._finishing and not over.is_set() and not self._closed:
                    self._cond.wait(_WAIT_SLICE_S)
                if over.is_set() or self._closed:
                    return
                if seq < self._sent:
                    record = self._pending[seq - self._acked]
                    if seq < self._high_water:
                        self._resent += 1
                    seq += 1
                    self._high_water = max(self._high_water, seq)
                    message = IngestRequest(frame=record)
                elif self._end is not None:
                    message = IngestRequest(end=self._end)
                else:
                    return  # finishing without an end: closing our side tells the collector we are done
            yield message
            if message.HasField("end"):
                return

    def _on_response(self, response: IngestResponse, first: bool) -> bool:
        """Applies an acknowledgement; the first response of a stream acknowledges only its RunStart."""
        with self._cond:
            progressed = False
            if not first:
                while self._pending and self._pending[0].tick <= response.acked_through_tick:
                    self._pending.popleft()
                    self._acked += 1
                    progressed = True
            if first:
                self._stream_duplicates = 0
            self._duplicates += response.duplicates - self._stream_duplicates
            self._stream_duplicates = response.duplicates
            self._stored_frames = response.stored_frames
            if response.ended:
                self._done = True
                progressed = True
            if progressed or first:
                self._last_progress = time.monotonic()
            self._cond.notify_all()
            return progressed
