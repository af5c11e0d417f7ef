"""Collector lifecycle: connect to Redis, build the service, serve, shut down on a signal."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import grpc

from collector.ingest import IngestLimits, Ingestor
from collector.servicer import CollectorServicer
from collector.store import FrameStore, RedisConfig
from plumbing.bootstrap import RunningServer, ServerConfig, create_server, serve_until_signal
from plumbing.errors import Unavailable
from plumbing.redis_local import LocalRedis
from plumbing.settings import nested, setting
from rallyrobopilot.v1 import collector_pb2, collector_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = collector_pb2.DESCRIPTOR.services_by_name["CollectorService"].full_name
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # larger messages are refused by gRPC itself with RESOURCE_EXHAUSTED


@dataclass(frozen=True)
class CollectorConfig:
    redis: RedisConfig = nested(RedisConfig, prefix="redis_")
    server: ServerConfig = nested(
        lambda: ServerConfig(port=50053, service_name="collector", max_message_bytes=MAX_MESSAGE_BYTES)
    )
    limits: IngestLimits = nested(IngestLimits)
    # Without a Redis URL: a private redis-server of its own, stopped with the collector.
    redis_dir: Path = setting(Path("out/redis"), "data folder of the private redis-server")
    redis_appendfsync: Literal["always", "everysec"] = setting(
        "always",
        "private redis-server: fsync its append-only file on every write (power-cut safe) or once a second "
        "(3x faster for raw frames; a crash of Redis alone still loses nothing)",
    )


@dataclass
class CollectorServer:
    running: RunningServer
    store: FrameStore

    @property
    def port(self) -> int:
        return self.running.port

    @property
    def address(self) -> str:
        return self.running.address

    def stop(self, grace_s: float | None = None) -> None:
        self.running.stop(grace_s)
        self.store.r.close()


def create_collector_server(config: CollectorConfig) -> CollectorServer:
    """Starts serving even when Redis is down (calls answer UNAVAILABLE until it is back)."""
    store = FrameStore.connect(config.redis)
    try:
        store.ping()
        log.info("Redis at %s answers", config.redis.safe_url)
    except Unavailable as exc:
        log.warning("%s; serving anyway, calls fail with UNAVAILABLE until Redis is back", exc)
    ingestor = Ingestor(store, config.limits)

    def register(server: grpc.Server) -> Sequence[str]:
        collector_pb2_grpc.add_CollectorServiceServicer_to_server(
            CollectorServicer(ingestor, store, config.server.max_message_bytes), server
        )
        return [SERVICE_NAME]

    return CollectorServer(create_server(config.server, register), store)


def run(config: CollectorConfig) -> None:
    """Serves until SIGTERM; on a private redis-server when the config names no Redis."""
    if config.redis.url:
        serve(config)
        return
    local = LocalRedis(config.redis_dir, appendfsync=config.redis_appendfsync, die_with_parent=True).start()
    log.info("no --redis given: started a private redis-server at %s (data in %s)", local.url, local.data_dir)
    try:
        serve(dataclasses.replace(config, redis=dataclasses.replace(config.redis, url=local.url)), on_stop=local.stop)
    finally:
        local.stop()


def serve(config: CollectorConfig, on_stop: Callable[[], None] | None = None) -> None:
    server = create_collector_server(config)
    print(f"collector listening on {server.address}", flush=True)

    def stopped() -> None:
        server.store.r.close()
        if on_stop is not None:
            on_stop()

    serve_until_signal(server.running, on_stop=stopped)
