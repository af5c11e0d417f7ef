"""The autopilot: drives game sessions through the Drive stream from camera frames alone, asking a model server.

Each tick's frame goes to the model server; the keys come back as the command for a named tick. In real time
(25 Hz of wall clock) the autopilot owns the 40 ms budget: each inference has a deadline, and the fallback
command of the next `fallback_ticks` ticks is sent ahead with each tick's command, so that a late or failed
inference, or a stall of either side, leaves a tick its fallback rather than no command at all (the server
keeps the last command it got for a tick before simulating it); the game server counts
late commands and missed ticks, the autopilot counts fallbacks, skipped frames and the latency of each hop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from game_server.client import GameClient, frame_array
from game_server.core.state import TICK_S
from plumbing import telemetry
from plumbing.errors import DomainError, InvalidArgument, quote
from plumbing.settings import setting
from rallyrobopilot.v1 import game_pb2, sim_pb2
from serving.client import InferenceClient
from serving.codec import Decision
from serving.metrics import REROUTES, UncountedMeter, VersionMeter
from serving.registry import Router

log = logging.getLogger(__name__)

FALLBACKS = ("hold", "coast")
TRANSIENT = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED")  # worth another try on the next tick


@dataclass(frozen=True)
class AutopilotConfig:
    """One autopilot run: where, how many cars and laps, and the real-time budget."""

    track: str = setting("kidney", "track to race: a built-in name or gen-<seed>")
    mode: Literal["realtime", "lockstep"] = setting(
        "realtime",
        "realtime: 25 Hz wall clock, late inferences fall back; lockstep: one tick per command",
        switches=True,
    )
    laps: int = setting(1, "laps per car, each from the track's start line")
    cars: int = setting(1, "cars racing at once, spread over the game servers, sharing the model server")
    max_ticks: int = setting(3000, "tick budget per lap (120 s at 25 Hz)")
    stuck_ticks: int = setting(250, "end a lap after this many ticks without new progress (0: never)")
    width: int = setting(128, "frame width the model takes, pixels")
    height: int = setting(96, "frame height the model takes, pixels")
    deadline_ms: float = setting(
        28.0, "real time: an inference not answered this long after its frame arrived gets the fallback command"
    )
    fallback: Literal["hold", "coast"] = setting(
        "hold", "command of a late tick: hold the last keys the model chose, or coast (no keys)"
    )
    fallback_ticks: int = setting(
        5,
        "real time: ticks ahead that already hold the fallback command, so a stall of the autopilot or the "
        "game server up to this long drives on the fallback instead of missing ticks",
    )
    safe_after_failures: int = setting(
        3,
        "real time: after this many ticks in a row whose inference failed (server down, no model, refused), "
        "coast (no keys) until the model server answers again",
    )
    safe_after_ms: float = setting(
        500.0,
        "real time: coast as well after this long without any answer (a worker being restarted answers nothing)",
    )
    lockstep_hz: float = setting(
        0.0, "lockstep: at most this many ticks a second, leaving a shared model server to others (0: no limit)"
    )
    randomize: bool = setting(False, "domain-randomised frames")
    seed: int = setting(0, "seed of the frames' randomisation")
    trace_every: int = setting(25, "with tracing on, one tick in this many becomes a trace (frame, inference, command)")

    def __post_init__(self) -> None:
        if self.mode not in ("realtime", "lockstep"):
            raise InvalidArgument(f"mode {quote(self.mode)}: realtime or lockstep")
        if self.fallback not in FALLBACKS:
            raise InvalidArgument(f"fallback {quote(self.fallback)}: one of {', '.join(FALLBACKS)}")
        if self.laps < 1 or self.cars < 1 or self.max_ticks < 1:
            raise InvalidArgument("laps, cars and max ticks must be at least 1")
        if not 1 <= self.fallback_ticks <= 100:
            raise InvalidArgument("fallback ticks must be 1..100")
        if not 1.0 <= self.deadline_ms <= 1000.0:
            raise InvalidArgument("the inference deadline must be 1..1000 ms")
        if self.safe_after_failures < 1 or self.safe_after_ms < self.deadline_ms:
            raise InvalidArgument("safe after failures must be at least 1, safe after ms at least the deadline")


@dataclass
class LapRecord:
    """One lap of one car: outcome, what the model chose each tick, and the real-time accounting."""

    car: int
    lap: int
    server: str
    version: str = ""  # the model version the lap started on ("" = the server's default)
    rerouted: bool = False  # its version left the routing mid-lap (rolled back) and the default took over
    finished: bool = False
    lap_ticks: int = 0
    ticks: int = 0
    progress_fraction: float = 0.0
    wall_contacts: int = 0  # ticks touching a wall
    stop_reason: str = ""
    keys: list[int] = field(default_factory=list)  # the command sent for each tick, in tick order
    late_commands: int = 0  # the game server's count: commands that arrived after their tick
    missed_ticks: int = 0  # the game server's count: ticks simulated without a command of their own
    fallbacks: int = 0  # ticks whose command was the fallback (inference late or failed)
    safe_ticks: int = 0  # of those, ticks coasting because no model server answered (safe mode)
    inference_errors: int = 0
    skipped_frames: int = 0  # observations dropped because a newer one had already arrived
    frame_ms: list[float] = field(default_factory=list)  # tick due -> its observation received
    inference_ms: list[float] = field(default_factory=list)  # request -> answer, answered ones only
    slack_ms: list[float] = field(default_factory=list)  # command sent -> the tick it names is due
    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "car": self.car,
            "lap": self.lap,
            "server": self.server,
            "version": self.version,
            "rerouted": self.rerouted,
            "finished": self.finished,
            "lap_ticks": self.lap_ticks,
            "lap_s": round(self.lap_ticks * TICK_S, 2),
            "ticks": self.ticks,
            "progress_fraction": round(self.progress_fraction, 4),
            "stop_reason": self.stop_reason,
            "late_commands": self.late_commands,
            "missed_ticks": self.missed_ticks,
            "fallbacks": self.fallbacks,
            "safe_ticks": self.safe_ticks,
            "inference_errors": self.inference_errors,
            "skipped_frames": self.skipped_frames,
        }


@dataclass
class AutopilotResult:
    """Every lap of every car, with the totals and latency percentiles the report shows."""

    config: AutopilotConfig
    laps: list[LapRecord]
    wall_s: float

    def totals(self) -> dict[str, Any]:
        def pct(values: list[float], q: float) -> float | None:
            return round(float(np.percentile(values, q)), 2) if values else None

        frame = [v for r in self.laps for v in r.frame_ms]
        infer = [v for r in self.laps for v in r.inference_ms]
        slack = [v for r in self.laps for v in r.slack_ms]
        ticks = sum(r.ticks for r in self.laps)
        return {
            "mode": self.config.mode,
            "track": self.config.track,
            "cars": self.config.cars,
            "laps": len(self.laps),
            "laps_finished": sum(r.finished for r in self.laps),
            "best_lap_ticks": min((r.lap_ticks for r in self.laps if r.finished), default=None),
            "ticks": ticks,
            "late_commands": sum(r.late_commands for r in self.laps),
            "missed_ticks": sum(r.missed_ticks for r in self.laps),
            "fallbacks": sum(r.fallbacks for r in self.laps),
            "safe_ticks": sum(r.safe_ticks for r in self.laps),
            "inference_errors": sum(r.inference_errors for r in self.laps),
            "skipped_frames": sum(r.skipped_frames for r in self.laps),
            "frame_ms_p50": pct(frame, 50),
            "frame_ms_p99": pct(frame, 99),
            "inference_ms_p50": pct(infer, 50),
            "inference_ms_p99": pct(infer, 99),
            "slack_ms_p1": pct(slack, 1),
            "slack_ms_p50": pct(slack, 50),
            "wall_s": round(self.wall_s, 1),
        }


def fallback_keys(config: AutopilotConfig, last: int) -> int:
    """The defined command of a tick whose inference was late: the last keys, or none."""
    return last if config.fallback == "hold" else 0


class _Tracer:
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


def _controls(mask: int) -> sim_pb2.Controls:
    return sim_pb2.Controls(forward=bool(mask & 1), back=bool(mask & 2), left=bool(mask & 4), right=bool(mask & 8))


def _command(tick: int, keys: int) -> game_pb2.DriveRequest:
    return game_pb2.DriveRequest(command=game_pb2.DriveCommand(tick=tick, controls=_controls(keys)))


class _Lap:
    """The stop rules of one lap: finish line, tick budget, no progress."""

    def __init__(self, record: LapRecord, max_ticks: int, stuck_ticks: int, meter: VersionMeter) -> None:
        self.record, self.max_ticks, self.stuck_ticks, self.meter = record, max_ticks, stuck_ticks, meter
        self.best_progress, self.best_tick = -1.0, 0

    def done(self, obs: sim_pb2.Observation, missed_ticks: int = 0) -> bool:
        r, s = self.record, obs.state
        r.ticks, r.progress_fraction, r.wall_contacts = int(s.tick), obs.progress_fraction, int(s.lap.wall_contacts)
        self.meter.tick(r.ticks, missed_ticks)
        if s.tick > 0:
            r.x.append(s.car.x_m)
            r.y.append(s.car.y_m)
        if s.lap.finished:
            r.finished, r.lap_ticks, r.stop_reason = True, int(obs.lap_ticks), "finished"
            return True
        if obs.progress_fraction > self.best_progress + 1e-6:
            self.best_progress, self.best_tick = obs.progress_fraction, int(s.tick)
        if self.stuck_ticks and s.tick - self.best_tick >= self.stuck_ticks:
            r.stop_reason = f"no progress for {self.stuck_ticks} ticks"
            return True
        if s.tick >= self.max_ticks:
            r.stop_reason = f"tick budget {self.max_ticks} spent"
            return True
        return False


def drive_lap(
    game: GameClient,
    model: InferenceClient,
    config: AutopilotConfig,
    record: LapRecord,
    tracer: _Tracer | None = None,
    stop: threading.Event | None = None,
    counted: bool = True,
) -> LapRecord:
    """One lap from the track's start line, in the configured mode; the session is closed afterwards.

    An uncounted lap (the deployer's gate) leaves the live metrics alone."""
    options = sim_pb2.FrameOptions(
        width_px=config.width,
        height_px=config.height,
        domain_randomization=config.randomize,
        randomization_seed=config.seed,
    )
    session = game.create_session(config.track, options).session_id
    meter = VersionMeter(model.version) if counted else UncountedMeter(model.version)
    try:
        first = game.reset(session, with_frame=True)
        if config.mode == "lockstep":
            _drive_lockstep(game, session, first, model, config, record, meter)
        else:
            _drive_realtime(game, session, first, model, config, record, meter, tracer or _Tracer(0), stop)
    finally:
        with contextlib.suppress(Exception):
            game.close_session(session)
    meter.lap(record.finished, record.lap_ticks * TICK_S, record.wall_contacts)
    return record


def _infer(model: InferenceClient, obs: sim_pb2.Observation, timeout_s: float) -> Decision:
    return model.infer(frame_array(obs.frame), obs.state.car.speed_m_per_s, timeout_s)


def _drive_lockstep(
    game: GameClient,
    session: str,
    first: sim_pb2.Observation,
    model: InferenceClient,
    config: AutopilotConfig,
    record: LapRecord,
    meter: VersionMeter,
) -> None:
    lap = _Lap(record, config.max_ticks, config.stuck_ticks, meter)
    period = 1.0 / config.lockstep_hz if config.lockstep_hz > 0 else 0.0
    due = [time.perf_counter()]

    def policy(obs: sim_pb2.Observation) -> int | None:
        if lap.done(obs):
            return None
        if period:
            due[0] = max(due[0] + period, time.perf_counter() - period)
            time.sleep(max(0.0, due[0] - time.perf_counter()))
        t0 = time.perf_counter()
        keys = _infer(model, obs, timeout_s=30.0).keys
        record.inference_ms.append((time.perf_counter() - t0) * 1e3)
        meter.inference.observe(record.inference_ms[-1] / 1e3)
        record.keys.append(keys)
        return keys

    for _ in game.drive_lockstep(session, policy, first, with_frames=True, timeout_s=3600.0):
        pass


class _Latest:
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

    def take(self, timeout_s: float) -> tuple[game_pb2.DriveResponse, float] | None:
        with self._cond:
            self._cond.wait_for(lambda: self._item is not None or self.ended, timeout_s)
            item, self._item = self._item, None
            return item


class _SafeMode:
    """Coasting while no model server answers, rather than holding keys chosen seconds ago into a wall.

    Entered after `safe_after_failures` failed inferences in a row (a late answer neither counts nor resets)
    or `safe_after_ms` without any answer (a worker being restarted leaves calls unanswered, not failed); left
    at the next answer. Entry and exit are logged once each, not the failures between them.
    """

    def __init__(self, config: AutopilotConfig, record: LapRecord, meter: VersionMeter) -> None:
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


def _drive_realtime(
    game: GameClient,
    session: str,
    first: sim_pb2.Observation,
    model: InferenceClient,
    config: AutopilotConfig,
    record: LapRecord,
    meter: VersionMeter,
    tracer: _Tracer,
    stop: threading.Event | None,
) -> None:
    """Real time: the server ticks at 25 Hz from the start message; tick k is due at t0 + (k + 1) * 40 ms."""
    lap = _Lap(record, config.max_ticks, config.stuck_ticks, meter)
    deadline_s = config.deadline_ms / 1e3
    outbox: queue.SimpleQueue[game_pb2.DriveRequest | None] = queue.SimpleQueue()
    base_tick = int(first.state.tick)
    last_keys = 0
    safe = _SafeMode(config, record, meter)

    # The first command is decided before the stream opens (the clock starts with the start message). An
    # error here that retrying cannot fix (no token, a wrong one, an unknown model, a refused input) stops the
    # car with that error; once racing, every failure gets the fallback and the car keeps driving.
    try:
        last_keys = _infer(model, first, timeout_s=10.0).keys
    except DomainError as exc:
        if exc.code not in TRANSIENT:
            raise
        record.inference_errors += 1
        meter.inference_errors.inc()
        safe.failed(exc)
        log.warning("car %d: first inference failed: %s", record.car, exc)
    record.keys.append(last_keys)

    def requests() -> Iterator[game_pb2.DriveRequest]:
        while (item := outbox.get()) is not None:
            yield item

    start = game_pb2.DriveStart(session_id=session, mode=game_pb2.DRIVE_MODE_REALTIME, with_frames=True)
    outbox.put(game_pb2.DriveRequest(start=start))
    t0 = time.perf_counter()
    safe.last_answer = t0  # silence counts from the start message, not from a slow first inference
    outbox.put(_command(base_tick, last_keys))
    for ahead in range(1, config.fallback_ticks + 1):
        outbox.put(_command(base_tick + ahead, fallback_keys(config, last_keys)))
    responses = game.stub.Drive(requests(), timeout=config.max_ticks * TICK_S * 2 + 60.0)
    latest = _Latest()

    def due(tick: int) -> float:
        return t0 + (tick - base_tick + 1) * TICK_S

    def read() -> None:
        try:
            for response in responses:
                latest.put(response, time.perf_counter())
            latest.end()
        except BaseException as exc:  # the stream's end (cancelled, server gone) is handed to the loop
            latest.end(exc)

    reader = threading.Thread(target=read, daemon=True, name=f"drive-reader-{record.car}")
    reader.start()
    last_response: game_pb2.DriveResponse | None = None
    try:
        while stop is None or not stop.is_set():
            item = latest.take(timeout_s=1.0)
            if item is None:
                if latest.ended:
                    break
                continue
            response, received = item
            last_response = response
            obs = response.observation
            tick = int(obs.state.tick)
            record.frame_ms.append((received - due(tick - 1)) * 1e3)
            if lap.done(obs, int(response.missed_ticks)):
                break
            with tracer.tick(record.car, tick):
                with tracer.span("autopilot.frame", **{"rrp.frame_ms": record.frame_ms[-1]}):
                    pass
                # This tick's fallback is already on the server (sent with the previous commands): the model's
                # answer replaces it only if it comes within the deadline.
                keys = fallback_keys(config, last_keys)
                budget = min(deadline_s - (time.perf_counter() - received), due(tick) - time.perf_counter() - 0.002)
                answered = False
                if budget <= 0.001:
                    record.fallbacks += 1
                    meter.fallbacks.inc()
                else:
                    t_inf = time.perf_counter()
                    try:
                        with tracer.span("autopilot.inference", **{"rrp.model": model.model}):
                            keys = _infer(model, obs, timeout_s=budget).keys
                        record.inference_ms.append((time.perf_counter() - t_inf) * 1e3)
                        meter.inference.observe(record.inference_ms[-1] / 1e3)
                        last_keys, answered = keys, True
                        safe.answered(tick)
                    except DomainError as exc:
                        record.fallbacks += 1
                        meter.fallbacks.inc()
                        if exc.code != "DEADLINE_EXCEEDED":
                            record.inference_errors += 1
                            meter.inference_errors.inc()
                            safe.failed(exc)
                            if not safe.on:  # while coasting, only safe mode's entry and exit are logged
                                log.warning("car %d tick %d: inference failed, fallback: %s", record.car, tick, exc)
                if not answered and safe.coasting(tick):
                    keys = 0  # this tick and the fallbacks sent ahead coast
                with tracer.span("autopilot.command", **{"rrp.keys": keys, "rrp.fallback": not answered}):
                    if answered or (safe.on and due(tick) > time.perf_counter()):
                        outbox.put(_command(tick, keys))
                    for ahead in range(1, config.fallback_ticks + 1):
                        outbox.put(_command(tick + ahead, fallback_keys(config, keys)))
                record.slack_ms.append((due(tick) - time.perf_counter()) * 1e3)
                record.keys.append(keys)
        if latest.error is not None and not lap.record.stop_reason:
            raise latest.error
    finally:
        # Counted now: after the lap the server still simulates the ticks that hold a fallback ahead.
        record.skipped_frames = latest.skipped
        outbox.put(None)  # half-close: the server ends the stream at its next tick without a command
        # Stopping (SIGTERM) keeps within a grace period: the stream gets a second, then it is cancelled.
        deadline = time.monotonic() + (1.0 if stop is not None and stop.is_set() else 5.0)
        while reader.is_alive() and time.monotonic() < deadline:
            reader.join(0.1)
        if reader.is_alive():
            responses.cancel()
        if last_response is not None:
            record.late_commands = int(last_response.late_commands)
            record.missed_ticks = int(last_response.missed_ticks)
            meter.tick(record.ticks, record.missed_ticks)
        if not record.stop_reason:
            record.stop_reason = "stopped"


class _Routed:
    """The model a lap drives: its version while the routing names it, the default once it does not (rollback)."""

    def __init__(self, router: Router, car: int, cars: int, clients: Callable[[str], InferenceClient]) -> None:
        self.router, self.car, self.cars, self.clients = router, car, cars, clients
        self.version = router.current().version_for(car, cars)
        self.model = clients(self.version).model
        self.current = self.version
        self.rerouted = False

    def infer(self, frame: np.ndarray, speed_m_per_s: float, timeout_s: float) -> Decision:
        routing = self.router.current()
        if self.current not in routing.routed():
            log.warning("car %d: version %s left the routing mid-lap: driving %s", self.car, self.current,
                        routing.default)  # fmt: skip
            REROUTES.labels(self.current, routing.default).inc()
            self.current, self.rerouted = routing.default, True
        return self.clients(self.current).infer(frame, speed_m_per_s, timeout_s)

    def close(self) -> None:
        pass  # the car's clients outlive a lap


def run_autopilot(
    config: AutopilotConfig,
    game_servers: tuple[str, ...],
    connect_model: Callable[[], InferenceClient] | None = None,
    stop: threading.Event | None = None,
    on_lap: Callable[[LapRecord], None] | None = None,
    *,
    router: Router | None = None,
    connect_version: Callable[[str], InferenceClient] | None = None,
) -> AutopilotResult:
    """`config.cars` cars (threads) over the game servers, `config.laps` laps each.

    Without a router each car has one model client (`connect_model`); with one, each lap asks the routing
    which version the car drives (`connect_version(version)`, one client per car and version).
    """
    if not game_servers:
        raise InvalidArgument("give at least one game server")
    if router is None and connect_model is None:
        raise InvalidArgument("give a model client, or a routing with a client per version")
    if router is not None and connect_version is None:
        raise InvalidArgument("a routing needs a client per version")
    tracer = _Tracer(config.trace_every)
    records: list[LapRecord] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def car(index: int) -> None:
        server = game_servers[index % len(game_servers)]
        clients: dict[str, InferenceClient] = {}

        def client_for(version: str) -> InferenceClient:
            if version not in clients:
                assert connect_version is not None
                clients[version] = connect_version(version)
            return clients[version]

        try:
            with GameClient(server) as game:
                for lap in range(config.laps):
                    if stop is not None and stop.is_set():
                        return
                    model: InferenceClient
                    if router is not None:
                        model = _Routed(router, index, config.cars, client_for)
                    else:
                        if "" not in clients:
                            assert connect_model is not None
                            clients[""] = connect_model()
                        model = clients[""]
                    record = LapRecord(index, lap, server, version=model.version)
                    drive_lap(game, model, config, record, tracer, stop)
                    if isinstance(model, _Routed):
                        record.rerouted = model.rerouted
                    with lock:
                        records.append(record)
                    if on_lap is not None:
                        on_lap(record)
        except BaseException as exc:
            with lock:
                errors.append(exc)
            if stop is not None:
                stop.set()
        finally:
            for client in clients.values():
                client.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=car, args=(i,), name=f"car-{i}", daemon=True) for i in range(config.cars)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    records.sort(key=lambda r: (r.car, r.lap))
    return AutopilotResult(config, records, time.perf_counter() - t0)


def plot_latency(result: AutopilotResult, path: Path) -> None:
    """Per-hop latency of a real-time run: frame (tick due -> frame received), inference, and slack left."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = [v for r in result.laps for v in r.frame_ms]
    infer = [v for r in result.laps for v in r.inference_ms]
    slack = [v for r in result.laps for v in r.slack_ms]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    bins = np.linspace(0, 45, 46)
    for values, label in ((frame, "frame: tick due -> observation"), (infer, "inference round trip")):
        if values:
            a.hist(np.clip(values, 0, 45), bins=bins, alpha=0.6, label=label)
    if slack:
        a.hist(np.clip(slack, 0, 45), bins=bins, alpha=0.6, label="slack: command sent -> tick due")
    a.axvline(TICK_S * 1e3, color="k", linestyle="--", linewidth=1, label="40 ms tick")
    a.set_xlabel("ms")
    a.set_ylabel("ticks")
    a.legend(fontsize=8)
    a.set_title("latency per hop")
    if result.laps:
        r = result.laps[0]
        b.plot(r.inference_ms, linewidth=0.6, label="inference")
        b.plot(r.slack_ms, linewidth=0.6, label="slack")
        b.set_xlabel("tick (car 0, lap 0)")
        b.set_ylabel("ms")
        b.legend(fontsize=8)
    t = result.totals()
    fig.suptitle(
        f"{t['track']}, {t['cars']} car(s), {t['mode']}: {t['missed_ticks']} missed, {t['late_commands']} late, "
        f"{t['fallbacks']} fallbacks in {t['ticks']} ticks"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def result_json(result: AutopilotResult) -> dict[str, Any]:
    return {
        "settings": dataclasses.asdict(result.config),
        "totals": result.totals(),
        "laps": [r.summary() for r in result.laps],
    }
