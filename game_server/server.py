"""Game server lifecycle: build the service, serve, reap idle sessions, shut down on a signal."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from game_server import metrics
from game_server.core.state import SimState
from game_server.core.track import Track
from game_server.game import FrameRenderer, Game, GameConfig
from game_server.recording import connect_collector
from game_server.servicer import GameServicer
from plumbing.bootstrap import RunningServer, ServerConfig, create_server, serve_until_signal
from plumbing.channels import ClientTLS, channel_credentials
from plumbing.settings import nested, setting
from rallyrobopilot.v1 import game_pb2, game_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = game_pb2.DESCRIPTOR.services_by_name["GameService"].full_name


@dataclass(frozen=True)
class GameServerConfig:
    server: ServerConfig = nested(lambda: ServerConfig(port=50051, service_name="game-server"))
    game: GameConfig = nested(GameConfig)
    # Record calls stream frames to a collector: with a CA, over TLS.
    collector_tls: ClientTLS = nested(ClientTLS)
    reap_interval_s: float = setting(10.0, "seconds between sweeps that close idle sessions")


def _default_renderer() -> FrameRenderer:
    # The process's one renderer: a second in-process server (tests, tools) shares it instead of failing.
    from game_server.render.renderer import shared_renderer

    return _CountedRenderer(shared_renderer())


class _CountedRenderer:
    """Counts the frames a renderer makes, for the metrics."""

    def __init__(self, inner: FrameRenderer) -> None:
        self.inner = inner

    def render(self, track: Track, state: SimState, spec: Any) -> np.ndarray:
        frame = self.inner.render(track, state, spec)
        metrics.FRAMES.inc()
        return frame

    def render_many(self, views: list[tuple[Track, SimState, Any]]) -> list[np.ndarray]:
        frames = self.inner.render_many(views)
        metrics.FRAMES.inc(len(frames))
        return frames


@dataclass
class GameServer:
    running: RunningServer
    game: Game
    _stop: threading.Event

    @property
    def port(self) -> int:
        return self.running.port

    @property
    def address(self) -> str:
        return self.running.address

    def stop(self, grace_s: float | None = None) -> None:
        self._stop.set()
        self.running.stop(grace_s)
        metrics.GAMES.forget(self.game)


def create_game_server(config: GameServerConfig) -> GameServer:
    tls = config.collector_tls
    if tls.enabled:
        channel_credentials(tls)  # a missing or bad file fails the start, not the first Record call
    game = Game(config.game, _default_renderer)
    metrics.GAMES.track(game)

    def register(server: grpc.Server) -> Sequence[str]:
        servicer = GameServicer(game, config.server.max_message_bytes, functools.partial(connect_collector, tls=tls))
        game_pb2_grpc.add_GameServiceServicer_to_server(servicer, server)
        return [SERVICE_NAME]

    # The scheduler's health probe reads GetServerInfo beside the health check: never refuse it for capacity.
    running = create_server(config.server, register, always_admitted=[f"/{SERVICE_NAME}/GetServerInfo"])
    stop = threading.Event()

    def reap() -> None:
        while not stop.wait(config.reap_interval_s):
            expired = game.sessions.expire_idle()
            if expired:
                log.info("expired %d idle sessions", expired)

    threading.Thread(target=reap, daemon=True, name="session-reaper").start()
    return GameServer(running, game, stop)


def serve(config: GameServerConfig) -> None:
    server = create_game_server(config)
    print(f"game server listening on {server.address}", flush=True)
    serve_until_signal(server.running, on_stop=server._stop.set)
