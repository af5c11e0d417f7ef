"""GameService under hostile clients: idle streams, abandoned work, huge replies, edge values, bad bytes."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from game_server.core.drivers import default_driver
from game_server.core.tracks import load_track
from game_server.game import GameConfig
from game_server.server import GameServer, GameServerConfig, create_game_server
from plumbing.bootstrap import ServerConfig
from rallyrobopilot.v1 import game_pb2, game_pb2_grpc, sim_pb2
from tests.latency import assert_not_starved, call_times_ms

U64_MAX = 2**64 - 1
U32_MAX = 2**32 - 1
# A finish gate far off the track: the car never crosses it, so a run lasts all its ticks.
NEVER = sim_pb2.Gate(a=sim_pb2.Vec2(x_m=1e5, y_m=1e5), b=sim_pb2.Vec2(x_m=1e5 + 1, y_m=1e5))


@pytest.fixture(scope="module")
def server() -> Iterator[GameServer]:
    s = create_game_server(
        GameServerConfig(
            server=ServerConfig(port=0, service_name="game-reliability", max_streams=230, stream_idle_timeout_s=30.0),
            game=GameConfig(max_sessions=256),
        )
    )
    yield s
    s.stop(0.5)


@pytest.fixture(scope="module")
def channel(server: GameServer) -> Iterator[grpc.Channel]:
    options = [("grpc.max_receive_message_length", 16 * 1024 * 1024)]
    with grpc.insecure_channel(server.address, options=options) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> game_pb2_grpc.GameServiceStub:
    return game_pb2_grpc.GameServiceStub(channel)


def health_of(channel: grpc.Channel) -> int:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
    return int(reply.status)


class IdleDrive:
    """A Drive stream that sends its start and then nothing, until closed."""

    def __init__(self, stub: game_pb2_grpc.GameServiceStub, session_id: str, timeout: float | None = None) -> None:
        self.inbox: queue.Queue[game_pb2.DriveRequest | None] = queue.Queue()
        self.inbox.put(
            game_pb2.DriveRequest(start=game_pb2.DriveStart(session_id=session_id, mode=game_pb2.DRIVE_MODE_LOCKSTEP))
        )
        self.call = stub.Drive(self._requests(), timeout=timeout)

    def _requests(self) -> Iterator[game_pb2.DriveRequest]:
        while (item := self.inbox.get()) is not None:
            yield item

    def close(self) -> None:
        self.inbox.put(None)
        self.call.cancel()


def test_200_idle_drive_streams_leave_health_and_unary_calls_fast(
    server: GameServer, channel: grpc.Channel, stub: game_pb2_grpc.GameServiceStub
) -> None:
    def info() -> None:
        stub.GetServerInfo(game_pb2.GetServerInfoRequest(), timeout=2)

    idle_health, idle_info = call_times_ms(lambda: health_of(channel)), call_times_ms(info)
    sessions = [stub.CreateSession(game_pb2.CreateSessionRequest(track="oval")).session_id for _ in range(200)]
    streams = [IdleDrive(stub, sid) for sid in sessions]
    try:
        time.sleep(0.5)  # every stream reached the server and blocks there
        assert health_of(channel) == health_pb2.HealthCheckResponse.SERVING
        assert_not_starved(call_times_ms(lambda: health_of(channel)), idle_health)
        assert_not_starved(call_times_ms(info), idle_info)
    finally:
        for s in streams:
            s.close()
        for sid in sessions:
            stub.CloseSession(game_pb2.CloseSessionRequest(session_id=sid), timeout=5)


def test_streams_past_the_limit_are_refused_and_idle_ones_closed() -> None:
    small = create_game_server(
        GameServerConfig(
            server=ServerConfig(port=0, service_name="game-small", max_streams=3, stream_idle_timeout_s=1.0),
            game=GameConfig(max_sessions=8),
        )
    )
    try:
        with grpc.insecure_channel(small.address) as ch:
            stub = game_pb2_grpc.GameServiceStub(ch)
            sids = [stub.CreateSession(game_pb2.CreateSessionRequest(track="oval")).session_id for _ in range(4)]
            streams = [IdleDrive(stub, sid, timeout=20) for sid in sids[:3]]
            time.sleep(0.3)
            extra = IdleDrive(stub, sids[3], timeout=5)
            with pytest.raises(grpc.RpcError) as refused:
                next(extra.call)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "3 streams" in (refused.value.details() or "")
            assert health_of(ch) == health_pb2.HealthCheckResponse.SERVING
            # Idle for over a second: the server closes them, and says why.
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as idle:
                next(streams[0].call)
            assert idle.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "idle" in (idle.value.details() or "")
            assert time.monotonic() - t0 < 5
            # Their sessions are free again: a new Drive on one of them is served.
            time.sleep(0.3)
            drive = stub.Drive(
                iter(
                    [
                        game_pb2.DriveRequest(start=game_pb2.DriveStart(session_id=sids[0], mode=1)),
                        game_pb2.DriveRequest(command=game_pb2.DriveCommand(tick=0)),
                    ]
                ),
                timeout=5,
            )
            assert [r.applied_tick for r in drive] == [0]
            for s in streams:
                s.close()
    finally:
        small.stop(0.2)


def busy_slots(stub: game_pb2_grpc.GameServiceStub) -> int:
    return int(stub.GetServerInfo(game_pb2.GetServerInfoRequest(), timeout=2).evaluate_running)


def wait_free(stub: game_pb2_grpc.GameServiceStub, within_s: float) -> float:
    t0 = time.monotonic()
    while busy_slots(stub):
        assert time.monotonic() - t0 < within_s, "the slot stayed busy after its caller left"
        time.sleep(0.01)
    return time.monotonic() - t0


def long_driver_task(ticks: int = 100_000) -> game_pb2.EvaluateRequest:
    return game_pb2.EvaluateRequest(
        track="oval",
        driver=sim_pb2.DriverParams(kind="rays-v1", params=list(default_driver().params)),
        max_ticks=ticks,
        finish_gate=NEVER,
    )


@pytest.mark.parametrize("batch", [False, True])
def test_work_stops_when_its_caller_leaves(stub: game_pb2_grpc.GameServiceStub, batch: bool) -> None:
    with pytest.raises(grpc.RpcError) as err:
        if batch:
            stub.EvaluateBatch(game_pb2.EvaluateBatchRequest(tasks=[long_driver_task()] * 60), timeout=0.5)
        else:
            stub.Evaluate(long_driver_task(), timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_free(stub, within_s=0.5) < 0.5


def test_cancelled_evaluate_frees_its_slot(stub: game_pb2_grpc.GameServiceStub) -> None:
    future = stub.Evaluate.future(long_driver_task(), timeout=30)
    t0 = time.monotonic()
    while not busy_slots(stub):
        assert time.monotonic() - t0 < 5
        time.sleep(0.01)
    future.cancel()
    assert wait_free(stub, within_s=0.5) < 0.5


def trajectory_task(ticks: int) -> game_pb2.EvaluateRequest:
    return game_pb2.EvaluateRequest(
        track="oval",
        program=sim_pb2.ControlProgram(masks=bytes([1]) * 200),
        max_ticks=ticks,
        finish_gate=NEVER,
        return_trajectory=True,
    )


def test_a_batch_reply_never_exceeds_the_message_limit(stub: game_pb2_grpc.GameServiceStub) -> None:
    alone = stub.Evaluate(trajectory_task(100_000), timeout=60)
    size = alone.ByteSize()
    assert size > 3_000_000
    reply = stub.EvaluateBatch(game_pb2.EvaluateBatchRequest(tasks=[trajectory_task(100_000)] * 4), timeout=120)
    assert reply.ByteSize() <= 8 * 1024 * 1024
    outcomes = [item.WhichOneof("outcome") for item in reply.items]
    assert outcomes[:2] == ["response", "response"] and "error" in outcomes
    for item in reply.items:
        if item.WhichOneof("outcome") == "response":
            assert item.response == alone
        else:
            assert item.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            assert "alone" in item.error.message


def state_with(**changes: object) -> sim_pb2.SimState:
    """The oval's base state with some fields changed (names: tick, or lap fields)."""
    from game_server import convert

    state = convert.state_to_pb(load_track("oval").base_state)
    for name, value in changes.items():
        target = state if name == "tick" else state.lap
        setattr(target, name, value)
    return state


EDGE_STATES = {
    "tick at 2**64-1": state_with(tick=U64_MAX),
    "wall_contacts at 2**32-1": state_with(tick=U64_MAX // 2, wall_contacts=U32_MAX),
    "checkpoints_passed at 2**32-1": state_with(checkpoints_passed=U32_MAX),
    "next_checkpoint at 2**32-1": state_with(next_checkpoint=U32_MAX),
    "segment at 2**32-1": state_with(segment=U32_MAX),
    "arc_m 1e300": state_with(arc_m=1e300),
    "progress_m -1e300": state_with(progress_m=-1e300),
    "finished at tick 2**64-1": state_with(finished=True, finish_tick=U64_MAX),
    "finished at tick 0": state_with(finished=True, finish_tick=0),
    "finish_tick without finishing": state_with(finish_tick=5),
    "wall_contacts beyond the ticks": state_with(tick=3, wall_contacts=4),
}


@pytest.mark.parametrize("case", sorted(EDGE_STATES))
def test_edge_values_are_refused_at_the_edge(stub: game_pb2_grpc.GameServiceStub, case: str) -> None:
    state = EDGE_STATES[case]
    sid = stub.CreateSession(game_pb2.CreateSessionRequest(track="oval")).session_id
    try:
        with pytest.raises(grpc.RpcError) as reset:
            stub.Reset(game_pb2.ResetRequest(session_id=sid, state=state), timeout=5)
        assert reset.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # The session is not poisoned: it still steps.
        stub.Step(game_pb2.StepRequest(session_id=sid, controls=sim_pb2.ControlProgram(masks=b"\x01")), timeout=5)
    finally:
        stub.CloseSession(game_pb2.CloseSessionRequest(session_id=sid), timeout=5)
    request = game_pb2.EvaluateRequest(
        track="oval", program=sim_pb2.ControlProgram(masks=b"\x01" * 10), start_state=state
    )
    with pytest.raises(grpc.RpcError) as evaluate:
        stub.Evaluate(request, timeout=5)
    assert evaluate.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    good = game_pb2.EvaluateRequest(track="oval", program=sim_pb2.ControlProgram(masks=b"\x01" * 10))
    batch = stub.EvaluateBatch(game_pb2.EvaluateBatchRequest(tasks=[good, request, good]), timeout=10)
    codes = [item.error.code if item.WhichOneof("outcome") == "error" else 0 for item in batch.items]
    assert codes == [0, grpc.StatusCode.INVALID_ARGUMENT.value[0], 0]


def test_max_ticks_below_the_program_length_stops_the_run(stub: game_pb2_grpc.GameServiceStub) -> None:
    masks = sim_pb2.ControlProgram(masks=b"\x01" * 80)
    short = stub.Evaluate(game_pb2.EvaluateRequest(track="oval", program=masks, max_ticks=30), timeout=5)
    assert short.result.ticks == 30
    whole = stub.Evaluate(game_pb2.EvaluateRequest(track="oval", program=masks), timeout=5)
    assert whole.result.ticks == 80
    coast = stub.Evaluate(game_pb2.EvaluateRequest(track="oval", program=masks, max_ticks=120), timeout=5)
    assert coast.result.ticks == 120


def test_max_ticks_over_the_limit_names_max_ticks(stub: game_pb2_grpc.GameServiceStub) -> None:
    request = game_pb2.EvaluateRequest(track="oval", program=sim_pb2.ControlProgram(masks=b"\x01"), max_ticks=100_001)
    with pytest.raises(grpc.RpcError) as err:
        stub.Evaluate(request, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_ticks" in (err.value.details() or "")


def test_wall_contacts_count_this_run_only(stub: game_pb2_grpc.GameServiceStub) -> None:
    crash = sim_pb2.ControlProgram(masks=bytes([1 | 4]) * 200)  # full throttle, steering into a wall
    first = stub.Evaluate(game_pb2.EvaluateRequest(track="oval", program=crash, return_trajectory=True), timeout=5)
    assert first.result.wall_contacts == len(first.trajectory.wall_contact_ticks) > 0
    again = stub.Evaluate(
        game_pb2.EvaluateRequest(
            track="oval", program=crash, start_state=first.result.final_state, return_trajectory=True
        ),
        timeout=5,
    )
    assert again.result.wall_contacts == len(again.trajectory.wall_contact_ticks)
    assert again.result.final_state.lap.wall_contacts == first.result.wall_contacts + again.result.wall_contacts


@pytest.mark.parametrize(
    "method", ["/rallyrobopilot.v1.GameService/Evaluate", "/rallyrobopilot.v1.GameService/GetTrack"]
)
def test_undecodable_request_bytes_are_invalid_argument(channel: grpc.Channel, method: str) -> None:
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as err:
        call(b"\xff\xff\xff\xff", timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert health_of(channel) == health_pb2.HealthCheckResponse.SERVING


def test_undecodable_drive_message_is_invalid_argument(channel: grpc.Channel) -> None:
    call = channel.stream_stream("/rallyrobopilot.v1.GameService/Drive", None, None)
    with pytest.raises(grpc.RpcError) as err:
        list(call(iter([b"\x0a\xff\xff"]), timeout=5))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_errors_quote_a_short_prefix_of_huge_input(stub: game_pb2_grpc.GameServiceStub) -> None:
    huge = "x" * 3_000_000
    with pytest.raises(grpc.RpcError) as track:
        stub.GetTrack(game_pb2.GetTrackRequest(track=huge), timeout=5)
    assert track.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as record:
        stub.Record(
            game_pb2.RecordRequest(
                run_id="r1",
                track="oval",
                program=sim_pb2.ControlProgram(masks=b"\x01"),
                max_ticks=5,
                collector_address=huge,
                encoding=1,
            ),
            timeout=5,
        )
    assert record.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(record.value.details() or "") < 300
    kind = "k" * 3_000_000
    with pytest.raises(grpc.RpcError) as driver:
        stub.Evaluate(
            game_pb2.EvaluateRequest(track="oval", driver=sim_pb2.DriverParams(kind=kind), max_ticks=5), timeout=5
        )
    assert driver.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(driver.value.details() or "") < 300


def test_health_stays_fast_while_evaluations_run(channel: grpc.Channel, stub: game_pb2_grpc.GameServiceStub) -> None:
    idle = call_times_ms(lambda: health_of(channel), n=30)
    futures = [stub.Evaluate.future(long_driver_task(20_000), timeout=30) for _ in range(6)]
    try:
        assert_not_starved(call_times_ms(lambda: health_of(channel), n=30), idle)
    finally:
        for f in futures:
            f.cancel()
        threading.Event().wait(0.1)
    wait_free(stub, within_s=1.0)


def rss_mb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) // 1024
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_memory_stays_bounded_under_repeated_maximum_trajectories() -> None:
    from plumbing.procs import start_service

    proc = start_service(["game-server", "--port", "0"])
    try:
        options = [("grpc.max_receive_message_length", 16 * 1024 * 1024)]
        with grpc.insecure_channel(proc.address, options=options) as ch:
            stub = game_pb2_grpc.GameServiceStub(ch)
            task = trajectory_task(100_000)
            peak = 0
            for _ in range(2):
                batch = stub.EvaluateBatch.future(game_pb2.EvaluateBatchRequest(tasks=[task] * 6), timeout=120)
                single = [stub.Evaluate(task, timeout=120) for _ in range(2)]
                assert batch.result().ByteSize() <= 8 * 1024 * 1024 and len(single) == 2
                peak = max(peak, rss_mb(proc.pid))
            assert peak <= 400, peak
    finally:
        proc.stop()


def test_readme_examples_are_as_long_as_they_say() -> None:
    import base64
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    evaluate = re.search(r'# 50 ticks of "forward".*?"masks": "([^"]+)"', readme, re.S)
    step = re.search(r'stepped 25 ticks.*?"masks": "([^"]+)"', readme, re.S)
    assert evaluate and step
    assert base64.b64decode(evaluate.group(1)) == b"\x01" * 50
    assert base64.b64decode(step.group(1)) == b"\x01" * 25
    map_line = next(line for line in readme.splitlines() if "grpcurl" in line and '"tasks"' in line)
    assert "-emit-defaults" in map_line


def test_unary_calls_past_the_limit_are_refused_but_health_and_server_info_never() -> None:
    small = create_game_server(
        GameServerConfig(server=ServerConfig(port=0, service_name="game-unary", max_workers=2), game=GameConfig())
    )
    try:
        with grpc.insecure_channel(small.address) as ch:
            stub = game_pb2_grpc.GameServiceStub(ch)
            sids = [stub.CreateSession(game_pb2.CreateSessionRequest(track="oval")).session_id for _ in range(2)]
            steps = [
                stub.Step.future(
                    game_pb2.StepRequest(session_id=sid, controls=sim_pb2.ControlProgram(masks=b"\x01" * 100_000)),
                    timeout=60,
                )
                for sid in sids
            ]
            time.sleep(0.2)
            with pytest.raises(grpc.RpcError) as refused:
                stub.ListTracks(game_pb2.ListTracksRequest(), timeout=5)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert health_of(ch) == health_pb2.HealthCheckResponse.SERVING
            assert stub.GetServerInfo(game_pb2.GetServerInfoRequest(), timeout=2).max_sessions > 0
            for step in steps:
                assert step.result().observation.state.tick == 100_000
    finally:
        small.stop(0.2)
