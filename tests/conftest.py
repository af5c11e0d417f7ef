"""Shared fixtures: real game servers on ephemeral ports, in process and as separate processes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from game_server.client import GameClient
from game_server.game import GameConfig
from game_server.server import GameServer, GameServerConfig, create_game_server
from plumbing.bootstrap import ServerConfig
from plumbing.procs import ServiceProcess, start_service


@pytest.fixture(scope="session")
def game_server() -> Iterator[GameServer]:
    server = create_game_server(
        GameServerConfig(
            server=ServerConfig(port=0, service_name="game-server-test"),
            game=GameConfig(max_sessions=6, idle_timeout_s=300.0),
        )
    )
    yield server
    server.stop(0.5)


@pytest.fixture()
def client(game_server: GameServer) -> Iterator[GameClient]:
    with GameClient(game_server.address, timeout_s=30.0) as c:
        yield c


@pytest.fixture(scope="session")
def game_server_processes() -> Iterator[list[ServiceProcess]]:
    """Two separate server processes, for cross-process determinism and CLI-level checks."""
    procs = [start_service(["game-server", "--port", "0", "--max-sessions", "4"]) for _ in range(2)]
    yield procs
    for p in procs:
        p.stop()
