"""Where jobs get their services: a pool of game servers (given, discovered or started here) and a collector."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from plumbing.channels import ClientTLS
from plumbing.procs import ServiceProcess, start_service
from plumbing.settings import nested, setting
from scheduler.executor import EvaluationPool, PoolConfig

READY_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class PoolSpec:
    """Where a job's evaluations run: given servers, a DNS name, or N local servers started here."""

    servers: tuple[str, ...] = setting((), "game servers host:port,...; none: start --local-servers here")
    discover: str | None = setting(None, "DNS name[:port] resolving to the game servers (a headless Service)")
    local_servers: int = setting(2, "without --servers/--discover: game servers started here and stopped after")
    tls: ClientTLS = nested(ClientTLS)  # how the given or discovered servers are called (local ones: plaintext)

    def __post_init__(self) -> None:
        if self.servers and self.discover:
            raise ValueError("give --servers or --discover, not both")
        if self.local_servers < 1:
            raise ValueError("--local-servers must be at least 1")


@contextlib.contextmanager
def service(args: Sequence[str], env: Mapping[str, str] | None = None) -> Iterator[ServiceProcess]:
    """One `rrp` service as a child process, stopped (SIGTERM, then SIGKILL) when the block ends."""
    proc = start_service(list(args), env=dict(env or {}))
    try:
        yield proc
    finally:
        proc.stop()


@contextlib.contextmanager
def local_game_servers(n: int) -> Iterator[list[ServiceProcess]]:
    """`n` game servers on free ports of this machine."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(service(["game-server", "--port", "0"])) for _ in range(n)]


@contextlib.contextmanager
def open_pool(spec: PoolSpec, evaluate_timeout_s: float = 60.0) -> Iterator[tuple[EvaluationPool, str]]:
    """An EvaluationPool over the spec's servers (starting local ones if none are given) and a description."""
    with contextlib.ExitStack() as stack:
        if spec.servers or spec.discover:
            servers, where, tls = spec.servers, ",".join(spec.servers) or f"dns:{spec.discover}", spec.tls
        else:
            procs = stack.enter_context(local_game_servers(spec.local_servers))
            servers = tuple(p.address for p in procs)
            where = f"{len(procs)} local game servers ({', '.join(servers)})"
            tls = ClientTLS()
        config = PoolConfig(servers=servers, discover=spec.discover, evaluate_timeout_s=evaluate_timeout_s, tls=tls)
        pool = stack.enter_context(EvaluationPool(config))
        pool.wait_ready(1, timeout_s=READY_TIMEOUT_S)
        yield pool, where


@contextlib.contextmanager
def collector_for(address: str | None, redis_url: str | None, data_dir: Path) -> Iterator[tuple[str, str | None]]:
    """Yields a collector address and the private Redis data folder (None if there is none), starting a
    collector here unless `address` is given: on `redis_url`, or on a private Redis whose data stays in
    `data_dir`. The URL goes through the environment, never the command line, as it may hold a password."""
    if address:
        yield address, None
        return
    args = ["collector", "--port", "0", "--redis-dir", str(data_dir)]
    with service(args, {"RRP_REDIS_URL": redis_url or ""}) as proc:
        yield proc.address, None if redis_url else str(data_dir)
