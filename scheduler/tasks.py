"""Evaluation tasks: how to ask a game server and how to read its answer; data, never code to ship."""

from __future__ import annotations

import functools
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import grpc

from game_server.evaluation import evaluate_batch, evaluate_in_process
from plumbing.errors import DomainError, status_name
from rallyrobopilot.v1 import game_pb2, sim_pb2

R_co = TypeVar("R_co", covariant=True)
R = TypeVar("R")


class EvaluationError(Exception):
    """An evaluation failed: a bad task (its own error), or a server fault that outlived the retries."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


@runtime_checkable
class RemoteTask(Protocol[R_co]):
    """What EvaluationPool runs: a description of an Evaluate call, never a pickled function.

    `task(*args)` and `task.result(server.Evaluate(task.request(*args)))` must give the same value, so
    that GA code gets the same fitness from the builtin `map` as from `EvaluationPool.map`.
    """

    def request(self, *args: Any, **kwargs: Any) -> game_pb2.EvaluateRequest: ...

    def result(self, response: game_pb2.EvaluateResponse) -> R_co: ...

    def __call__(self, *args: Any, **kwargs: Any) -> R_co: ...


def evaluate_locally(request: game_pb2.EvaluateRequest) -> game_pb2.EvaluateResponse:
    """Runs an Evaluate call in this process; a task's error raises EvaluationError, as a remote one does."""
    try:
        response = evaluate_in_process(request)
    except DomainError as exc:
        raise EvaluationError(grpc.StatusCode[status_name(exc)], str(exc)) from exc
    return response


def map_in_process(fn: Callable[..., R], *iterables: Iterable[Any]) -> list[R]:
    """The builtin `map`, with the Evaluate calls of a task all made as one in-process EvaluateBatch, so
    that drivers on one track run as one population (the same results, several times faster). The first
    task that fails raises EvaluationError, as it would in the builtin map."""
    task: Any = fn
    bound: tuple[Any, ...] = ()
    keywords: dict[str, Any] = {}
    while isinstance(task, functools.partial):  # DEAP's toolbox.register wraps every function in one
        bound, keywords = (*task.args, *bound), {**task.keywords, **keywords}
        task = task.func
    if not isinstance(task, EvaluationTask):
        return list(map(fn, *iterables))
    requests = [task.request(*bound, *args, **keywords) for args in zip(*iterables, strict=False)]
    if not requests:
        return []
    results: list[R] = []
    for item in evaluate_batch(requests, max_response_bytes=sys.maxsize).items:
        if item.WhichOneof("outcome") == "error":
            code = next((c for c in grpc.StatusCode if c.value[0] == item.error.code), grpc.StatusCode.UNKNOWN)
            raise EvaluationError(code, item.error.message)
        results.append(task.result(item.response))
    return results


class EvaluationTask(ABC, Generic[R]):
    """Base of tasks: subclasses build the request and read the response; calling runs it in process."""

    @abstractmethod
    def request(self, *args: Any, **kwargs: Any) -> game_pb2.EvaluateRequest: ...

    @abstractmethod
    def result(self, response: game_pb2.EvaluateResponse) -> R: ...

    def __call__(self, *args: Any, **kwargs: Any) -> R:
        return self.result(evaluate_locally(self.request(*args, **kwargs)))


class LapTask(EvaluationTask[sim_pb2.LapResult]):
    """Runs one control program (bytes, one mask per tick) on a track and returns its LapResult."""

    def __init__(
        self,
        track: str,
        *,
        max_ticks: int = 0,
        start_state: sim_pb2.SimState | None = None,
        finish_gate: sim_pb2.Gate | None = None,
    ) -> None:
        self.track = track
        self.max_ticks = max_ticks
        self.start_state = start_state
        self.finish_gate = finish_gate

    def request(self, masks: bytes) -> game_pb2.EvaluateRequest:
        return game_pb2.EvaluateRequest(
            track=self.track,
            program=sim_pb2.ControlProgram(masks=bytes(masks)),
            start_state=self.start_state,
            finish_gate=self.finish_gate,
            max_ticks=self.max_ticks,
        )

    def result(self, response: game_pb2.EvaluateResponse) -> sim_pb2.LapResult:
        return response.result

    def __repr__(self) -> str:
        return f"LapTask(track={self.track!r}, max_ticks={self.max_ticks})"


class RequestTask(EvaluationTask[game_pb2.EvaluateResponse]):
    """Sends a ready-made EvaluateRequest and returns the whole response; what MapEvaluate forwards."""

    def request(self, request: game_pb2.EvaluateRequest) -> game_pb2.EvaluateRequest:
        if not isinstance(request, game_pb2.EvaluateRequest):
            raise TypeError(f"RequestTask takes an EvaluateRequest, not {type(request).__name__}")
        return request

    def result(self, response: game_pb2.EvaluateResponse) -> game_pb2.EvaluateResponse:
        return response
