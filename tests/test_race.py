"""The Race stream: several sessions in real time on one clock, one message a tick each way.

Each car of a race follows a real-time Drive stream's rules (late commands counted, a tick without a command
holds the car's controls, counted missed); the controls each tick ran with replay it exactly. The autopilot's
race drives every car of a game server through it, their frames in one request a tick.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from game_server.client import GameClient
from game_server.convert import controls_to_mask, mask_to_controls
from game_server.server import GameServer
from rallyrobopilot.v1 import game_pb2, game_pb2_grpc, sim_pb2
from serving.autopilot import AutopilotConfig, run_autopilot
from serving.batching import RacePool
from serving.inprocess import InProcessClient

from .tiny_models import train_tiny

TRACK = "oval"


def _start(ids: list[str], max_ticks: int = 0) -> game_pb2.RaceRequest:
    return game_pb2.RaceRequest(start=game_pb2.RaceStart(session_ids=ids, with_frames=False, max_ticks=max_ticks))


def _commands(plans: dict[int, list[tuple[int, int]]], leave: list[int] | None = None) -> game_pb2.RaceRequest:
    commands = [
        game_pb2.RaceCommand(car=car, command=game_pb2.DriveCommand(tick=tick, controls=mask_to_controls(mask)))
        for car, plan in plans.items()
        for tick, mask in plan
    ]
    return game_pb2.RaceRequest(commands=game_pb2.RaceCommands(commands=commands, leave=leave or []))


class _Race:
    """A Race stream whose requests are fed as the test goes."""

    def __init__(self, stub: game_pb2_grpc.GameServiceStub, first: game_pb2.RaceRequest) -> None:
        self.outbox: queue.SimpleQueue[game_pb2.RaceRequest | None] = queue.SimpleQueue()
        self.outbox.put(first)

        def requests() -> Iterator[game_pb2.RaceRequest]:
            while (item := self.outbox.get()) is not None:
                yield item

        self.responses = stub.Race(requests(), timeout=60)

    def send(self, request: game_pb2.RaceRequest | None) -> None:
        self.outbox.put(request)


@pytest.fixture()
def sessions(client: GameClient) -> Iterator[Any]:
    """`sessions(n)`: n fresh sessions at the track's start, closed after the test (the server holds 6)."""
    opened: list[str] = []

    def make(n: int) -> list[str]:
        ids = [client.create_session(TRACK).session_id for _ in range(n)]
        opened.extend(ids)
        for session in ids:
            client.reset(session)
        return ids

    yield make
    for session in opened:
        client.close_session(session)


def test_each_car_of_a_race_runs_its_own_commands_and_its_applied_controls_replay_it(
    game_server: GameServer, client: GameClient, sessions: Any
) -> None:
    ticks = 30
    programs = {car: [(t, [1, 5, 9][car] if t % (car + 2) else 1) for t in range(ticks)] for car in range(3)}
    ids = sessions(3)
    race = _Race(client.stub, _start(ids, max_ticks=ticks))
    race.send(_commands(programs))  # every command up front: the server holds them for their ticks
    seen: dict[int, list[game_pb2.DriveResponse]] = {0: [], 1: [], 2: []}
    for response in race.responses:
        assert [c.car for c in response.cars] == [0, 1, 2]
        for c in response.cars:
            seen[c.car].append(c.drive)
    race.send(None)
    for car, drives in seen.items():
        assert [d.applied_tick for d in drives] == list(range(ticks))
        applied = bytes(controls_to_mask(d.applied_controls) for d in drives)
        wanted = [mask for _, mask in programs[car]]
        # A command that came after its tick (a busy machine) is late and the car held its controls: counted.
        differs = sum(a != w for a, w in zip(applied, wanted, strict=True))
        assert drives[-1].missed_ticks + drives[-1].late_commands >= (differs > 0)
        (replay,) = sessions(1)
        final = client.step(replay, applied)
        assert final.state == drives[-1].observation.state, f"car {car} does not replay from its applied controls"
    busy_free = client.step(ids[0], b"\x01")  # the race released its sessions
    assert busy_free.state.tick == ticks + 1


def test_a_car_that_leaves_is_no_longer_simulated_and_the_race_ends_when_every_car_has_left(
    game_server: GameServer, client: GameClient, sessions: Any
) -> None:
    ids = sessions(2)
    race = _Race(client.stub, _start(ids))
    race.send(_commands({0: [(t, 1) for t in range(200)], 1: [(t, 1) for t in range(200)]}))
    cars_seen: list[list[int]] = []
    for response in race.responses:
        cars_seen.append([c.car for c in response.cars])
        if len(cars_seen) == 3:
            race.send(_commands({}, leave=[0]))
        if cars_seen[-1] == [1] and len(cars_seen) > 6:
            race.send(_commands({}, leave=[1]))
    race.send(None)
    assert cars_seen[0] == [0, 1] and cars_seen[-1] == [1], cars_seen
    first_alone = cars_seen.index([1])
    assert all(cars == [1] for cars in cars_seen[first_alone:])  # a car that left never comes back
    left_at = client.step(ids[0], b"\x00").state.tick - 1
    assert left_at < len(cars_seen)  # car 0 stopped when it left, car 1 went on


@pytest.mark.parametrize(
    ("requests", "code"),
    [
        ([_start([])], grpc.StatusCode.INVALID_ARGUMENT),
        ([_start([f"s{k}" for k in range(65)])], grpc.StatusCode.INVALID_ARGUMENT),
        ([_start(["SESSION", "SESSION"])], grpc.StatusCode.INVALID_ARGUMENT),
        ([_start(["no-such-session"])], grpc.StatusCode.NOT_FOUND),
        ([_commands({0: [(0, 1)]})], grpc.StatusCode.FAILED_PRECONDITION),
        ([_start(["SESSION"]), _start(["SESSION"])], grpc.StatusCode.FAILED_PRECONDITION),
        ([_start(["SESSION"]), _commands({3: [(0, 1)]})], grpc.StatusCode.INVALID_ARGUMENT),
        ([_start(["SESSION"]), _commands({}, leave=[7])], grpc.StatusCode.INVALID_ARGUMENT),
        ([_start(["SESSION"]), _commands({0: [(10_000, 1)]})], grpc.StatusCode.INVALID_ARGUMENT),
    ],
    ids=["no-cars", "65-cars", "twice", "unknown", "no-start", "two-starts", "car-out", "leave-out", "far-ahead"],
)
def test_a_bad_race_is_refused_with_a_clear_status_and_the_server_serves_on(
    game_server: GameServer,
    client: GameClient,
    sessions: Any,
    requests: list[game_pb2.RaceRequest],
    code: grpc.StatusCode,
) -> None:
    (session,) = sessions(1)
    for request in requests:
        if request.WhichOneof("kind") == "start":
            ids = [session if s == "SESSION" else s for s in request.start.session_ids]
            del request.start.session_ids[:]
            request.start.session_ids.extend(ids)
    with pytest.raises(grpc.RpcError) as err:
        for _ in client.stub.Race(iter(requests), timeout=30):
            pass
    assert err.value.code() == code, err.value.details()
    assert err.value.details()
    assert client.step(session, b"\x01").state.tick == 1  # the session is free again, the server serves on


def test_a_session_held_by_a_drive_stream_cannot_race(
    game_server: GameServer, client: GameClient, sessions: Any
) -> None:
    (session,) = sessions(1)
    release: queue.SimpleQueue[None] = queue.SimpleQueue()

    def drive() -> Iterator[game_pb2.DriveRequest]:
        start = game_pb2.DriveStart(session_id=session, mode=game_pb2.DRIVE_MODE_LOCKSTEP)
        yield game_pb2.DriveRequest(start=start)
        yield game_pb2.DriveRequest(command=game_pb2.DriveCommand(tick=0, controls=sim_pb2.Controls()))
        release.get()

    stream = client.stub.Drive(drive(), timeout=30)
    next(stream)  # the Drive stream holds the session now
    try:
        with pytest.raises(grpc.RpcError) as err:
            for _ in client.stub.Race(iter([_start([session])]), timeout=30):
                pass
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
    finally:
        release.put(None)
        list(stream)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny(tmp_path_factory.mktemp("race-model"))


def test_the_autopilot_races_every_car_of_a_server_with_one_request_a_tick(
    game_server: GameServer, model_dir: Path
) -> None:
    config = AutopilotConfig(track=TRACK, mode="realtime", cars=3, max_ticks=40, width=64, height=48)
    pool = RacePool(lambda: InProcessClient.load(model_dir / "model.safetensors"))
    laps: list[Any] = []
    result = run_autopilot(
        config,
        (game_server.address,),
        lambda: pytest.fail("a race asks its pool, not a client per car"),  # type: ignore[arg-type,return-value]
        on_lap=laps.append,
        race_model=lambda: pool,
    )
    assert sorted(lap.car for lap in result.laps) == [0, 1, 2] and len(laps) == 3
    for lap in result.laps:
        assert lap.ticks == 40 and lap.stop_reason == "tick budget 40 spent"
        # As on a Drive stream: every observation is skipped (a newer one came) or answered or fallen back.
        seen = 40 - lap.skipped_frames
        assert len(lap.frame_ms) == seen and len(lap.keys) == seen
        assert len(lap.inference_ms) + lap.fallbacks == seen - 1 == len(lap.slack_ms)
        assert len(lap.applied) >= 40
    # One request a tick for the whole race (and the first decisions), not one per car.
    assert pool.sizes and max(pool.sizes) == 3
    assert len(pool.sizes) <= 41
    assert sum(pool.sizes) == 3 * len(pool.sizes)


class _SlowModel:
    """A model server that always answers after the tick's budget: keys 1 (forward) the first time, then 9."""

    model, version = "slow", ""

    def __init__(self, delay_s: float) -> None:
        self.delay_s, self.calls = delay_s, 0

    def infer_many(self, frames: Any, speeds: Any, timeout_s: float) -> list[Any]:
        from serving.codec import Decision

        self.calls += 1
        time.sleep(self.delay_s)
        return [Decision((0.0,) * 4, 1 if self.calls == 1 else 9) for _ in frames]


def test_an_answer_after_its_deadline_is_what_the_fallbacks_hold_and_no_car_coasts(game_server: GameServer) -> None:
    # Every answer comes after its tick (the budget is under 28 ms): each tick falls back, but the late answers
    # keep the model server alive (no safe mode) and their keys are what the fallbacks hold.
    config = AutopilotConfig(track=TRACK, mode="realtime", cars=2, max_ticks=40, width=64, height=48)
    slow = _SlowModel(0.06)
    result = run_autopilot(
        config, (game_server.address,), lambda: pytest.fail("a race asks its model"),  # type: ignore[arg-type,return-value]
        race_model=lambda: slow,
    )  # fmt: skip
    assert slow.calls >= 3
    for lap in result.laps:
        assert lap.safe_ticks == 0 and lap.inference_errors == 0
        assert lap.fallbacks == len(lap.keys) - 1  # no answer in time, after the first (decided before the start)
        # The first keys were decided before the start; the fallbacks hold the newest (late) answer's keys.
        assert lap.keys[0] == 1 and lap.keys[-1] == 9 and set(lap.keys) == {1, 9}
        assert not lap.inference_ms
