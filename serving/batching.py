"""One request per round for every car of an autopilot process: cars submit their frame, one sender packs them.

Each car (a thread) hands its frame and speed to the `Batcher` and waits for its answer until its own deadline,
as it would on its own call. A sender thread sends whatever is pending as one batched request (see
serving.codec) as soon as every live car has submitted, or a short window after the oldest pending frame, and
hands each car its own answer: N cars cost one call per round, not N calls (and N Python threads in gRPC) per
tick. There are `in_flight` senders, each with its own client (one outstanding call each, as serving.client's
rule is): a car whose frame comes just after a batch left is sent by the next sender at once instead of waiting
a whole round trip (with one sender, cars whose ticks fall just after another's were late tick after tick),
and the model server never holds more than `in_flight` requests of one autopilot process.

A sampled tick's trace context travels with its frame: the batch's gRPC call is a span of the first traced
tick among its cars. A car whose deadline passes first falls back as before; its frame is withdrawn if not
sent yet, and a later answer is dropped. A car's next frame replaces its unsent one, so no car ever has more
than one frame pending.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from opentelemetry import context as otel_context
from opentelemetry import trace

from plumbing.errors import DeadlineExceeded, DomainError, InvalidArgument
from serving.client import BatchInferenceClient, InferenceClient
from serving.codec import MAX_BATCH, Decision, check_frame_array, encode_speed
from serving.replicas import FailoverClient

log = logging.getLogger(__name__)

BatchTarget = BatchInferenceClient | FailoverClient
SETTLE_S = 5.0  # the longest a sender waits for its late call's answer before taking frames again


@dataclass
class _Item:
    frame: np.ndarray
    speed: float
    deadline: float
    submitted: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    answer: Decision | DomainError | None = None
    context: otel_context.Context = field(default_factory=otel_context.get_current)  # the car's tick, if traced


class Batcher:
    """The shared sender of one model's requests; `car()` is each car's `InferenceClient`."""

    def __init__(
        self,
        connect: Callable[[], BatchTarget],
        window_s: float = 0.002,
        in_flight: int = 2,
        max_batch: int = MAX_BATCH,
    ) -> None:
        if not 0 <= window_s <= 1 or not 1 <= max_batch <= MAX_BATCH or not 1 <= in_flight <= 16:
            raise InvalidArgument(f"batch window 0..1000 ms, batch size 1..{MAX_BATCH}, 1..16 requests in flight")
        self.window_s, self.max_batch = window_s, max_batch
        self.clients = [connect() for _ in range(in_flight)]
        self.model, self.version = self.clients[0].model, self.clients[0].version
        self._cond = threading.Condition()
        self._pending: dict[int, _Item] = {}  # car slot -> its frame waiting to be sent
        self._live: set[int] = set()
        self._slots = 0
        self._closed = False
        self.sizes: list[int] = []  # frames per request sent: how well the cars were batched
        self._senders = [
            threading.Thread(target=self._run, args=(client,), name=f"batcher-{self.model}-{k}", daemon=True)
            for k, client in enumerate(self.clients)
        ]
        for sender in self._senders:
            sender.start()

    def car(self) -> CarClient:
        with self._cond:
            slot, self._slots = self._slots, self._slots + 1
            self._live.add(slot)
        return CarClient(self, slot)

    def submit(self, slot: int, frame: np.ndarray, speed: float, timeout_s: float) -> Decision:
        check_frame_array(frame)
        encode_speed(speed)  # a bad speed is this car's error, not the batch's
        item = _Item(frame, speed, time.monotonic() + timeout_s)
        with self._cond:
            if self._closed:
                raise DeadlineExceeded("the batcher is closed")
            self._pending[slot] = item
            self._cond.notify_all()
        if not item.done.wait(timeout_s):
            with self._cond:
                if self._pending.get(slot) is item:
                    del self._pending[slot]
            raise DeadlineExceeded("no answer from the model server within the deadline")
        if isinstance(item.answer, DomainError):
            raise item.answer
        assert item.answer is not None
        return item.answer

    def leave(self, slot: int) -> None:
        with self._cond:
            self._live.discard(slot)
            self._pending.pop(slot, None)
            self._cond.notify_all()

    def _gather(self) -> list[_Item] | None:
        """The next batch: every live car's frame, or what is pending a window after the oldest; None: closed."""
        with self._cond:
            while True:
                self._cond.wait_for(lambda: bool(self._pending) or self._closed)
                if self._closed:
                    return None
                oldest = min(item.submitted for item in self._pending.values())
                while len(self._pending) < min(len(self._live), self.max_batch) and not self._closed:
                    left = oldest + self.window_s - time.monotonic()
                    if left <= 0 or not self._pending:
                        break
                    self._cond.wait(left)
                if self._pending:
                    break
            slots = list(self._pending)[: self.max_batch]
            return [self._pending.pop(slot) for slot in slots]

    def _run(self, client: BatchTarget) -> None:
        while (items := self._gather()) is not None:
            now = time.monotonic()
            items = [item for item in items if item.deadline > now]  # the rest have fallen back already
            if not items:
                continue
            self.sizes.append(len(items))
            error: DomainError = DeadlineExceeded("no answer")
            traced = next((i.context for i in items if trace.get_current_span(i.context).is_recording()), None)
            token = otel_context.attach(traced) if traced is not None else None
            try:
                answers: list[Decision | InvalidArgument] | None = client.infer_batch(
                    [i.frame for i in items], [i.speed for i in items], max(i.deadline for i in items) - now
                )
            except DomainError as exc:
                answers, error = None, exc
            except Exception as exc:  # a bug must not leave every car waiting on a dead sender
                log.exception("batched inference failed")
                answers, error = None, DeadlineExceeded(f"batched inference failed: {exc}")
            finally:
                if token is not None:
                    otel_context.detach(token)
            for k, item in enumerate(items):
                item.answer = answers[k] if answers is not None else error
                item.done.set()
            if answers is None and isinstance(error, DeadlineExceeded):
                # Its call still runs on the server (calls are never cancelled): until it is answered this
                # sender's client would refuse every batch at once, so it waits and leaves the frames to the others.
                settle = getattr(client, "settle", None)
                if settle is not None:
                    settle(SETTLE_S)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for sender in self._senders:
            sender.join(5.0)
        for client in self.clients:
            client.close()


class CarClient:
    """One car's `InferenceClient` over the shared batcher; `close` is the car leaving (the batcher stays)."""

    def __init__(self, batcher: Batcher, slot: int) -> None:
        self.batcher, self.slot = batcher, slot
        self.model, self.version = batcher.model, batcher.version

    def infer(self, frame: np.ndarray, speed_m_per_s: float, timeout_s: float) -> Decision:
        return self.batcher.submit(self.slot, frame, speed_m_per_s, timeout_s)

    def close(self) -> None:
        self.batcher.leave(self.slot)


class RacePool:
    """The requests of races (serving.race): one call per race and tick, each on a client no other call holds.

    A client whose call came late is still busy with it (calls are never cancelled): it goes to the back of
    the line, and a race finding no client free makes one more, up to `MAX_CLIENTS`; past that its tick falls
    back. Races call from their own threads, one call each at a time.
    """

    MAX_CLIENTS = 16

    def __init__(self, connect: Callable[[], BatchTarget], in_flight: int = 2) -> None:
        self.connect = connect
        self.clients = [connect() for _ in range(max(1, in_flight))]
        self.model, self.version = self.clients[0].model, self.clients[0].version
        self._free = list(self.clients)
        self._lock = threading.Lock()
        self.sizes: list[int] = []

    def infer_many(
        self, frames: Sequence[np.ndarray], speeds: Sequence[float], timeout_s: float
    ) -> list[Decision | DomainError]:
        client = self._take()
        if client is None:
            return [DeadlineExceeded(f"all {self.MAX_CLIENTS} model clients of this process are busy")] * len(frames)
        try:
            self.sizes.append(len(frames))
            answers: list[Decision | DomainError] = list(client.infer_batch(list(frames), list(speeds), timeout_s))
            return answers
        except DomainError as exc:
            return [exc] * len(frames)
        finally:
            with self._lock:
                self._free.append(client)

    def _take(self) -> BatchTarget | None:
        with self._lock:
            if self._free:
                return self._free.pop(0)
            if len(self.clients) >= self.MAX_CLIENTS:
                return None
            client = self.connect()
            self.clients.append(client)
            return client

    def close(self) -> None:
        for client in self.clients:
            client.close()


class Batchers:
    """One batcher per model version, made on first use; `connect(version)` is a car's client of it."""

    def __init__(self, make: Callable[[str], BatchTarget], window_s: float, in_flight: int = 2) -> None:
        self.make, self.window_s, self.in_flight = make, window_s, in_flight
        self._lock = threading.Lock()
        self._batchers: dict[str, Batcher] = {}
        self._races: dict[str, RacePool] = {}

    def race(self, version: str = "") -> RacePool:
        """The requests of this process's races on `version`, made on first use."""
        with self._lock:
            if version not in self._races:
                self._races[version] = RacePool(lambda: self.make(version), self.in_flight)
            return self._races[version]

    def connect(self, version: str = "") -> InferenceClient:
        with self._lock:
            if version not in self._batchers:
                self._batchers[version] = Batcher(lambda: self.make(version), self.window_s, self.in_flight)
            return self._batchers[version].car()

    def _all(self) -> list[Batcher | RacePool]:
        return [*self._batchers.values(), *self._races.values()]

    def sizes(self) -> list[int]:
        return [n for b in self._all() for n in b.sizes]

    def replica_calls(self) -> dict[str, dict[str, float]]:
        """Per model server replica: answered requests, and the wall-clock time of its first answer."""
        out: dict[str, dict[str, float]] = {}
        for batcher in self._all():
            for client in batcher.clients:
                if isinstance(client, FailoverClient):
                    for target, n in client.calls.items():
                        row = out.setdefault(target, {"requests": 0, "first_answer": client.first_answer[target]})
                        row["requests"] += n
                        row["first_answer"] = min(row["first_answer"], client.first_answer[target])
        return out

    def close(self) -> None:
        for batcher in self._all():
            batcher.close()
