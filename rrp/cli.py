"""The `rrp` command: one entry point, one subcommand per component; it parses, sets up logging and delegates."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rrp.config import env

if TYPE_CHECKING:
    from trainer.evolve_job import PoolSpec


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _add_server_flags(p: argparse.ArgumentParser, default_port: int) -> None:
    p.add_argument("--host", default=env("host", "127.0.0.1", str), help="address to bind (RRP_HOST)")
    p.add_argument(
        "--port", type=int, default=env("port", default_port, int), help="port, 0 = any free (RRP_PORT)"
    )
    p.add_argument(
        "--workers", type=int, default=env("workers", 16, int), help="RPC worker threads (RRP_WORKERS)"
    )


def cmd_game_server(args: argparse.Namespace) -> int:
    from game_server.game import GameConfig
    from game_server.server import GameServerConfig, serve
    from rrp.bootstrap import ServerConfig

    config = GameServerConfig(
        server=ServerConfig(
            host=args.host, port=args.port, max_workers=args.workers, service_name="game-server"
        ),
        game=GameConfig(
            max_sessions=args.max_sessions,
            idle_timeout_s=args.idle_timeout,
            evaluate_slots=args.evaluate_slots,
        ),
    )
    serve(config)
    return 0


def cmd_scheduler(args: argparse.Namespace) -> int:
    from rrp.bootstrap import ServerConfig
    from scheduler.executor import PoolConfig
    from scheduler.server import SchedulerConfig, serve

    if bool(args.servers) == bool(args.discover):
        raise SystemExit("rrp scheduler: give either --servers or --discover (RRP_SERVERS, RRP_DISCOVER)")
    try:
        pool = PoolConfig(
            servers=tuple(a.strip() for a in args.servers.split(",") if a.strip()),
            discover=args.discover or None,
            discover_interval_s=args.discover_interval,
            evaluate_timeout_s=args.evaluate_timeout,
            health_timeout_s=args.health_timeout,
            health_interval_s=args.health_interval,
            max_attempts=args.max_attempts,
            max_pending=args.max_pending,
        )
    except ValueError as exc:
        raise SystemExit(f"rrp scheduler: {exc}") from exc
    server = ServerConfig(host=args.host, port=args.port, max_workers=args.workers, service_name="scheduler")
    serve(SchedulerConfig(pool=pool, server=server))
    return 0


def cmd_play(args: argparse.Namespace) -> int:
    from game_server.core import physics
    from game_server.core.tracks import load_track
    from game_server.play import run_play

    run_play(load_track(args.track), physics.step)
    return 0


def _pool_spec(args: argparse.Namespace) -> PoolSpec:
    from trainer.evolve_job import PoolSpec

    servers = tuple(a for a in (args.servers or "").split(",") if a)
    return PoolSpec(
        servers=servers, discover=args.discover, local_servers=args.local_servers, in_process=args.in_process
    )


def cmd_evolve(args: argparse.Namespace) -> int:
    from trainer.evolve import EvolveConfig
    from trainer.evolve_job import run_evolve_job

    config = EvolveConfig(
        track=args.track,
        kind=args.kind,
        population=args.population,
        generations=args.generations,
        seed=args.seed,
        extra_tracks=tuple(t for t in (args.extra_tracks or "").split(",") if t),
    )
    outcome = run_evolve_job(config, Path(args.out), _pool_spec(args), resume=args.resume)
    return 0 if outcome.best.lap_ticks else 1


def cmd_run(args: argparse.Namespace) -> int:
    from rrp.mainjob import MainJobConfig, run_main_job

    return run_main_job(MainJobConfig(track=args.track, out_dir=Path(args.out), frames=args.frames))


def _add_pool_flags(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument("--servers", default=env("servers", "", str), help="game servers host:port,... (RRP_SERVERS)")
    where.add_argument(
        "--discover", default=env("discover", None, str), help="DNS name[:port] of the game servers (RRP_DISCOVER)"
    )
    where.add_argument("--in-process", action="store_true", help="evaluate in this process with the builtin map")
    p.add_argument(
        "--local-servers", type=int, default=2, help="without --servers/--discover: game servers to start here"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rrp", description="RallyRoboPilot: race, evolve, collect, train, serve."
    )
    parser.add_argument(
        "--log-level", default=env("log_level", "INFO", str), help="logging level (RRP_LOG_LEVEL)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("game-server", help="serve the racing game over gRPC")
    _add_server_flags(p, 50051)
    p.add_argument(
        "--max-sessions",
        type=int,
        default=env("max_sessions", 32, int),
        help="session limit (RRP_MAX_SESSIONS)",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=env("idle_timeout", 300.0, float),
        help="seconds before an idle session is closed (RRP_IDLE_TIMEOUT)",
    )
    p.add_argument(
        "--evaluate-slots",
        type=int,
        default=env("evaluate_slots", 2, int),
        help="concurrent Evaluate calls before RESOURCE_EXHAUSTED (RRP_EVALUATE_SLOTS)",
    )
    p.set_defaults(func=cmd_game_server)

    p = sub.add_parser("scheduler", help="spread Evaluate batches over a pool of game servers")
    _add_server_flags(p, 50052)
    p.add_argument(
        "--servers", default=env("servers", "", str), help="game servers, host:port,host:port (RRP_SERVERS)"
    )
    p.add_argument(
        "--discover",
        default=env("discover", "", str),
        help="DNS name[:port] resolving to the game servers, re-resolved periodically (RRP_DISCOVER)",
    )
    p.add_argument(
        "--discover-interval",
        type=float,
        default=env("discover_interval", 5.0, float),
        help="seconds between DNS resolutions (RRP_DISCOVER_INTERVAL)",
    )
    p.add_argument(
        "--evaluate-timeout",
        type=float,
        default=env("evaluate_timeout", 60.0, float),
        help="deadline of one Evaluate call, seconds (RRP_EVALUATE_TIMEOUT)",
    )
    p.add_argument(
        "--health-timeout",
        type=float,
        default=env("health_timeout", 2.0, float),
        help="deadline of one health check, seconds (RRP_HEALTH_TIMEOUT)",
    )
    p.add_argument(
        "--health-interval",
        type=float,
        default=env("health_interval", 1.0, float),
        help="seconds between health checks of every server (RRP_HEALTH_INTERVAL)",
    )
    p.add_argument(
        "--max-attempts",
        type=int,
        default=env("max_attempts", 4, int),
        help="attempts per evaluation when servers fail (RRP_MAX_ATTEMPTS)",
    )
    p.add_argument(
        "--max-pending",
        type=int,
        default=env("max_pending", 4096, int),
        help="evaluations queued before submitters wait (RRP_MAX_PENDING)",
    )
    p.set_defaults(func=cmd_scheduler)

    p = sub.add_parser("play", help="drive the game yourself in a window (WASD or arrows, R reset, Esc quit)")
    p.add_argument("--track", default="oval", help="track name: a built-in or gen-<seed>")
    p.set_defaults(func=cmd_play)

    p = sub.add_parser("evolve", help="evolve a fast lap (open-loop program) or a closed-loop driver with DEAP")
    p.add_argument("--track", default=env("track", "kidney", str), help="training track (RRP_TRACK)")
    p.add_argument("--kind", choices=["program", "driver"], default="program", help="individual kind")
    p.add_argument("--population", type=int, default=32, help="individuals per generation")
    p.add_argument("--generations", type=int, default=10, help="generations after the initial one")
    p.add_argument("--seed", type=int, default=0, help="seed of the whole run")
    p.add_argument("--extra-tracks", default="", help="driver kind: more tracks to average over (a,b,...)")
    p.add_argument("--out", default=env("out", "out/evolve", str), help="folder for checkpoint, plots, driver")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    _add_pool_flags(p)
    p.set_defaults(func=cmd_evolve)

    p = sub.add_parser("run", help="the main job: start services, drive a lap, write the report")
    p.add_argument("--track", default=env("track", "kidney", str), help="track to race (RRP_TRACK)")
    p.add_argument("--out", default=env("out", "out/run", str), help="output folder (RRP_OUT)")
    p.add_argument("--frames", type=int, default=12, help="camera frames in the strip")
    p.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
