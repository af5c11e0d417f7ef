"""The autopilot's real-time lap: 25 Hz of wall clock, a deadline per inference, a fallback for every late tick.

Four parts, each small: the tick clock (when each tick is due and how much of it is left), the Drive stream
(commands out, the newest observation in, closed in one place), the decision of each tick (the model's answer
within the budget, else the fallback, or coasting in safe mode while no model server answers) and the loop
that ties them to the lap's stop rules.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from game_server.client import GameClient, frame_array
from game_server.convert import controls_to_mask, mask_to_controls
from game_server.core.lap import LapWatch
from game_server.core.state import TICK_S
from plumbing import telemetry
from plumbing.errors import DomainError
from rallyrobopilot.v1 import game_pb2, sim_pb2
from serving.client import InferenceClient
from serving.codec import Decision
from serving.metrics import VersionMeter

if TYPE_CHECKING:
    from serving.autopilot import AutopilotConfig, CarLap

log = logging.getLogger(__name__)

TRANSIENT = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED")  # worth another try on the next tick
SEND_MARGIN_S = 0.002  # a command must leave this long before its tick is due to arrive in time


def fallback_keys(config: AutopilotConfig, last: int) -> int:
    """The defined command of a tick whose inference was late: the last keys, or none."""
    return last if config.fallback == "hold" else 0


def infer(model: InferenceClient, obs: sim_pb2.Observation, timeout_s: float) -> Decision:
    return model.infer(frame_array(obs.frame), obs.state.car.speed_m_per_s, timeout_s)


def command(tick: int, keys: int) -> game_pb2.DriveRequest:
    return game_pb2.DriveRequest(command=game_pb2.DriveCommand(tick=tick, controls=mask_to_controls(keys)))


class Tracer:
    """Spans for one sampled tick in `trace_every` (frame, inference, command), when tracing is on."""

    def __init__(self, every: int) -> None:
        provider = telemetry.tracer_provider("rrp-autopilot")
        self.tracer = provider.get_tracer("rrp.autopilot") if provider is not None else None
        self.every = max(1, every)

    def tick(self, car: int, tick: int) -> contextlib.AbstractContextManager[Any]:
        if self.tracer is None or tick % self.every:
            return contextlib.nullcontext()
        return self.tracer.start_as_current_span("autopilot.tick", attributes={"rrp.car": car, "rrp.tick": tick})

    def span(self, name: str, **attributes: Any) -> contextlib.AbstractContextManager[Any]:
        from opentelemetry import trace

        if self.tracer is None or not trace.get_current_span().is_recording():
            return contextlib.nullcontext()
        return self.tracer.start_as_current_span(name, attributes=attributes)


class Clock:
    """The server's clock, started by the start message: tick k is due at t0 + (k - first + 1) * 40 ms."""

    def __init__(self, first_tick: int) -> None:
        self.first_tick, self.t0 = first_tick, time.perf_counter()

    def start(self) -> float:
        self.t0 = time.perf_counter()
        return self.t0

    def due(self, tick: int) -> float:
        return self.t0 + (tick - self.first_tick + 1) * TICK_S

    def budget_s(self, tick: int, received: float, deadline_s: float) -> float:
        """Time left for this tick's inference: its deadline from the frame's arrival, or the tick's due time."""
        now = time.perf_counter()
        return min(deadline_s - (now - received), self.due(tick) - now - SEND_MARGIN_S)


class Latest:
    """The newest observation of a Drive stream: a slow tick skips stale frames instead of queueing behind them."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: tuple[game_pb2.DriveResponse, float] | None = None
        self.skipped = 0
        self.ended = False
        self.error: BaseException | None = None

    def put(self, response: game_pb2.DriveResponse, received: float) -> None:
        with self._cond:
            if self._item is not None:
                self.skipped += 1
            self._item = (response, received)
            self._cond.notify()

    def end(self, error: BaseException | None = None) -> None:
        with self._cond:
            self.ended, self.error = True, error
            self._cond.notify()

    def items(self, stop: threading.Event | None) -> Iterator[tuple[Any, float]]:
        """Each newest message with the time it arrived, until the stream ends or `stop` is set."""
        while stop is None or not stop.is_set():
            item = self.take(timeout_s=1.0)
            if item is None:
                if self.ended:
                    return
                continue
            yield item

    def take(self, timeout_s: float) -> tuple[game_pb2.DriveResponse, float] | None:
        with self._cond:
            self._cond.wait_for(lambda: self._item is not None or self.ended, timeout_s)
            item, self._item = self._item, None
            return item


class Ahead:
    """What a car sends for a tick: its own command, and the fallback of the `fallback_ticks` ticks after it."""

    def __init__(self, config: AutopilotConfig, ticks: int | None = None) -> None:
        self.config, self.ticks = config, config.fallback_ticks if ticks is None else ticks
        self._keys: int | None = None  # the fallback the ticks up to `_until` already hold
        self._until = -1

    def plan(self, tick: int, keys: int, own: bool) -> list[tuple[int, int]]:
        """(tick, keys) to send: `tick`'s own command when `own`, then the fallbacks ahead not sent yet.

        Ticks ahead that already hold this fallback are not sent again: with steady keys a tick costs two
        commands (its own and the newest tick's fallback) instead of 1 + `fallback_ticks`, on both sides
        of the stream, which is most of the per-car cost once many cars race."""
        fallback = fallback_keys(self.config, keys)
        out = [(tick, keys)] if own else []
        last = tick + self.ticks
        first = tick + 1 if fallback != self._keys else max(tick + 1, self._until + 1)
        out += [(ahead, fallback) for ahead in range(first, last + 1)]
        self._keys, self._until = fallback, max(self._until, last)
        return out


def end_stream(reader: threading.Thread | None, responses: Any, stopping: bool) -> None:
    """Waits for a half-closed stream's reader to see its end: within a second when stopping (SIGTERM), else five;
    then the stream is cancelled."""
    if reader is None:
        return
    deadline = time.monotonic() + (1.0 if stopping else 5.0)
    while reader.is_alive() and time.monotonic() < deadline:
        reader.join(0.1)
    if reader.is_alive():
        responses.cancel()


class _Stream:
    """A real-time Drive stream: commands out through a queue, the newest observation in through a reader thread.

    Each command goes out with the fallback of the next `fallback_ticks` ticks, so that a stall of either side
    leaves those ticks the fallback rather than no command (the server keeps the last command it got for a tick).
    """

    def __init__(self, game: GameClient, config: AutopilotConfig, car: int) -> None:
        self.game, self.config, self.car = game, config, car
        self.outbox: queue.SimpleQueue[game_pb2.DriveRequest | None] = queue.SimpleQueue()
        self.latest = Latest()
        self.last_response: game_pb2.DriveResponse | None = None
        self._responses: Any = None
        self._reader: threading.Thread | None = None
        self.ahead = Ahead(config)
        self.applied: list[int] = []  # the controls each tick ran with, every answer's (also the skipped ones)

    def open(self, session: str, clock: Clock, first_keys: int) -> None:
        """Starts the stream (and the server's clock) with the first tick's command and its fallbacks ahead."""
        start = game_pb2.DriveStart(session_id=session, mode=game_pb2.DRIVE_MODE_REALTIME, with_frames=True)
        self.outbox.put(game_pb2.DriveRequest(start=start))
        clock.start()
        self.send(clock.first_tick, first_keys, own=True)

        def requests() -> Iterator[game_pb2.DriveRequest]:
            while (item := self.outbox.get()) is not None:
                yield item

        self._responses = self.game.stub.Drive(requests(), timeout=self.config.max_ticks * TICK_S * 2 + 60.0)
        self._reader = threading.Thread(target=self._read, daemon=True, name=f"drive-reader-{self.car}")
        self._reader.start()

    def _read(self) -> None:
        try:
            for response in self._responses:
                self.applied.append(controls_to_mask(response.applied_controls))
                self.latest.put(response, time.perf_counter())
            self.latest.end()
        except BaseException as exc:  # the stream's end (cancelled, server gone) is handed to the loop
            self.latest.end(exc)

    def send(self, tick: int, keys: int, own: bool) -> None:
        for t, k in self.ahead.plan(tick, keys, own):
            self.outbox.put(command(t, k))

    def observations(self, stop: threading.Event | None) -> Iterator[tuple[game_pb2.DriveResponse, float]]:
        """Each newest observation with the time it arrived, until the stream ends or `stop` is set."""
        for item in self.latest.items(stop):
            self.last_response = item[0]
            yield item

    def close(self, stopping: bool) -> None:
        """Half-closes (the server ends the stream at its next tick without a command) and waits for the end:
        stopping (SIGTERM) keeps within a grace period, a second, then the stream is cancelled."""
        self.outbox.put(None)
        end_stream(self._reader, self._responses, stopping)


class _SafeMode:
    """Coasting while no model server answers, rather than holding keys chosen seconds ago into a wall.

    Entered after `safe_after_failures` failed inferences in a row (a late answer neither counts nor resets)
    or `safe_after_ms` without any answer (a worker being restarted leaves calls unanswered, not failed); left
    at the next answer. Entry and exit are logged once each, not the failures between them.
    """

    def __init__(self, config: AutopilotConfig, record: CarLap, meter: VersionMeter) -> None:
        self.after_failures, self.after_s = config.safe_after_failures, config.safe_after_ms / 1e3
        self.record, self.meter = record, meter
        self.on, self.failures, self.last_answer, self.since_tick = False, 0, time.perf_counter(), 0
        self.last_error = ""

    def answered(self, tick: int) -> None:
        self.failures, self.last_answer = 0, time.perf_counter()
        if self.on:
            self.on = False
            log.warning(
                "car %d tick %d: the model server answers again: safe mode left after %d ticks",
                self.record.car, tick, tick - self.since_tick,
            )  # fmt: skip

    def failed(self, exc: DomainError) -> None:
        self.failures, self.last_error = self.failures + 1, str(exc)

    def coasting(self, tick: int) -> bool:
        """Whether this unanswered tick coasts; counts it if so."""
        silent_s = time.perf_counter() - self.last_answer
        if not self.on and (self.failures >= self.after_failures or silent_s >= self.after_s):
            self.on, self.since_tick = True, tick
            why = self.last_error if self.failures >= self.after_failures else f"no answer for {silent_s * 1e3:.0f} ms"
            log.warning("car %d tick %d: safe mode, coasting until the model server answers: %s", self.record.car,
                        tick, why)  # fmt: skip
        if self.on:
            self.record.safe_ticks += 1
            self.meter.safe_ticks.inc()
        return self.on


class Decisions:
    """Each tick's keys: the model's answer within the budget, else the fallback, or coasting in safe mode."""

    def __init__(
        self,
        model: InferenceClient | None,  # None: the answers come from elsewhere (a race asks for all its cars)
        config: AutopilotConfig,
        record: CarLap,
        meter: VersionMeter,
        tracer: Tracer,
    ) -> None:
        self.model, self.config, self.record, self.meter, self.tracer = model, config, record, meter, tracer
        self.safe = _SafeMode(config, record, meter)
        self.last_keys = 0  # the model's last answer: what "hold" holds

    def first(self, obs: sim_pb2.Observation) -> int:
        """The first command, decided before the stream opens (the clock starts with the start message).

        An error here that retrying cannot fix (no token, a wrong one, an unknown model, a refused input) stops
        the car with that error; once racing, every failure gets the fallback and the car keeps driving."""
        assert self.model is not None
        try:
            answer: Decision | DomainError = infer(self.model, obs, timeout_s=10.0)
        except DomainError as exc:
            answer = exc
        return self.take_first(answer)

    def take_first(self, answer: Decision | DomainError) -> int:
        if isinstance(answer, DomainError):
            if answer.code not in TRANSIENT:
                raise answer
            self._failed(answer)
            log.warning("car %d: first inference failed: %s", self.record.car, answer)
        else:
            self.last_keys = answer.keys
        return self.last_keys

    def decide(self, obs: sim_pb2.Observation, tick: int, budget_s: float) -> tuple[int, bool]:
        """This tick's keys, and whether the model answered them (else they are the fallback, or coasting)."""
        if budget_s <= 0.001:
            return self.settle(tick, None)
        assert self.model is not None
        t_inf = time.perf_counter()
        try:
            with self.tracer.span("autopilot.inference", **{"rrp.model": self.model.model}):
                keys = infer(self.model, obs, timeout_s=budget_s).keys
        except DomainError as exc:
            return self.settle(tick, exc)
        return self.settle(tick, (keys, (time.perf_counter() - t_inf) * 1e3))

    def settle(self, tick: int, answer: tuple[int, float] | DomainError | None) -> tuple[int, bool]:
        """This tick's keys from its answer: (keys, ms), an error, or None (no time to ask)."""
        r = self.record
        keys, answered = fallback_keys(self.config, self.last_keys), False
        if answer is None:
            self._fallback()
        elif isinstance(answer, DomainError):
            self._fallback()
            if answer.code != "DEADLINE_EXCEEDED":
                self._failed(answer)
                if not self.safe.on:  # while coasting, only safe mode's entry and exit are logged
                    log.warning("car %d tick %d: inference failed, fallback: %s", r.car, tick, answer)
        else:
            keys, ms = answer
            r.inference_ms.append(ms)
            self.meter.inference.observe(ms / 1e3)
            self.last_keys, answered = keys, True
            self.safe.answered(tick)
        if not answered and self.safe.coasting(tick):
            keys = 0  # this tick and the fallbacks sent ahead coast
        return keys, answered

    def late_answer(self, keys: int, tick: int) -> None:
        """An answer that came after its tick's deadline (a race keeps it): the keys a fallback holds from now on,
        and a sign that the model server lives (safe mode is for a server that answers nothing)."""
        self.last_keys = keys
        self.safe.answered(tick)

    def _fallback(self) -> None:
        self.record.fallbacks += 1
        self.meter.fallbacks.inc()

    def _failed(self, exc: DomainError) -> None:
        self.record.inference_errors += 1
        self.meter.inference_errors.inc()
        self.safe.failed(exc)


def drive_realtime(
    game: GameClient,
    session: str,
    first: sim_pb2.Observation,
    model: InferenceClient,
    config: AutopilotConfig,
    record: CarLap,
    meter: VersionMeter,
    tracer: Tracer,
    stop: threading.Event | None,
) -> None:
    """One lap in real time: the server ticks at 25 Hz from the start message, whatever the model does."""
    watch = LapWatch(config.max_ticks, config.stuck_ticks)
    decisions = Decisions(model, config, record, meter, tracer)
    record.keys.append(decisions.first(first))
    clock = Clock(int(first.state.tick))
    stream = _Stream(game, config, record.car)
    stream.open(session, clock, decisions.last_keys)
    decisions.safe.last_answer = clock.t0  # silence counts from the start message, not from a slow first inference
    try:
        for response, received in stream.observations(stop):
            obs = response.observation
            tick = int(obs.state.tick)
            record.frame_ms.append((received - clock.due(tick - 1)) * 1e3)
            done = record.observe(watch, obs)
            meter.tick(record.ticks, int(response.missed_ticks))
            if done:
                break
            with tracer.tick(record.car, tick):
                with tracer.span("autopilot.frame", **{"rrp.frame_ms": record.frame_ms[-1]}):
                    pass
                # This tick's fallback is already on the server (sent with the previous commands): the model's
                # answer replaces it only if it comes within the deadline.
                keys, answered = decisions.decide(obs, tick, clock.budget_s(tick, received, config.deadline_ms / 1e3))
                with tracer.span("autopilot.command", **{"rrp.keys": keys, "rrp.fallback": not answered}):
                    coasting_in_time = decisions.safe.on and clock.due(tick) > time.perf_counter()
                    stream.send(tick, keys, own=answered or coasting_in_time)
                record.slack_ms.append((clock.due(tick) - time.perf_counter()) * 1e3)
                record.keys.append(keys)
        if stream.latest.error is not None and not watch.stopped:
            raise stream.latest.error
    finally:
        # Counted now: after the lap the server still simulates the ticks that hold a fallback ahead.
        record.skipped_frames = stream.latest.skipped
        stream.close(stopping=stop is not None and stop.is_set())
        if stream.last_response is not None:
            record.late_commands = int(stream.last_response.late_commands)
            record.missed_ticks = int(stream.last_response.missed_ticks)
            meter.tick(record.ticks, record.missed_ticks)
        record.outcome = watch.stop()
        record.applied = list(stream.applied)
