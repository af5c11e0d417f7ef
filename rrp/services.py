"""`rrp game-server`, `rrp scheduler`, `rrp collector`, `rrp auth-proxy`: the long-running gRPC services."""

from __future__ import annotations

from typing import Any

from rrp.command import Commands


def _game_server() -> tuple[type[Any], Any]:
    from game_server.server import GameServerConfig, serve

    def run(config: GameServerConfig) -> int:
        serve(config)
        return 0

    return GameServerConfig, run


def _scheduler() -> tuple[type[Any], Any]:
    from scheduler.server import SchedulerConfig, serve

    def run(config: SchedulerConfig) -> int:
        serve(config)
        return 0

    return SchedulerConfig, run


def _collector() -> tuple[type[Any], Any]:
    from collector.server import CollectorConfig, run

    def run_collector(config: CollectorConfig) -> int:
        run(config)
        return 0

    return CollectorConfig, run_collector


def _auth_proxy() -> tuple[type[Any], Any]:
    from plumbing.authproxy import AuthProxyConfig, run

    def run_proxy(config: AuthProxyConfig) -> int:
        run(config)
        return 0

    return AuthProxyConfig, run_proxy


def register(commands: Commands) -> None:
    commands.add("game-server", _game_server, help="serve the racing game over gRPC")
    commands.add(
        "scheduler",
        _scheduler,
        help="spread Evaluate batches over a pool of game servers",
        description="Serves MapEvaluate and GetPoolStatus over a pool of game servers, given with --servers or "
        "found with --discover (a DNS name re-resolved while running).",
    )
    commands.add(
        "collector",
        _collector,
        help="ingest recorded camera frames into Redis Streams",
        description="Serves CollectorService.Ingest and ListRuns/GetRun on Redis: a given --redis, or a private "
        "redis-server (append-only file on) in --redis-dir.",
    )
    commands.add(
        "auth-proxy",
        _auth_proxy,
        help="admit only callers with the shared bearer token to a local gRPC server",
        description="Holds a pod's gRPC port in front of a server bound to loopback (TorchServe): callers must send "
        "'authorization: Bearer TOKEN' (--token-file); every method is forwarded byte for byte to --upstream.",
    )
