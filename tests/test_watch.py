"""WatchSession: a watched lap is the unwatched lap, real time misses no tick, watchers are bounded and refused
clearly, and a watcher that stalls or dies costs the session nothing."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from game_server.client import GameClient
from game_server.core.pilot import drive_lap
from game_server.core.tracks import load_track
from game_server.game import GameConfig
from game_server.server import GameServer, GameServerConfig, create_game_server
from plumbing.bootstrap import ServerConfig
from plumbing.procs import rrp_command
from rallyrobopilot.v1 import game_pb2, game_pb2_grpc, sim_pb2

MAX_WATCHERS = 2


@pytest.fixture(scope="module")
def server() -> Iterator[GameServer]:
    running = create_game_server(
        GameServerConfig(
            server=ServerConfig(port=0, service_name="game-watch-test"),
            game=GameConfig(max_sessions=4, max_watchers=MAX_WATCHERS),
        )
    )
    yield running
    running.stop(0.5)


@pytest.fixture()
def client(server: GameServer) -> Iterator[GameClient]:
    with GameClient(server.address, timeout_s=30.0) as c:
        yield c


@pytest.fixture(scope="module")
def keys() -> bytes:
    return drive_lap(load_track("oval"))[0]


def code_of(stream: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        next(stream)  # type: ignore[call-overload]
    return info.value.code()  # type: ignore[attr-defined,no-any-return]


def drive(client: GameClient, session_id: str, keys: bytes) -> list[bytes]:
    """Drives `keys` in lockstep; every tick's state, serialised."""
    first = client.reset(session_id)
    policy = lambda obs: keys[obs.state.tick] if obs.state.tick < len(keys) else None  # noqa: E731
    return [r.observation.state.SerializeToString() for r in client.drive_lockstep(session_id, policy, first)]


class Watcher:
    """Reads a WatchSession stream on its own thread; `stall` keeps it from reading after its first message."""

    def __init__(self, client: GameClient, session_id: str, rate_hz: int = 60, stall: bool = False) -> None:
        self.stream = client.watch(session_id, rate_hz, timeout_s=120)
        self.messages: list[game_pb2.WatchSessionResponse] = []
        self.attached, self.resume = threading.Event(), threading.Event()
        self.stall, self.error = stall, None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        assert self.attached.wait(30), "the watcher got no first state"

    def _read(self) -> None:
        try:
            for message in self.stream:
                self.messages.append(message)
                self.attached.set()
                if self.stall:
                    self.resume.wait(60)
                    self.stall = False
        except grpc.RpcError as exc:
            self.error = exc
            self.attached.set()

    def join(self) -> list[game_pb2.WatchSessionResponse]:
        self.resume.set()
        self.thread.join(30)
        assert not self.thread.is_alive() and self.error is None, self.error
        return self.messages


def test_a_watched_lockstep_lap_is_the_unwatched_lap(client: GameClient, keys: bytes) -> None:
    with client.session("oval") as plain:
        unwatched = drive(client, plain.session_id, keys)
    with client.session("oval") as watched_session:
        sid = watched_session.session_id
        reader, stalled = Watcher(client, sid), Watcher(client, sid, stall=True)
        watched = drive(client, sid, keys)
    assert watched == unwatched  # the same keys gave the same states, tick for tick
    final = sim_pb2.SimState.FromString(unwatched[-1])
    assert final.lap.finished and final.lap.finish_tick == len(keys)
    for w in (reader, stalled):
        seen = w.join()  # the stream ends after the session's last state once it closes
        ticks = [m.state.tick for m in seen]
        # In tick order; tick 0 may come twice (the base state, then the reset's, when the watcher joined first).
        assert ticks == sorted(ticks) and ticks[0] == 0 and ticks[2:] == sorted(set(ticks[2:]))
        assert seen[-1].state == final and seen[-1].progress_fraction == 1.0
        assert {m.session_id for m in seen} == {sid} and {m.track for m in seen} == {"oval"}
        # Every state the session published (the base state, the reset, one per tick) was sent or counted.
        assert len(seen) + sum(m.skipped_states for m in seen) == len(keys) + 2
    # The stalled watcher held nothing back: the lap ran to its end while it read nothing (drive() returned
    # before it was let go), and it skipped states rather than queueing them all.
    assert sum(m.skipped_states for m in stalled.messages) > 0


def test_a_watched_realtime_drive_misses_no_tick(client: GameClient, keys: bytes) -> None:
    n = 50
    stub = game_pb2_grpc.GameServiceStub(client.channel)
    with client.session("oval") as reference:
        expected = drive(client, reference.session_id, keys[:n])[-1]
    with client.session("oval") as created:
        sid = created.session_id
        watchers = [Watcher(client, sid), Watcher(client, sid, rate_hz=5)]

        def requests() -> Iterator[game_pb2.DriveRequest]:
            yield game_pb2.DriveRequest(
                start=game_pb2.DriveStart(session_id=sid, mode=game_pb2.DRIVE_MODE_REALTIME, max_ticks=n)
            )
            for tick in range(n):
                mask = keys[tick]
                controls = sim_pb2.Controls(forward=bool(mask & 1), back=bool(mask & 2), left=bool(mask & 4),
                                            right=bool(mask & 8))  # fmt: skip
                yield game_pb2.DriveRequest(command=game_pb2.DriveCommand(tick=tick, controls=controls))

        responses = list(stub.Drive(requests(), timeout=30))
    assert len(responses) == n
    assert responses[-1].missed_ticks == 0 and responses[-1].late_commands == 0
    assert responses[-1].observation.state.SerializeToString() == expected
    fast, slow = (w.join() for w in watchers)
    assert fast[-1].state.tick == slow[-1].state.tick == n
    assert len(fast) > len(slow) >= 2  # 5 states a second over a 2 s drive: it skipped most


def test_hostile_watch_requests_get_clear_statuses(server: GameServer, client: GameClient) -> None:
    assert code_of(client.watch("no-such-session", timeout_s=10)) == grpc.StatusCode.NOT_FOUND
    assert code_of(client.watch("x" * 65, timeout_s=10)) == grpc.StatusCode.INVALID_ARGUMENT
    assert len(server.game.sessions) == 0  # the tests before closed theirs
    assert code_of(client.watch("", timeout_s=10)) == grpc.StatusCode.NOT_FOUND  # nothing to watch
    with client.session("oval") as first, client.session("kidney") as second:
        assert code_of(client.watch(first.session_id, 61, timeout_s=10)) == grpc.StatusCode.INVALID_ARGUMENT
        watchers = [client.watch("", timeout_s=30) for _ in range(MAX_WATCHERS)]  # empty: the oldest session
        assert [next(w).session_id for w in watchers] == [first.session_id] * MAX_WATCHERS
        assert code_of(client.watch(first.session_id, timeout_s=10)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        other = client.watch(second.session_id, timeout_s=30)  # the limit is per session
        assert next(other).track == "kidney"
        other.cancel()
        for w in watchers:
            w.cancel()
        # A cancelled watcher frees its place (the server notices within a poll).
        deadline = time.monotonic() + 10
        feed = server.game.sessions.get(first.session_id).feed
        while feed.watchers:
            assert time.monotonic() < deadline, "cancelled watchers were not released"
            time.sleep(0.02)
        again = client.watch(first.session_id, timeout_s=30)
        assert next(again).state.tick == 0
        client.close_session(first.session_id)
        assert list(again) == []  # the stream ends with OK once the session is gone (its last state was sent)


def test_rrp_watch_without_a_display_says_how_to_get_one() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    done = subprocess.run([*rrp_command(), "watch"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "no display" in done.stderr and "xvfb-run" in done.stderr and "Traceback" not in done.stderr
