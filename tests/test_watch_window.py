"""`rrp watch` end to end: two watcher windows on a real-time lap, one killed mid-lap; the lap misses no tick and
is the lockstep lap, state for state, and the surviving window saw every state or counted it skipped."""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from game_server.client import GameClient
from game_server.core.pilot import drive_lap
from game_server.core.tracks import load_track
from game_server.game import GameConfig
from game_server.server import GameServer, GameServerConfig, create_game_server
from plumbing.bootstrap import ServerConfig
from plumbing.procs import rrp_command
from rallyrobopilot.v1 import game_pb2, game_pb2_grpc, sim_pb2

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("Xvfb") is None, reason="needs Xvfb"),
]
TRACK = "kidney"  # the shortest lap of the built-in tracks: ~19 s in real time
AHEAD_TICKS = 50  # commands are sent this far ahead of the simulation (it takes up to 250)


@pytest.fixture()
def display() -> Iterator[str]:
    """A private X server; the test starts and stops it."""
    number = next(n for n in range(120, 220) if not Path(f"/tmp/.X{n}-lock").exists())
    xvfb = subprocess.Popen(
        ["Xvfb", f":{number}", "-screen", "0", "800x600x24", "-nolisten", "tcp"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while not Path(f"/tmp/.X11-unix/X{number}").exists():
        assert time.monotonic() < deadline and xvfb.poll() is None, "Xvfb did not start"
        time.sleep(0.05)
    try:
        yield f":{number}"
    finally:
        xvfb.terminate()
        xvfb.wait(10)


@pytest.fixture()
def server() -> Iterator[GameServer]:
    running = create_game_server(
        GameServerConfig(server=ServerConfig(port=0, service_name="game-watch-window"), game=GameConfig(max_sessions=4))
    )
    yield running
    running.stop(0.5)


class Window:
    """An `rrp watch` process, its output read line by line on a thread."""

    def __init__(self, display: str, address: str, session_id: str, *extra: str) -> None:
        size = ["--width", "320", "--height", "240", "--fps", "15"]
        self.proc = subprocess.Popen(
            [*rrp_command(), "watch", "--game", address, "--session", session_id, *size, *extra],
            env={**os.environ, "DISPLAY": display},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)

    def wait_for(self, prefix: str, timeout_s: float = 90.0) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"no line {prefix!r} from rrp watch:\n{''.join(self.output)[-3000:]}") from None
            if line.startswith(prefix):
                return line

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def realtime_lap(
    client: GameClient, session_id: str, keys: bytes, on_tick: dict[int, Callable[[], object]]
) -> list[game_pb2.DriveResponse]:
    """Drives `keys` in 25 Hz real time, commands sent AHEAD_TICKS ahead; calls on_tick[t]() at tick t."""
    stub = game_pb2_grpc.GameServiceStub(client.channel)
    done = threading.Condition()
    reached = [0]

    def requests() -> Iterator[game_pb2.DriveRequest]:
        start = game_pb2.DriveStart(session_id=session_id, mode=game_pb2.DRIVE_MODE_REALTIME, max_ticks=len(keys))
        yield game_pb2.DriveRequest(start=start)
        for tick, mask in enumerate(keys):
            with done:
                done.wait_for(lambda t=tick: t < reached[0] + AHEAD_TICKS, timeout=30)
            controls = sim_pb2.Controls(forward=bool(mask & 1), back=bool(mask & 2), left=bool(mask & 4),
                                        right=bool(mask & 8))  # fmt: skip
            yield game_pb2.DriveRequest(command=game_pb2.DriveCommand(tick=tick, controls=controls))

    responses = []
    for response in stub.Drive(requests(), timeout=120):
        responses.append(response)
        with done:
            reached[0] = response.applied_tick + 1
            done.notify_all()
        action = on_tick.get(response.applied_tick)
        if action is not None:
            action()
    return responses


def test_rrp_watch_windows_never_slow_a_realtime_lap(display: str, server: GameServer) -> None:
    keys, result = drive_lap(load_track(TRACK))
    with GameClient(server.address) as client:
        with client.session(TRACK) as reference:
            first = client.reset(reference.session_id)
            policy = lambda obs: keys[obs.state.tick] if obs.state.tick < len(keys) else None  # noqa: E731
            expected = [r.observation.state for r in client.drive_lockstep(reference.session_id, policy, first)]
        sid = client.create_session(TRACK).session_id
        kept = Window(display, server.address, sid, "--exit-at-end")
        killed = Window(display, server.address, sid, "--view", "driver")
        try:
            for window in (kept, killed):
                assert sid in window.wait_for("watching session")
            feed = server.game.sessions.get(sid).feed
            assert feed.watchers == 2
            responses = realtime_lap(client, sid, keys, {150: lambda: killed.proc.send_signal(signal.SIGKILL)})
            ended = killed.proc.wait(10)
            if ended != -signal.SIGKILL:  # it ended by itself before the kill: the race must not care either way
                warnings.warn(f"the second window ended with {ended}: {''.join(killed.output)[-2000:]}", stacklevel=1)
            # The lap ran at 25 Hz with a command for every tick while both windows watched and one died.
            assert responses[-1].missed_ticks == 0 and responses[-1].late_commands == 0
            assert [r.observation.state for r in responses] == expected  # the lockstep lap, state for state
            assert responses[-1].observation.state.lap.finish_tick == result.lap_ticks
            deadline = time.monotonic() + 10
            while feed.watchers != 1:  # the killed window's stream was released
                assert time.monotonic() < deadline, f"{feed.watchers} watchers"
                time.sleep(0.02)
            client.close_session(sid)  # the kept window's stream ends, and the window closes by itself
            summary = kept.wait_for("watched ")
            assert kept.proc.wait(30) == 0, "".join(kept.output)[-3000:]
        finally:
            kept.stop()
            killed.stop()
    # Every state the session published (the base state and one per tick) was drawn or counted skipped.
    found = re.match(r"watched (\d+) states \((\d+) skipped\)", summary)
    assert found, summary
    states, skipped = int(found[1]), int(found[2])
    assert states + skipped == len(keys) + 1
    assert states >= 0.5 * len(keys), summary  # 25 states a second asked: most of the lap arrived
