"""A real-time race: every car an autopilot drives on one game server, through one Race stream and one loop.

Per-car Drive streams cost each car a thread, a reader thread and three messages a tick on both sides, and
their clocks drift apart so that their frames batch poorly. A race ticks every car on one server clock: each
tick is one message in (every car's observation), one batched inference request (every car still racing),
and one message out (every car's command and the fallbacks ahead). Each car keeps the per-car rules of
serving.realtime: a deadline per inference, the fallback for a late tick, safe mode when no model answers.
"""

from __future__ import annotations

import contextvars
import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from game_server.client import GameClient, frame_array
from game_server.convert import controls_to_mask, mask_to_controls
from game_server.core.lap import LapWatch
from game_server.core.state import TICK_S
from plumbing.errors import DeadlineExceeded, DomainError
from rallyrobopilot.v1 import game_pb2, sim_pb2
from serving.codec import Decision
from serving.metrics import VersionMeter
from serving.realtime import SEND_MARGIN_S, Ahead, Decisions, Latest, Tracer, end_stream

if TYPE_CHECKING:
    from serving.autopilot import AutopilotConfig, CarLap

log = logging.getLogger(__name__)

LATE_ANSWER_S = 1.0  # how long a request that missed its tick may still answer, its keys then held by fallbacks


class RaceModel(Protocol):
    """Every car's frame of a tick in one request: an answer, or this car's error, per frame."""

    model: str
    version: str

    def infer_many(
        self, frames: Sequence[np.ndarray], speeds: Sequence[float], timeout_s: float
    ) -> list[Decision | DomainError]: ...


@dataclass
class _Car:
    """One car of a race: its lap, its decisions and what it has sent ahead."""

    index: int  # its place in the race (the server's car number)
    record: CarLap
    decisions: Decisions
    meter: VersionMeter
    ahead: Ahead
    watch: LapWatch
    first_tick: int
    racing: bool = True
    applied: list[int] = field(default_factory=list)
    late_commands: int = 0
    missed_ticks: int = 0

    def due(self, t0: float, tick: int) -> float:
        return t0 + (tick - self.first_tick + 1) * TICK_S


class _RaceStream:
    """The Race stream: batches of commands out through a queue, the newest tick in through a reader thread."""

    def __init__(self, game: GameClient, config: AutopilotConfig, cars: list[_Car]) -> None:
        self.game, self.config, self.cars = game, config, cars
        self.outbox: queue.SimpleQueue[game_pb2.RaceRequest | None] = queue.SimpleQueue()
        self.latest = Latest()
        self._responses: Any = None
        self._reader: threading.Thread | None = None

    def open(self, sessions: list[str]) -> float:
        start = game_pb2.RaceStart(session_ids=sessions, with_frames=True)
        self.outbox.put(game_pb2.RaceRequest(start=start))
        t0 = time.perf_counter()
        self.send({car.index: car.ahead.plan(car.first_tick, car.decisions.last_keys, True) for car in self.cars}, [])

        def requests() -> Iterator[game_pb2.RaceRequest]:
            while (item := self.outbox.get()) is not None:
                yield item

        self._responses = self.game.stub.Race(requests(), timeout=self.config.max_ticks * TICK_S * 2 + 60.0)
        self._reader = threading.Thread(target=self._read, daemon=True, name="race-reader")
        self._reader.start()
        return t0

    def _read(self) -> None:
        try:
            for response in self._responses:
                for rc in response.cars:
                    self.cars[rc.car].applied.append(controls_to_mask(rc.drive.applied_controls))
                self.latest.put(response, time.perf_counter())
            self.latest.end()
        except BaseException as exc:  # the stream's end (cancelled, server gone) is handed to the loop
            self.latest.end(exc)

    def send(self, plans: dict[int, list[tuple[int, int]]], leaving: list[int]) -> None:
        commands = [
            game_pb2.RaceCommand(car=car, command=game_pb2.DriveCommand(tick=tick, controls=mask_to_controls(keys)))
            for car, plan in plans.items()
            for tick, keys in plan
        ]
        if commands or leaving:
            self.outbox.put(game_pb2.RaceRequest(commands=game_pb2.RaceCommands(commands=commands, leave=leaving)))

    def ticks(self, stop: threading.Event | None) -> Iterator[tuple[game_pb2.RaceResponse, float]]:
        yield from self.latest.items(stop)

    def close(self, stopping: bool) -> None:
        """Every car leaves and the stream half-closes; the server ends it at its next tick."""
        self.send({}, [car.index for car in self.cars if car.racing])
        self.outbox.put(None)
        end_stream(self._reader, self._responses, stopping)


def race_realtime(
    game: GameClient,
    sessions: list[str],
    firsts: list[sim_pb2.Observation],
    model: RaceModel,
    config: AutopilotConfig,
    records: list[CarLap],
    meters: list[VersionMeter],
    tracer: Tracer,
    stop: threading.Event | None,
    phase: tuple[float, float] | None = None,
) -> None:
    """One lap of every car at once, in real time; each car's record is filled as drive_realtime fills it.

    `phase` (epoch, offset): the race starts its clock `offset` seconds into a tick counted from `epoch`, so
    that the races of one process (one per game server) ask the model server in turn, not all at once."""
    cars = [
        _Car(k, record, Decisions(None, config, record, meter, tracer), meter,
             Ahead(config, config.race_fallback_ticks), LapWatch(config.max_ticks, config.stuck_ticks),
             int(first.state.tick))
        for k, (record, meter, first) in enumerate(zip(records, meters, firsts, strict=True))
    ]  # fmt: skip
    answers = _ask(model, firsts, 10.0)
    for car, answer in zip(cars, answers, strict=True):
        car.record.keys.append(car.decisions.take_first(answer))
    stream = _RaceStream(game, config, cars)
    if phase is not None:
        epoch, offset = phase
        time.sleep((offset - (time.perf_counter() - epoch)) % TICK_S)
    t0 = stream.open(sessions)
    for car in cars:
        car.decisions.safe.last_answer = t0  # silence counts from the start message, not the first inference
    deadline_s = config.deadline_ms / 1e3
    asker = _Asker(model, tracer)
    try:
        for response, received in stream.ticks(stop):
            asking: list[tuple[_Car, sim_pb2.Observation]] = []
            leaving: list[int] = []
            for rc in response.cars:
                car = cars[rc.car]
                if not car.racing:
                    continue
                obs, tick = rc.drive.observation, int(rc.drive.observation.state.tick)
                car.late_commands, car.missed_ticks = int(rc.drive.late_commands), int(rc.drive.missed_ticks)
                car.record.frame_ms.append((received - car.due(t0, tick - 1)) * 1e3)
                done = car.record.observe(car.watch, obs)
                car.meter.tick(car.record.ticks, car.missed_ticks)
                if done:
                    car.racing = False
                    leaving.append(car.index)
                else:
                    asking.append((car, obs))
            if not asking:
                stream.send({}, leaving)
                if not any(car.racing for car in cars):
                    break
                continue
            first, tick = asking[0][0], int(asking[0][1].state.tick)
            with tracer.tick(first.index, tick):  # a sampled tick's trace: the race's frame, request and commands
                with tracer.span("autopilot.frame", **{"rrp.frame_ms": first.record.frame_ms[-1]}):
                    pass
                due = first.due(t0, tick)
                budget = min(deadline_s - (time.perf_counter() - received), due - time.perf_counter() - SEND_MARGIN_S)
                settled = asker.decide(asking, budget)
                with tracer.span("autopilot.command", **{"rrp.cars": len(asking)}):
                    plans: dict[int, list[tuple[int, int]]] = {}
                    now = time.perf_counter()
                    for (car, obs), (keys, answered) in zip(asking, settled, strict=True):
                        coasting_in_time = car.decisions.safe.on and car.due(t0, int(obs.state.tick)) > now
                        plans[car.index] = car.ahead.plan(int(obs.state.tick), keys, own=answered or coasting_in_time)
                        car.record.keys.append(keys)
                    stream.send(plans, leaving)
            sent = time.perf_counter()
            for car, obs in asking:
                car.record.slack_ms.append((car.due(t0, int(obs.state.tick)) - sent) * 1e3)
        if stream.latest.error is not None and any(car.racing for car in cars):
            raise stream.latest.error
    finally:
        asker.close()
        stream.close(stopping=stop is not None and stop.is_set())
        for car in cars:
            r = car.record
            r.skipped_frames = stream.latest.skipped  # the race's: a skipped tick skips every car's frame
            r.late_commands, r.missed_ticks = car.late_commands, car.missed_ticks
            car.meter.tick(r.ticks, r.missed_ticks)
            r.outcome = car.watch.stop()
            r.applied = list(car.applied)


def _ask(model: RaceModel, observations: list[sim_pb2.Observation], timeout_s: float) -> list[Decision | DomainError]:
    frames = [frame_array(obs.frame) for obs in observations]
    return model.infer_many(frames, [obs.state.car.speed_m_per_s for obs in observations], timeout_s)


class _Asker:
    """A race's requests, one outstanding at a time: a request not answered within its tick's budget goes on,
    and its answer, when it comes, is what the cars' fallbacks hold from then on (fresher keys than the last
    answer in time: under overload a car drives a tick or two behind rather than on stale keys or coasting).
    While it is outstanding the race asks nothing new, so an overloaded model server never holds more than one
    request of a race."""

    def __init__(self, model: RaceModel, tracer: Tracer) -> None:
        self.model, self.tracer = model, tracer
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="race-inference")
        self._late: tuple[Future[list[Decision | DomainError]], list[_Car]] | None = None

    def decide(self, asking: list[tuple[_Car, sim_pb2.Observation]], budget_s: float) -> list[tuple[int, bool]]:
        """Each asking car's keys this tick, and whether the model answered them in time."""
        tick = int(asking[0][1].state.tick)
        self._take_late(tick)
        if self._late is not None or budget_s <= 0.001:
            return [car.decisions.settle(int(obs.state.tick), None) for car, obs in asking]
        t_inf = time.perf_counter()
        with self.tracer.span("autopilot.inference", **{"rrp.model": self.model.model, "rrp.cars": len(asking)}):
            # The request runs on the pool's thread, in this tick's trace context (its gRPC span is the tick's).
            future = self._pool.submit(
                contextvars.copy_context().run, _ask, self.model, [obs for _, obs in asking], LATE_ANSWER_S
            )
            try:
                answers = future.result(timeout=budget_s)
            except FutureTimeout:
                self._late = (future, [car for car, _ in asking])
                late = DeadlineExceeded("no answer from the model server within the deadline")
                return [car.decisions.settle(int(obs.state.tick), late) for car, obs in asking]
        ms = (time.perf_counter() - t_inf) * 1e3
        out = []
        for (car, obs), answer in zip(asking, answers, strict=True):
            settled = answer if isinstance(answer, DomainError) else (answer.keys, ms)
            out.append(car.decisions.settle(int(obs.state.tick), settled))
        return out

    def _take_late(self, tick: int) -> None:
        if self._late is None or not self._late[0].done():
            return
        future, cars = self._late
        self._late = None
        for car, answer in zip(cars, future.result(), strict=True):
            if isinstance(answer, Decision) and car.racing:
                car.decisions.late_answer(answer.keys, tick)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
