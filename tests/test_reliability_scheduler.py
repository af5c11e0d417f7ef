"""The pool under heavy and bad work: deadlines sized by ticks, busy servers, huge replies, bad items alone."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from game_server.core.drivers import default_driver
from game_server.game import GameConfig
from game_server.server import GameServer, GameServerConfig, create_game_server
from plumbing.bootstrap import ServerConfig
from rallyrobopilot.v1 import game_pb2, game_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc, sim_pb2
from scheduler.executor import EvaluationPool, PoolConfig
from scheduler.server import SchedulerConfig, create_scheduler_server
from scheduler.tasks import RequestTask

NEVER = sim_pb2.Gate(a=sim_pb2.Vec2(x_m=1e5, y_m=1e5), b=sim_pb2.Vec2(x_m=1e5 + 1, y_m=1e5))


@pytest.fixture(scope="module")
def game() -> Iterator[GameServer]:
    server = create_game_server(
        GameServerConfig(server=ServerConfig(port=0, service_name="game-for-pool"), game=GameConfig(max_sessions=4))
    )
    yield server
    server.stop(0.5)


def driver_task(ticks: int) -> game_pb2.EvaluateRequest:
    return game_pb2.EvaluateRequest(
        track="oval",
        driver=sim_pb2.DriverParams(kind="rays-v1", params=list(default_driver().params)),
        max_ticks=ticks,
        finish_gate=NEVER,
    )


def program_task(masks: bytes = b"\x01" * 50, **fields: object) -> game_pb2.EvaluateRequest:
    return game_pb2.EvaluateRequest(track="oval", program=sim_pb2.ControlProgram(masks=masks), **fields)  # type: ignore[arg-type]


@pytest.mark.slow
def test_heavy_evaluations_succeed_whatever_the_base_deadline(game: GameServer) -> None:
    """Each task takes ~1 s; the base deadline is 0.3 s: deadlines sized by ticks let every one finish."""
    pool = EvaluationPool(PoolConfig(servers=(game.address,), evaluate_timeout_s=0.3, max_attempts=1))
    try:
        pool.wait_ready()
        results = list(pool.map(RequestTask(), [driver_task(8_000)] * 6))
        assert [r.result.ticks for r in results] == [8_000] * 6
        status = pool.status()
        assert status.failed == 0 and all(s.failed == 0 for s in status.servers)
    finally:
        pool.shutdown()


def test_a_busy_server_is_waited_for_not_failed(game: GameServer) -> None:
    """Another client holds both slots for ~1 s: the pool's tasks wait and succeed, using no attempt."""
    with grpc.insecure_channel(game.address) as channel:
        stub = game_pb2_grpc.GameServiceStub(channel)
        hogs = [stub.Evaluate.future(driver_task(8_000), timeout=30) for _ in range(2)]
        pool = EvaluationPool(PoolConfig(servers=(game.address,), max_attempts=1))
        try:
            pool.wait_ready()
            results = list(pool.map(RequestTask(), [program_task()] * 4))
            assert all(r.result.ticks == 50 for r in results)
            assert pool.status().failed == 0
        finally:
            pool.shutdown()
        for hog in hogs:
            hog.result()


@pytest.mark.slow
def test_replies_too_big_to_share_a_batch_still_arrive(game: GameServer) -> None:
    task = program_task(b"\x01" * 200, max_ticks=100_000, finish_gate=NEVER, return_trajectory=True)
    pool = EvaluationPool(PoolConfig(servers=(game.address,)))
    try:
        pool.wait_ready()
        results = list(pool.map(RequestTask(), [task] * 5))
        assert all(len(r.trajectory.x_m) == 100_000 for r in results)
        assert pool.status().failed == 0
    finally:
        pool.shutdown()


def test_one_bad_item_fails_alone_through_map_evaluate(game: GameServer) -> None:
    from game_server import convert
    from game_server.core.tracks import load_track

    state = convert.state_to_pb(load_track("oval").base_state)
    state.tick = 2**64 - 1  # a valid state in every other way: on main it overflowed mid-batch (INTERNAL)
    bad = program_task(start_state=state)
    tasks = [program_task()] * 5 + [bad] + [program_task()] * 5
    scheduler = create_scheduler_server(
        SchedulerConfig(pool=PoolConfig(servers=(game.address,)), server=ServerConfig(port=0))
    )
    try:
        scheduler.pool.wait_ready()
        with grpc.insecure_channel(scheduler.address) as channel:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
            replies = list(stub.MapEvaluate(scheduler_pb2.MapEvaluateRequest(tasks=tasks), timeout=30))
        by_index = {r.index: r for r in replies}
        assert sorted(by_index) == list(range(11))
        for index, reply in by_index.items():
            if index == 5:
                assert reply.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            else:
                assert reply.WhichOneof("outcome") == "response", reply.error.message
    finally:
        scheduler.stop(0.5)


def test_a_long_map_evaluate_is_working_not_idle(game: GameServer) -> None:
    """The idle timeout closes streams that wait on their client, never a call computing its first result."""
    scheduler = create_scheduler_server(
        SchedulerConfig(
            pool=PoolConfig(servers=(game.address,)), server=ServerConfig(port=0, stream_idle_timeout_s=0.3)
        )
    )
    try:
        scheduler.pool.wait_ready()
        with grpc.insecure_channel(scheduler.address) as channel:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
            request = scheduler_pb2.MapEvaluateRequest(tasks=[driver_task(8_000)])
            replies = list(stub.MapEvaluate(request, timeout=60))
        assert [r.response.result.ticks for r in replies] == [8_000]
    finally:
        scheduler.stop(0.5)
