"""The game's use cases, on core objects: sessions, stepping, evaluating and driving in lockstep or real time."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from game_server.core import episode, physics
from game_server.core.drivers import RayDriver
from game_server.core.physics import RunResult
from game_server.core.recovery import RecoveringDriver, RecoveringPolicy
from game_server.core.state import TICK_S, Gate, SimState
from game_server.core.track import Track
from game_server.core.tracks import load_track
from game_server.sessions import Session, SessionStore
from plumbing.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from plumbing.settings import setting

log = logging.getLogger(__name__)

MAX_PROGRAM_TICKS = 100_000
# How far ahead of the simulation a real-time client may queue commands.
MAX_COMMANDS_AHEAD = 250
MAX_RACE_CARS = 64  # sessions one Race stream drives: far beyond what a game server renders in real time


class FrameRenderer(Protocol):
    def render(self, track: Track, state: SimState, spec: Any) -> np.ndarray: ...

    def render_many(self, views: list[tuple[Track, SimState, Any]]) -> list[np.ndarray]: ...


@dataclass(frozen=True)
class GameConfig:
    max_sessions: int = setting(32, "sessions open at once; past it CreateSession answers RESOURCE_EXHAUSTED")
    idle_timeout_s: float = setting(300.0, "seconds before an idle session is closed")
    # Physics holds the GIL, so more than a couple only adds queueing.
    evaluate_slots: int = setting(2, "concurrent Evaluate/Record calls before RESOURCE_EXHAUSTED")
    max_watchers: int = setting(4, "WatchSession streams per session; more are refused with RESOURCE_EXHAUSTED")


@dataclass(frozen=True)
class Observation:
    state: SimState
    rays: tuple[float, ...]
    progress_fraction: float
    wall_contact: bool
    lap_ticks: int
    frame: np.ndarray | None = None


@dataclass(frozen=True)
class DriveEvent:
    observation: Observation
    applied_tick: int
    late_commands: int
    missed_ticks: int
    applied_mask: int = 0  # the controls the tick ran with (held from the tick before when its command was missed)


@dataclass(frozen=True)
class WatchEvent:
    """What a watcher sees: the session's newest state, and how many states it skipped to get there."""

    session_id: str
    track: str
    state: SimState
    progress_fraction: float
    skipped_states: int


# A watcher's states per second: by default the simulation's real-time rate, at most a fast display's.
DEFAULT_WATCH_HZ = 25
MAX_WATCH_HZ = 60


def lap_ticks_of(state: SimState) -> int:
    return state.lap.finish_tick if state.lap.finished else 0


def evaluate(
    track_name: str,
    start: SimState | None,
    policy: bytes | RayDriver,
    gate: Gate | None,
    max_ticks: int,
    record_trajectory: bool,
    stop: Callable[[], bool] | None = None,
) -> RunResult:
    """The one evaluation every caller uses, on a server or in process, so that both give the same result.

    `stop` answers True once the caller has left; the run then ends with Cancelled within ~256 ticks."""
    track, begin = evaluation_start(track_name, start, policy, max_ticks)
    return episode.run_episode(
        track,
        begin,
        as_policy(policy, track),
        max_ticks=episode.program_ticks(policy, max_ticks) if isinstance(policy, bytes) else max_ticks,
        gate=gate,
        record_trajectory=record_trajectory,
        cancelled=stop,
    ).result


def evaluation_start(
    track_name: str, start: SimState | None, policy: bytes | RayDriver, max_ticks: int
) -> tuple[Track, SimState]:
    """Checks an evaluation's inputs; returns its track and start state (the base state unless given)."""
    if max_ticks > MAX_PROGRAM_TICKS:
        raise InvalidArgument(f"max_ticks is at most {MAX_PROGRAM_TICKS}, got {max_ticks}")
    if isinstance(policy, bytes) and len(policy) > MAX_PROGRAM_TICKS:
        raise InvalidArgument(f"a program holds at most {MAX_PROGRAM_TICKS} ticks, got {len(policy)}")
    if isinstance(policy, bytes):
        if not policy and max_ticks == 0:
            raise InvalidArgument("give a program or max_ticks")
        physics.validate_masks(policy)
    elif max_ticks == 0:
        raise InvalidArgument("a driver needs max_ticks")
    track = load_track(track_name)
    if start is not None:
        physics.validate_state(track, start)
    return track, track.base_state if start is None else start


def as_policy(policy: bytes | RayDriver, track: Track) -> episode.Policy:
    """A request's policy for the episode loop: an open-loop program, a sensor driver, or a sensor driver
    inside the recovering teacher (which reads the track and the state to get out of walls)."""
    if isinstance(policy, bytes):
        return episode.Program(policy)
    if policy.recovering:
        return RecoveringPolicy(RecoveringDriver(track, base=policy.act))
    return episode.SensorPolicy(policy.act_on)


class Game:
    """Owns the sessions and the process's single renderer."""

    def __init__(self, config: GameConfig, renderer_factory: Callable[[], FrameRenderer]) -> None:
        self.config = config
        self.sessions = SessionStore(config.max_sessions, config.idle_timeout_s)
        self._renderer_factory = renderer_factory
        self._renderer: FrameRenderer | None = None
        self._renderer_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(config.evaluate_slots)
        self._running_lock = threading.Lock()
        self.evaluate_running = 0

    # -- frames ---------------------------------------------------------------------------------
    def renderer(self) -> FrameRenderer:
        with self._renderer_lock:
            if self._renderer is None:
                self._renderer = self._renderer_factory()
            return self._renderer

    def observe(self, session: Session, wall_contact: bool, with_frame: bool) -> Observation:
        state = session.state
        frame = self.renderer().render(session.track, state, session.frame_spec) if with_frame else None
        return Observation(
            state=state,
            rays=physics.raycast(session.track, state.car, state.lap.segment),
            progress_fraction=physics.progress_fraction(session.track, state.lap),
            wall_contact=wall_contact,
            lap_ticks=lap_ticks_of(state),
            frame=frame,
        )

    def observe_many(self, ticked: list[tuple[Session, bool]], with_frames: bool) -> list[Observation]:
        """`observe` of several sessions, their frames drawn in one call to the renderer (one hand-off)."""
        frames: list[np.ndarray | None] = [None] * len(ticked)
        if with_frames:
            views = [(session.track, session.state, session.frame_spec) for session, _ in ticked]
            frames = list(self.renderer().render_many(views))
        return [
            Observation(
                state=session.state,
                rays=physics.raycast(session.track, session.state.car, session.state.lap.segment),
                progress_fraction=physics.progress_fraction(session.track, session.state.lap),
                wall_contact=contact,
                lap_ticks=lap_ticks_of(session.state),
                frame=frame,
            )
            for (session, contact), frame in zip(ticked, frames, strict=True)
        ]

    # -- sessions -------------------------------------------------------------------------------
    def create_session(self, track_name: str, frame_spec: Any) -> tuple[Session, Observation]:
        track = load_track(track_name)
        session = self.sessions.create(track, frame_spec)
        return session, self.observe(session, False, False)

    def reset(self, session_id: str, state: SimState | None, with_frame: bool) -> Observation:
        session = self.sessions.get(session_id)
        with session.exclusive("Reset"):
            if state is not None:
                physics.validate_state(session.track, state)
            session.state = session.track.base_state if state is None else state
            return self.observe(session, False, with_frame)

    def step(self, session_id: str, masks: bytes, with_frame: bool) -> Observation:
        if not masks:
            raise InvalidArgument("controls must hold at least one tick")
        if len(masks) > MAX_PROGRAM_TICKS:
            raise InvalidArgument(f"at most {MAX_PROGRAM_TICKS} ticks per Step")
        physics.validate_masks(masks)
        session = self.sessions.get(session_id)
        with session.exclusive("Step"):
            state, contact = session.state, False
            for mask in masks:
                state, contact = physics.step(session.track, state, mask)
            session.state = state
            self.sessions.touch(session)
            return self.observe(session, contact, with_frame)

    # -- evaluation -----------------------------------------------------------------------------
    @contextmanager
    def evaluation_slot(self) -> Iterator[None]:
        """Holds one of the server's evaluation slots; refuses rather than queues when all are busy."""
        if not self._slots.acquire(blocking=False):
            raise ResourceExhausted(
                f"all {self.config.evaluate_slots} evaluation slots are busy; lease capacity via GetServerInfo"
            )
        try:
            with self._running_lock:
                self.evaluate_running += 1
            yield
        finally:
            with self._running_lock:
                self.evaluate_running -= 1
            self._slots.release()

    def evaluate(
        self,
        track_name: str,
        start: SimState | None,
        policy: bytes | RayDriver,
        gate: Gate | None,
        max_ticks: int,
        record_trajectory: bool,
        stop: Callable[[], bool] | None = None,
    ) -> RunResult:
        """Runs a control program (bytes) or a closed-loop driver, physics only, in one of the evaluation slots."""
        with self.evaluation_slot():
            return evaluate(track_name, start, policy, gate, max_ticks, record_trajectory, stop)

    # -- watching -------------------------------------------------------------------------------
    def watch(
        self,
        session_id: str,
        max_rate_hz: int,
        is_active: Callable[[], bool] = lambda: True,
        clock: Callable[[], float] = time.monotonic,
    ) -> Iterator[WatchEvent]:
        """The session's newest state, at most `max_rate_hz` times a second, from the state it is in now until
        it closes or the watcher leaves. An empty id watches the oldest open session.

        Never slows the session: it reads the session's feed and holds none of the session's locks, so a
        watcher slower than the session skips states (counted) instead of delaying a tick."""
        if not 0 <= max_rate_hz <= MAX_WATCH_HZ:
            raise InvalidArgument(f"max_rate_hz must be in [0, {MAX_WATCH_HZ}] (0: the default), got {max_rate_hz}")
        session = self.sessions.get(session_id) if session_id else self.sessions.oldest()
        feed, gap_s = session.feed, 1.0 / (max_rate_hz or DEFAULT_WATCH_HZ)
        with feed.watching(self.config.max_watchers, session.session_id):
            sent = -1
            next_at = clock()
            while is_active():
                wait_s = max(next_at - clock(), 0.0)
                if wait_s > 0:
                    time.sleep(min(wait_s, gap_s))  # the rate limit: whatever is published meanwhile is skipped
                    continue
                version, state = feed.wait_newer(sent, 0.25) if not feed.closed else feed.latest()
                if version != sent:
                    skipped = max(version - sent - 1, 0) if sent >= 0 else 0
                    progress = physics.progress_fraction(session.track, state.lap)
                    yield WatchEvent(session.session_id, session.track.name, state, progress, skipped)
                    sent, next_at = version, clock() + gap_s
                elif feed.closed:
                    return

    # -- driving --------------------------------------------------------------------------------
    def drive_lockstep(
        self, session_id: str, commands: Iterable[tuple[int, int]], with_frames: bool
    ) -> Iterator[DriveEvent]:
        """One tick per command; a command must name the session's current tick."""
        session = self.sessions.get(session_id)
        with session.exclusive("Drive"):
            for tick, mask in commands:
                physics.validate_masks(bytes([mask]))
                if tick != session.state.tick:
                    raise FailedPrecondition(f"command for tick {tick} but the session is at tick {session.state.tick}")
                session.state, contact = physics.step(session.track, session.state, mask)
                self.sessions.touch(session)
                yield DriveEvent(self.observe(session, contact, with_frames), tick, 0, 0, mask)

    def drive_realtime(
        self,
        session_id: str,
        commands: Iterable[tuple[int, int]],
        with_frames: bool,
        max_ticks: int,
        is_active: Callable[[], bool] = lambda: True,
        clock: Callable[[], float] = time.monotonic,
    ) -> Iterator[DriveEvent]:
        """Ticks at 25 Hz of wall-clock time; commands are matched to ticks by their tick number."""
        session = self.sessions.get(session_id)
        with session.exclusive("Drive"):
            inbox = _CommandInbox(session.state.tick)
            reader = threading.Thread(target=inbox.consume, args=(commands,), daemon=True, name="drive-reader")
            reader.start()
            mask, missed, done = 0, 0, 0
            t0 = clock()
            while is_active() and (max_ticks == 0 or done < max_ticks):
                delay = t0 + (done + 1) * TICK_S - clock()  # tick k is due at the end of its period
                if delay > 0:
                    time.sleep(delay)
                inbox.raise_error()
                tick = session.state.tick
                command = inbox.take(tick)
                if command is None:
                    if inbox.closed:
                        break
                    missed += 1
                else:
                    mask = command
                session.state, contact = physics.step(session.track, session.state, mask)
                self.sessions.touch(session)
                done += 1
                yield DriveEvent(self.observe(session, contact, with_frames), tick, inbox.late, missed, mask)
            inbox.stop()

    def drive_race(
        self,
        session_ids: list[str],
        batches: Iterable[RaceBatch],
        with_frames: bool,
        max_ticks: int,
        is_active: Callable[[], bool] = lambda: True,
        clock: Callable[[], float] = time.monotonic,
    ) -> Iterator[list[tuple[int, DriveEvent]]]:
        """Several sessions in real time on one clock: each tick, every car still racing, as (car, event).

        Per car the rules are drive_realtime's (late, missed, held controls); what the race saves is the
        per-car stream and thread: one loop steps and observes every car, one message carries them."""
        if not 1 <= len(session_ids) <= MAX_RACE_CARS:
            raise InvalidArgument(f"a race holds 1..{MAX_RACE_CARS} sessions, got {len(session_ids)}")
        if len(set(session_ids)) != len(session_ids):
            raise InvalidArgument("a race names each session once")
        sessions = [self.sessions.get(session_id) for session_id in session_ids]
        with ExitStack() as held:
            for session in sessions:
                held.enter_context(session.exclusive("Race"))
            inboxes = [_CommandInbox(session.state.tick) for session in sessions]
            reader = _RaceReader(inboxes)
            thread = threading.Thread(target=reader.consume, args=(batches,), daemon=True, name="race-reader")
            thread.start()
            masks, missed, done = [0] * len(sessions), [0] * len(sessions), 0
            t0 = clock()
            try:
                while is_active() and (max_ticks == 0 or done < max_ticks):
                    delay = t0 + (done + 1) * TICK_S - clock()
                    if delay > 0:
                        time.sleep(delay)
                    reader.raise_error()
                    racing = [k for k in range(len(sessions)) if not reader.left[k]]
                    if not racing:
                        break
                    commands = {k: inboxes[k].take(sessions[k].state.tick) for k in racing}
                    if reader.closed and all(c is None for c in commands.values()):
                        break
                    ticked, ticks = [], []
                    for k in racing:
                        session, command = sessions[k], commands[k]
                        ticks.append(session.state.tick)
                        if command is None:
                            missed[k] += 1
                        else:
                            masks[k] = command
                        session.state, contact = physics.step(session.track, session.state, masks[k])
                        self.sessions.touch(session)
                        ticked.append((session, contact))
                    observed = self.observe_many(ticked, with_frames)
                    done += 1
                    yield [
                        (k, DriveEvent(obs, tick, inboxes[k].late, missed[k], masks[k]))
                        for k, tick, obs in zip(racing, ticks, observed, strict=True)
                    ]
            finally:
                reader.stop()


# A race's input, one message of its stream: commands as (car, tick, mask), and the cars that leave.
RaceBatch = tuple[list[tuple[int, int, int]], list[int]]


class _RaceReader:
    """A race's commands, handed to each car's inbox as they arrive."""

    def __init__(self, inboxes: list[_CommandInbox]) -> None:
        self.inboxes = inboxes
        self.left = [False] * len(inboxes)  # written here, read by the race loop (a bool store is atomic)
        self.closed = False
        self._error: BaseException | None = None
        self._stop = threading.Event()

    def consume(self, batches: Iterable[RaceBatch]) -> None:
        try:
            for commands, leaving in batches:
                if self._stop.is_set():
                    return
                for car, tick, mask in commands:
                    self._inbox(car).put(tick, mask)
                for car in leaving:
                    self._inbox(car)
                    self.left[car] = True
        except BaseException as exc:  # handed to the race loop, which raises it to the client
            self._error = exc
        finally:
            self.closed = True

    def _inbox(self, car: int) -> _CommandInbox:
        if not 0 <= car < len(self.inboxes):
            raise InvalidArgument(f"car {car} is not in this race of {len(self.inboxes)}")
        return self.inboxes[car]

    def raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        self._stop.set()


class _CommandInbox:
    """Commands received from a real-time client, keyed by the tick they apply to."""

    def __init__(self, first_tick: int) -> None:
        self._next_tick = first_tick  # the first tick not yet simulated
        self._pending: dict[int, int] = {}
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self.late = 0
        self.closed = False

    def consume(self, commands: Iterable[tuple[int, int]]) -> None:
        try:
            for tick, mask in commands:
                if self._stop.is_set():
                    return
                self.put(tick, mask)
        except BaseException as exc:  # handed to the driving loop, which raises it to the client
            self._error = exc
        finally:
            self.closed = True

    def put(self, tick: int, mask: int) -> None:
        """One command: kept for its tick, or counted late; too far ahead is the client's error."""
        physics.validate_masks(bytes([mask]))
        with self._lock:
            now = self._next_tick
            if tick < now:
                self.late += 1
            elif tick > now + MAX_COMMANDS_AHEAD:
                raise InvalidArgument(f"command for tick {tick} is more than {MAX_COMMANDS_AHEAD} ticks ahead of {now}")
            else:
                self._pending[tick] = mask

    def take(self, tick: int) -> int | None:
        with self._lock:
            self._next_tick = tick + 1
            for stale in [t for t in self._pending if t < tick]:
                del self._pending[stale]
            return self._pending.pop(tick, None)

    def raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        self._stop.set()
