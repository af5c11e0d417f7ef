"""The autopilot: drives game sessions through the Drive stream from camera frames alone, asking a model server.

Each tick's frame goes to the model server; the keys come back as the command for a named tick. In real time
(25 Hz of wall clock) the autopilot owns the 40 ms budget: each inference has a deadline, and the fallback
command of the next `fallback_ticks` ticks is sent ahead with each tick's command, so that a late or failed
inference, or a stall of either side, leaves a tick its fallback rather than no command at all (the server
keeps the last command it got for a tick before simulating it); the game server counts
late commands and missed ticks, the autopilot counts fallbacks, skipped frames and the latency of each hop.
The real-time loop itself is `serving.realtime`; a lap's outcome and stop rules are `game_server.core.lap`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from collector.store import RedisConfig
from game_server.client import GameClient, watch_observation
from game_server.core.lap import STUCK_TICKS, LapOutcome, LapWatch, WithOutcome
from game_server.core.state import TICK_S
from game_server.game import MAX_RACE_CARS
from game_server.leaderboard import Leaderboard, LeaderboardConfig, drive_lap_record, submit_lap
from plumbing.channels import ClientTLS
from plumbing.errors import InvalidArgument, quote
from plumbing.settings import setting
from rallyrobopilot.v1 import sim_pb2
from serving.client import InferenceClient
from serving.codec import Decision
from serving.metrics import REROUTES, UncountedMeter, VersionMeter
from serving.race import RaceModel, race_realtime
from serving.realtime import Tracer, drive_realtime, infer
from serving.registry import Router

log = logging.getLogger(__name__)

FALLBACKS = ("hold", "coast")
MAX_CARS = 512  # each car is a thread and a Drive stream: far beyond what one process drives in real time


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
    stuck_ticks: int = setting(STUCK_TICKS, "end a lap after this many ticks without new progress (0: never)")
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
    batched: bool = setting(
        True, "one inference request per round carrying every car's frame (TorchServe's protocol), not one per car"
    )
    batch_window_ms: float = setting(
        2.0, "batched: how long a frame waits for the other cars' before its request goes, ms (all in: at once)"
    )
    batch_in_flight: int = setting(
        2, "batched: requests of this process outstanding at once (a frame that just missed one goes in the next)"
    )
    race: bool = setting(
        True,
        "real time, batched: each game server's cars race through one stream on one clock, all their frames in "
        "one request a tick (not a stream and a thread per car)",
    )
    race_fallback_ticks: int = setting(
        10,
        "races: ticks ahead that hold the fallback command (one message carries every car's, so a race affords "
        "a longer stall than a stream: 400 ms)",
    )
    # 8, not 4: on 2 cores, 16 cars fell back 13.8-15.5% against 15.9-21.1% and 32 cars missed 0 ticks against
    # 28 (laps 1.09-1.20 of lockstep against 1.33-1.69): half the requests, ~15% less CPU a car-tick.
    race_cars: int = setting(
        8,
        "races: at most this many cars per race; a game server's cars make several races, each its own share "
        "of the tick, so that frames are drawn and inferred in turn instead of all at once",
    )
    leaderboard: str = setting(
        "", "Redis URL of a leaderboard: every finished lap is verified (replayed from its keys) and submitted"
    )

    def __post_init__(self) -> None:
        if self.mode not in ("realtime", "lockstep"):
            raise InvalidArgument(f"mode {quote(self.mode)}: realtime or lockstep")
        if self.fallback not in FALLBACKS:
            raise InvalidArgument(f"fallback {quote(self.fallback)}: one of {', '.join(FALLBACKS)}")
        if not 1 <= self.cars <= MAX_CARS:
            raise InvalidArgument(f"cars must be 1..{MAX_CARS}, got {self.cars}")
        if self.laps < 1 or self.max_ticks < 1:
            raise InvalidArgument("laps and max ticks must be at least 1")
        if not 0.0 <= self.batch_window_ms <= 40.0:
            raise InvalidArgument(f"the batch window must be 0..40 ms (one tick), got {self.batch_window_ms:g}")
        if not 1 <= self.batch_in_flight <= 16:
            raise InvalidArgument(f"batch in flight must be 1..16, got {self.batch_in_flight}")
        if not 1 <= self.race_cars <= MAX_RACE_CARS:
            raise InvalidArgument(f"race cars must be 1..{MAX_RACE_CARS}, got {self.race_cars}")
        if not 1 <= self.fallback_ticks <= 100 or not 1 <= self.race_fallback_ticks <= 100:
            raise InvalidArgument("fallback ticks (and race fallback ticks) must be 1..100")
        if not 1.0 <= self.deadline_ms <= 1000.0:
            raise InvalidArgument("the inference deadline must be 1..1000 ms")
        if self.safe_after_failures < 1 or self.safe_after_ms < self.deadline_ms:
            raise InvalidArgument("safe after failures must be at least 1, safe after ms at least the deadline")


@dataclass
class CarLap(WithOutcome):
    """One lap of one car: its outcome, what the model chose each tick, and the real-time accounting."""

    car: int
    lap: int
    server: str
    version: str = ""  # the model version the lap started on ("" = the server's default)
    rerouted: bool = False  # its version left the routing mid-lap (rolled back) and the default took over
    outcome: LapOutcome = field(default_factory=LapOutcome)
    keys: list[int] = field(default_factory=list)  # the command sent for each tick, in tick order
    # The controls the server says each tick ran with (real time: a late command is not applied, a tick without
    # one holds the last), and the last observed state: with them a finished lap is a verifiable lap record.
    applied: list[int] = field(default_factory=list)
    final_state: sim_pb2.SimState | None = None
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

    def observe(self, watch: LapWatch, obs: sim_pb2.Observation) -> bool:
        """Takes a tick's observation: the outcome so far and the line driven; True when the lap stops there."""
        done = watch_observation(watch, obs)
        self.outcome = watch.outcome
        self.final_state = obs.state
        if obs.state.tick > 0:
            self.x.append(obs.state.car.x_m)
            self.y.append(obs.state.car.y_m)
        return done

    def summary(self) -> dict[str, Any]:
        return {
            "car": self.car,
            "lap": self.lap,
            "server": self.server,
            "version": self.version,
            "rerouted": self.rerouted,
            **self.outcome.summary(),
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
    laps: list[CarLap]
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


def drive_lap(
    game: GameClient,
    model: InferenceClient,
    config: AutopilotConfig,
    record: CarLap,
    tracer: Tracer | None = None,
    stop: threading.Event | None = None,
    counted: bool = True,
) -> CarLap:
    """One lap from the track's start line, in the configured mode; the session is closed afterwards.

    An uncounted lap (the deployer's gate) leaves the live metrics alone."""
    meter = VersionMeter(model.version) if counted else UncountedMeter(model.version)
    with game.session(config.track, frame_options(config)) as created:
        session = created.session_id
        first = game.reset(session, with_frame=True)
        if config.mode == "lockstep":
            _drive_lockstep(game, session, first, model, config, record, meter)
        else:
            drive_realtime(game, session, first, model, config, record, meter, tracer or Tracer(0), stop)
    meter.lap(record.finished, record.outcome.lap_s, record.wall_contacts)
    return record


def race_groups(cars: int, per_race: int, servers: tuple[str, ...]) -> list[tuple[str, list[int]]]:
    """The races: each server's cars (car i on server i mod n) in races of at most `per_race`, listed so that
    consecutive races (consecutive shares of the tick) are on different servers where there are several."""
    by_server = [list(range(k, cars, len(servers))) for k in range(len(servers))]
    chunks = [[mine[i : i + per_race] for i in range(0, len(mine), per_race)] for mine in by_server]
    return [
        (servers[k], chunks[k][round_])
        for round_ in range(max(len(c) for c in chunks))
        for k in range(len(servers))
        if round_ < len(chunks[k])
    ]


def frame_options(config: AutopilotConfig) -> sim_pb2.FrameOptions:
    return sim_pb2.FrameOptions(
        width_px=config.width,
        height_px=config.height,
        domain_randomization=config.randomize,
        randomization_seed=config.seed,
    )


def race_lap(
    game: GameClient,
    model: RaceModel,
    config: AutopilotConfig,
    records: list[CarLap],
    tracer: Tracer | None = None,
    stop: threading.Event | None = None,
    phase: tuple[float, float] | None = None,
) -> list[CarLap]:
    """One lap of several cars at once on one game server, in real time (serving.race); sessions closed after."""
    meters = [VersionMeter(model.version) for _ in records]
    with contextlib.ExitStack() as sessions:
        ids = [sessions.enter_context(game.session(config.track, frame_options(config))).session_id for _ in records]
        firsts = [game.reset(session, with_frame=True) for session in ids]
        race_realtime(game, ids, firsts, model, config, records, meters, tracer or Tracer(0), stop, phase)
    for meter, record in zip(meters, records, strict=True):
        meter.lap(record.finished, record.outcome.lap_s, record.wall_contacts)
    return records


def _drive_lockstep(
    game: GameClient,
    session: str,
    first: sim_pb2.Observation,
    model: InferenceClient,
    config: AutopilotConfig,
    record: CarLap,
    meter: VersionMeter,
) -> None:
    watch = LapWatch(config.max_ticks, config.stuck_ticks)
    period = 1.0 / config.lockstep_hz if config.lockstep_hz > 0 else 0.0
    due = [time.perf_counter()]

    def policy(obs: sim_pb2.Observation) -> int | None:
        done = record.observe(watch, obs)
        meter.tick(record.ticks)
        if done:
            return None
        if period:
            due[0] = max(due[0] + period, time.perf_counter() - period)
            time.sleep(max(0.0, due[0] - time.perf_counter()))
        t0 = time.perf_counter()
        keys = infer(model, obs, timeout_s=30.0).keys
        record.inference_ms.append((time.perf_counter() - t0) * 1e3)
        meter.inference.observe(record.inference_ms[-1] / 1e3)
        record.keys.append(keys)
        record.applied.append(keys)  # lockstep: every command is applied at the tick it names
        return keys

    for _ in game.drive_lockstep(session, policy, first, with_frames=True, timeout_s=3600.0):
        pass


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


def submit_race_lap(board: Leaderboard | None, config: AutopilotConfig, record: CarLap, model: str) -> None:
    """A finished lap to the leaderboard, from the controls the server applied (verified before it is stored)."""
    if board is None or not record.finished:
        return
    lap = drive_lap_record(
        config.track, record.applied, record.lap_ticks, record.wall_contacts, record.final_state,
        model_version=f"{model}:{record.version or 'default'}", data_source=f"rrp autopilot, {config.mode}",
    )  # fmt: skip
    submit_lap(board, lap)


def run_autopilot(
    config: AutopilotConfig,
    game_servers: tuple[str, ...],
    connect_model: Callable[[], InferenceClient] | None = None,
    stop: threading.Event | None = None,
    on_lap: Callable[[CarLap], None] | None = None,
    *,
    router: Router | None = None,
    connect_version: Callable[[str], InferenceClient] | None = None,
    race_model: Callable[[], RaceModel] | None = None,
    game_tls: ClientTLS | None = None,
) -> AutopilotResult:
    """`config.cars` cars over the game servers (over TLS when `game_tls` has a CA), `config.laps` laps each.

    Without a router each car has one model client (`connect_model`); with one, each lap asks the routing
    which version the car drives (`connect_version(version)`, one client per car and version). In real time
    with `race_model` and no router, each game server's cars race together (`race_model()`, one per server).
    """
    if not game_servers:
        raise InvalidArgument("give at least one game server")
    if router is None and connect_model is None:
        raise InvalidArgument("give a model client, or a routing with a client per version")
    if router is not None and connect_version is None:
        raise InvalidArgument("a routing needs a client per version")
    tracer = Tracer(config.trace_every)
    board = Leaderboard.connect(LeaderboardConfig(RedisConfig(url=config.leaderboard))) if config.leaderboard else None
    records: list[CarLap] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def finished(record: CarLap, model: str) -> None:
        submit_race_lap(board, config, record, model)
        with lock:
            records.append(record)
        if on_lap is not None:
            on_lap(record)

    def failed(exc: BaseException) -> None:
        with lock:
            errors.append(exc)
        if stop is not None:
            stop.set()

    def car(index: int) -> None:
        server = game_servers[index % len(game_servers)]
        clients: dict[str, InferenceClient] = {}

        def client_for(version: str) -> InferenceClient:
            if version not in clients:
                assert connect_version is not None
                clients[version] = connect_version(version)
            return clients[version]

        try:
            with GameClient(server, tls=game_tls) as game:
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
                    record = CarLap(index, lap, server, version=model.version)
                    drive_lap(game, model, config, record, tracer, stop)
                    if isinstance(model, _Routed):
                        record.rerouted = model.rerouted
                    finished(record, model.model)
        except BaseException as exc:
            failed(exc)
        finally:
            for client in clients.values():
                client.close()

    def race(server: str, cars: list[int], offset_s: float) -> None:
        assert race_model is not None
        try:
            with GameClient(server, tls=game_tls) as game:
                model = race_model()
                for lap in range(config.laps):
                    if stop is not None and stop.is_set():
                        return
                    laps = [CarLap(index, lap, server, version=model.version) for index in cars]
                    race_lap(game, model, config, laps, tracer, stop, (t0, offset_s))
                    for record in laps:
                        finished(record, model.model)
        except BaseException as exc:
            failed(exc)

    t0 = time.perf_counter()
    if config.mode == "realtime" and config.race and race_model is not None and router is None:
        groups = race_groups(config.cars, config.race_cars, game_servers)
        threads = [  # each race its own share of the tick, so that their requests come in turn
            threading.Thread(target=race, args=(*group, k * TICK_S / len(groups)), name=f"race-{k}", daemon=True)
            for k, group in enumerate(groups)
        ]
    else:
        threads = [threading.Thread(target=car, args=(i,), name=f"car-{i}", daemon=True) for i in range(config.cars)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    records.sort(key=lambda r: (r.car, r.lap))
    return AutopilotResult(config, records, time.perf_counter() - t0)


def result_json(result: AutopilotResult) -> dict[str, Any]:
    return {
        "settings": dataclasses.asdict(result.config),
        "totals": result.totals(),
        "laps": [r.summary() for r in result.laps],
    }
