"""Scheduler lifecycle: build the pool and the service, serve, drain the pool on a signal."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from plumbing.bootstrap import RunningServer, ServerConfig, create_server, serve_until_signal
from plumbing.settings import nested
from rallyrobopilot.v1 import scheduler_pb2, scheduler_pb2_grpc
from scheduler.executor import EvaluationPool, PoolConfig
from scheduler.servicer import SchedulerServicer

log = logging.getLogger(__name__)

SERVICE_NAME = scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"].full_name


@dataclass(frozen=True)
class SchedulerConfig:
    pool: PoolConfig
    server: ServerConfig = nested(lambda: ServerConfig(port=50052, service_name="scheduler"))


@dataclass
class SchedulerServer:
    running: RunningServer
    pool: EvaluationPool

    @property
    def address(self) -> str:
        return self.running.address

    def stop(self, grace_s: float | None = None) -> None:
        self.running.stop(grace_s)
        self.pool.shutdown(wait=True, cancel_futures=True)


def create_scheduler_server(config: SchedulerConfig) -> SchedulerServer:
    pool = EvaluationPool(config.pool)

    def register(server: grpc.Server) -> Sequence[str]:
        scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(SchedulerServicer(pool), server)
        return [SERVICE_NAME]

    try:
        running = create_server(config.server, register)
    except Exception:
        pool.shutdown(wait=False)
        raise
    return SchedulerServer(running, pool)


def serve(config: SchedulerConfig) -> None:
    server = create_scheduler_server(config)
    print(f"scheduler listening on {server.address}", flush=True)
    serve_until_signal(server.running, on_stop=lambda: server.pool.shutdown(wait=True, cancel_futures=True))
