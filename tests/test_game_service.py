"""GameService through its public protocol: sessions, stepping, driving, evaluation and every error path."""

from __future__ import annotations

import math
import random
import threading
import time

import grpc
import numpy as np
import pytest

from game_server.client import GameClient, frame_array
from game_server.core.state import BACK, FORWARD, LEFT, RIGHT
from game_server.game import GameConfig
from game_server.server import GameServerConfig, create_game_server
from plumbing.bootstrap import ServerConfig
from rallyrobopilot.v1 import game_pb2, game_pb2_grpc, sim_pb2


def random_program(seed: int, n: int) -> bytes:
    rng = random.Random(seed)
    choices = [FORWARD, FORWARD | LEFT, FORWARD | RIGHT, 0, BACK, LEFT, RIGHT]
    weights = [6, 2, 2, 1, 1, 1, 1]
    return bytes(rng.choices(choices, weights, k=n))


def code_of(call: object, *args: object, **kwargs: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)  # type: ignore[operator]
    return info.value.code()  # type: ignore[attr-defined,no-any-return]


def test_tracks_listed_and_fetched(client: GameClient) -> None:
    tracks = client.list_tracks()
    assert len(tracks) >= 3
    assert len({t.difficulty for t in tracks}) >= 3
    for summary in tracks:
        track = client.get_track(summary.name)
        assert len(track.centerline) == len(track.left_wall) == len(track.right_wall) == len(track.half_width_m)
        assert track.length_m == pytest.approx(summary.length_m)
        assert len(track.checkpoints) >= 3
    generated = client.get_track("gen-7")
    assert generated.name == "gen-7" and len(generated.centerline) > 50
    assert client.get_track("gen-7") == generated


def test_unknown_and_malformed_tracks(client: GameClient) -> None:
    assert code_of(client.get_track, "no-such-track") == grpc.StatusCode.NOT_FOUND
    assert code_of(client.get_track, "gen-abc") == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(client.get_track, "") == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(client.create_session, "no-such-track") == grpc.StatusCode.NOT_FOUND
    assert code_of(client.evaluate, "no-such-track", b"\x01") == grpc.StatusCode.NOT_FOUND


def test_session_limit_and_close(client: GameClient) -> None:
    ids = []
    try:
        while True:
            try:
                ids.append(client.create_session("oval").session_id)
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                break
            assert len(ids) <= 6
        assert len(ids) >= 1
        client.close_session(ids.pop())
        ids.append(client.create_session("oval").session_id)
    finally:
        for sid in ids:
            client.close_session(sid)
    assert code_of(client.close_session, ids[0]) == grpc.StatusCode.NOT_FOUND
    assert code_of(client.step, "0123456789abcdef", b"\x01") == grpc.StatusCode.NOT_FOUND
    assert code_of(client.step, "", b"\x01") == grpc.StatusCode.INVALID_ARGUMENT


def test_a_session_block_closes_its_session_however_it_ends(
    client: GameClient, caplog: pytest.LogCaptureFixture
) -> None:
    open_before = client.server_info().open_sessions
    with pytest.raises(RuntimeError), client.session("oval") as created:
        assert client.server_info().open_sessions == open_before + 1
        client.step(created.session_id, b"\x01" * 3)
        raise RuntimeError("the block fails")
    assert client.server_info().open_sessions == open_before
    assert code_of(client.step, created.session_id, b"\x01") == grpc.StatusCode.NOT_FOUND
    # A session already gone (closed by the block, reaped as idle) is logged on the way out, not raised over it.
    with client.session("oval") as gone:
        client.close_session(gone.session_id)
    assert f"session {gone.session_id}" in caplog.text and "NOT_FOUND" in caplog.text
    assert client.server_info().open_sessions == open_before


def test_idle_sessions_expire() -> None:
    server = create_game_server(
        GameServerConfig(
            server=ServerConfig(port=0),
            game=GameConfig(max_sessions=1, idle_timeout_s=0.3),
            reap_interval_s=0.1,
        )
    )
    try:
        with GameClient(server.address) as c:
            sid = c.create_session("oval").session_id
            c.step(sid, b"\x01")
            time.sleep(0.8)
            assert code_of(c.step, sid, b"\x01") == grpc.StatusCode.NOT_FOUND
            c.create_session("oval")  # the slot was freed
    finally:
        server.stop(0.2)


def test_step_validation(client: GameClient) -> None:
    sid = client.create_session("oval").session_id
    try:
        assert code_of(client.step, sid, b"") == grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(client.step, sid, b"\x01\x10") == grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(client.step, sid, bytes(100_001)) == grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(client.step, sid, bytes(9 * 1024 * 1024)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        obs = client.step(sid, bytes([FORWARD]) * 25)
        assert obs.state.tick == 25
        assert len(obs.rays_m) == 15
        assert all(0.0 < r <= 100.0 for r in obs.rays_m)
        assert obs.state.car.speed_m_per_s > 0
    finally:
        client.close_session(sid)


def test_reset_to_base_and_given_state(client: GameClient) -> None:
    created = client.create_session("oval")
    sid = created.session_id
    try:
        mid = client.step(sid, random_program(3, 120))
        client.step(sid, random_program(4, 60))
        back = client.reset(sid, mid.state)
        assert back.state == mid.state
        base = client.reset(sid)
        assert base.state == created.observation.state
        bad = sim_pb2.SimState()
        bad.CopyFrom(mid.state)
        bad.car.speed_m_per_s = math.nan
        assert code_of(client.reset, sid, bad) == grpc.StatusCode.INVALID_ARGUMENT
        bad.car.speed_m_per_s = 80.0
        assert code_of(client.reset, sid, bad) == grpc.StatusCode.INVALID_ARGUMENT
        bad.CopyFrom(mid.state)
        bad.car.x_m = 1e6
        assert code_of(client.reset, sid, bad) == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        client.close_session(sid)


def test_evaluate_validation(client: GameClient) -> None:
    assert code_of(client.evaluate, "oval", b"") == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(client.evaluate, "oval", b"\xff") == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(client.evaluate, "oval", b"\x01", max_ticks=100_001) == grpc.StatusCode.INVALID_ARGUMENT
    same = sim_pb2.Gate(a=sim_pb2.Vec2(x_m=1, y_m=1), b=sim_pb2.Vec2(x_m=1, y_m=1))
    assert code_of(client.evaluate, "oval", b"\x01", finish_gate=same) == grpc.StatusCode.INVALID_ARGUMENT
    result = client.evaluate("oval", b"", max_ticks=10).result
    assert result.ticks == 10 and not result.finished


def _drive_requests(*messages: game_pb2.DriveRequest) -> list[game_pb2.DriveRequest]:
    return list(messages)


def _cmd(tick: int, mask: int = FORWARD) -> game_pb2.DriveRequest:
    controls = sim_pb2.Controls(forward=bool(mask & 1), back=bool(mask & 2), left=bool(mask & 4), right=bool(mask & 8))
    return game_pb2.DriveRequest(command=game_pb2.DriveCommand(tick=tick, controls=controls))


def _start(sid: str, mode: int, **kw: object) -> game_pb2.DriveRequest:
    return game_pb2.DriveRequest(start=game_pb2.DriveStart(session_id=sid, mode=mode, **kw))  # type: ignore[arg-type]


def test_drive_errors(client: GameClient) -> None:
    stub = game_pb2_grpc.GameServiceStub(client.channel)
    sid = client.create_session("oval").session_id
    try:

        def drive(*messages: game_pb2.DriveRequest) -> list[game_pb2.DriveResponse]:
            return list(stub.Drive(iter(messages), timeout=10))

        assert code_of(drive, _cmd(0)) == grpc.StatusCode.FAILED_PRECONDITION
        assert code_of(drive, _start(sid, game_pb2.DRIVE_MODE_UNSPECIFIED)) == grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(drive, _start("nope", game_pb2.DRIVE_MODE_LOCKSTEP)) == grpc.StatusCode.NOT_FOUND
        lock = game_pb2.DRIVE_MODE_LOCKSTEP
        assert code_of(drive, _start(sid, lock), _cmd(5)) == grpc.StatusCode.FAILED_PRECONDITION
        assert code_of(drive, _start(sid, lock), _cmd(0), _start(sid, lock)) == grpc.StatusCode.FAILED_PRECONDITION
        # The failed streams applied exactly one command; the session is usable and at tick 1.
        assert client.step(sid, b"\x00").state.tick == 2
    finally:
        client.close_session(sid)


def test_busy_session_refuses_concurrent_calls(client: GameClient) -> None:
    stub = game_pb2_grpc.GameServiceStub(client.channel)
    sid = client.create_session("oval").session_id
    gate = threading.Event()

    def requests():  # type: ignore[no-untyped-def]
        yield _start(sid, game_pb2.DRIVE_MODE_LOCKSTEP)
        yield _cmd(0)
        gate.wait(10)

    try:
        stream = stub.Drive(requests(), timeout=20)
        next(stream)  # the stream now holds the session
        assert code_of(client.step, sid, b"\x01") == grpc.StatusCode.FAILED_PRECONDITION
        gate.set()
        list(stream)
        assert client.step(sid, b"\x01").state.tick == 2
    finally:
        gate.set()
        client.close_session(sid)


def test_drive_realtime_counts_late_commands(client: GameClient) -> None:
    stub = game_pb2_grpc.GameServiceStub(client.channel)
    sid = client.create_session("oval").session_id
    n = 30

    def requests():  # type: ignore[no-untyped-def]
        yield _start(sid, game_pb2.DRIVE_MODE_REALTIME, max_ticks=n)
        for t in range(n):
            yield _cmd(t)  # sent ahead of time: never late
        time.sleep(0.6)
        yield _cmd(0)  # far in the past: late
        yield _cmd(1)  # late
        time.sleep(1.0)

    try:
        t0 = time.monotonic()
        responses = list(stub.Drive(requests(), timeout=20))
        elapsed = time.monotonic() - t0
        assert len(responses) == n
        assert [r.applied_tick for r in responses] == list(range(n))
        assert responses[-1].late_commands == 2
        assert responses[-1].missed_ticks == 0
        assert elapsed >= (n - 1) / 25 * 0.95  # paced by the wall clock
        assert responses[-1].observation.state.car.speed_m_per_s > 0
    finally:
        client.close_session(sid)


def test_drive_says_which_controls_each_tick_ran_with_and_they_replay_the_drive(client: GameClient) -> None:
    """Real time with gaps: a tick without its own command holds the controls of the tick before, and the applied
    controls the stream reports replay the drive exactly (what a lap record of a real-time lap is made of)."""
    stub = game_pb2_grpc.GameServiceStub(client.channel)
    sid = client.create_session("oval").session_id
    n = 40
    sent = {t: (FORWARD | (LEFT if t % 10 < 5 else RIGHT)) for t in range(n) if t % 3 != 2}  # every 3rd tick missed

    def requests():  # type: ignore[no-untyped-def]
        yield _start(sid, game_pb2.DRIVE_MODE_REALTIME, max_ticks=n)
        for t, mask in sent.items():
            yield _cmd(t, mask)
        time.sleep(n / 25 + 1.0)

    try:
        responses = list(stub.Drive(requests(), timeout=20))
        applied = [_mask(r.applied_controls) for r in responses]
        expected, held = [], 0
        for t in range(n):
            held = sent.get(t, held)
            expected.append(held)
        assert applied == expected and responses[-1].missed_ticks == n - len(sent)
        replay = client.evaluate("oval", bytes(applied), max_ticks=n)
        assert replay.result.final_state == responses[-1].observation.state
    finally:
        client.close_session(sid)


def _mask(c: sim_pb2.Controls) -> int:
    return int(c.forward) | int(c.back) << 1 | int(c.left) << 2 | int(c.right) << 3


def test_frames_over_grpc(client: GameClient) -> None:
    opts = sim_pb2.FrameOptions(width_px=128, height_px=96)
    sid = client.create_session("oval", opts).session_id
    try:
        first = client.reset(sid, with_frame=True)
        img0 = frame_array(first.frame)
        assert img0.shape == (96, 128, 3)
        assert img0.std() > 5
        moved = frame_array(client.step(sid, bytes([FORWARD]) * 40, with_frame=True).frame)
        assert not np.array_equal(img0, moved)
        again = frame_array(client.reset(sid, with_frame=True).frame)
        assert np.array_equal(img0, again)
        assert client.reset(sid).HasField("frame") is False
    finally:
        client.close_session(sid)
    bad = sim_pb2.FrameOptions(width_px=4000, height_px=96)
    assert code_of(client.create_session, "oval", bad) == grpc.StatusCode.INVALID_ARGUMENT


def test_evaluate_closed_loop_driver(client: GameClient) -> None:
    from game_server.core.drivers import N_PARAMS, RAYS_V1, default_driver
    from game_server.evaluation import evaluate_in_process

    driver = sim_pb2.DriverParams(kind=RAYS_V1, params=default_driver().params)
    request = game_pb2.EvaluateRequest(track="kidney", driver=driver, max_ticks=3000, return_trajectory=True)
    remote = client.stub.Evaluate(request, timeout=30)
    assert remote.result.finished and remote.result.lap_ticks > 0
    assert remote == evaluate_in_process(request)
    assert len(remote.trajectory.x_m) == remote.result.lap_ticks
    bad = [
        game_pb2.EvaluateRequest(track="kidney", driver=driver),  # no max_ticks
        game_pb2.EvaluateRequest(track="kidney", max_ticks=10, driver=sim_pb2.DriverParams(kind="nn", params=[0.0])),
        game_pb2.EvaluateRequest(
            track="kidney", max_ticks=10, driver=sim_pb2.DriverParams(kind=RAYS_V1, params=[0.0] * (N_PARAMS - 1))
        ),
        game_pb2.EvaluateRequest(
            track="kidney", max_ticks=10, driver=sim_pb2.DriverParams(kind=RAYS_V1, params=[99.0] * N_PARAMS)
        ),
    ]
    for req in bad:
        assert code_of(client.stub.Evaluate, req, timeout=10) == grpc.StatusCode.INVALID_ARGUMENT


def test_server_info_and_busy_slots(client: GameClient) -> None:
    info = client.server_info()
    assert info.evaluate_slots >= 1 and info.max_sessions == 6 and info.version
    server = create_game_server(GameServerConfig(server=ServerConfig(port=0), game=GameConfig(evaluate_slots=1)))
    try:
        with GameClient(server.address) as c:
            assert c.server_info().evaluate_slots == 1
            futures = [
                c.stub.Evaluate.future(
                    game_pb2.EvaluateRequest(track="oval", program=sim_pb2.ControlProgram(masks=b"\x05" * 100_000)),
                    timeout=60,
                )
                for _ in range(3)
            ]
            codes = []
            for f in futures:
                try:
                    f.result()
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as err:
                    codes.append(err.code())
            assert grpc.StatusCode.OK in codes
            assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
            assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    finally:
        server.stop(0.2)
