"""SchedulerService over gRPC: forwards a batch to the EvaluationPool and streams indexed outcomes back."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait

import grpc

from plumbing.errors import InvalidArgument
from rallyrobopilot.v1 import game_pb2, scheduler_pb2, scheduler_pb2_grpc
from scheduler import metrics
from scheduler.core import PoolStatus
from scheduler.executor import EvaluationPool
from scheduler.tasks import EvaluationError, RequestTask

log = logging.getLogger(__name__)

MAX_BATCH = 10_000


def status_to_pb(status: PoolStatus) -> scheduler_pb2.GetPoolStatusResponse:
    return scheduler_pb2.GetPoolStatusResponse(
        servers=[
            scheduler_pb2.ServerStatus(
                address=s.address,
                healthy=s.healthy,
                capacity=s.capacity,
                in_flight=s.in_flight,
                done=s.done,
                failed=s.failed,
            )
            for s in status.servers
        ],
        in_flight=status.in_flight,
        pending=status.pending,
        done=status.done,
        retried=status.retried,
        failed=status.failed,
    )


def outcome_to_pb(index: int, future: Future[game_pb2.EvaluateResponse]) -> scheduler_pb2.MapEvaluateResponse:
    exc = future.exception()
    if exc is None:
        return scheduler_pb2.MapEvaluateResponse(index=index, response=future.result())
    if isinstance(exc, EvaluationError):
        error = game_pb2.TaskError(code=exc.code.value[0], message=exc.details)
    else:
        # A bug, not a task's fault: log it here and send no traceback.
        log.error("evaluation %d failed", index, exc_info=exc)
        error = game_pb2.TaskError(code=grpc.StatusCode.INTERNAL.value[0], message="internal error")
    return scheduler_pb2.MapEvaluateResponse(index=index, error=error)


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    def __init__(self, pool: EvaluationPool) -> None:
        self.pool = pool
        self.task = RequestTask()
        metrics.POOLS.track(pool)

    def MapEvaluate(
        self, request: scheduler_pb2.MapEvaluateRequest, context: grpc.ServicerContext
    ) -> Iterator[scheduler_pb2.MapEvaluateResponse]:
        n = len(request.tasks)
        if not 0 < n <= MAX_BATCH:
            raise InvalidArgument(f"a batch holds 1..{MAX_BATCH} tasks, not {n}")
        futures: dict[Future[game_pb2.EvaluateResponse], int] = {}

        def cancel_rest() -> None:  # the caller went away: free the pool of what has not started
            for future in futures:
                future.cancel()

        context.add_callback(cancel_rest)
        for index, task in enumerate(request.tasks):
            if not context.is_active():
                return
            futures[self.pool.submit(self.task, task)] = index
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                if not future.cancelled():
                    yield outcome_to_pb(futures[future], future)

    def GetPoolStatus(
        self, request: scheduler_pb2.GetPoolStatusRequest, context: grpc.ServicerContext
    ) -> scheduler_pb2.GetPoolStatusResponse:
        return status_to_pb(self.pool.status())
