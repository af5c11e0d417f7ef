"""EvaluateRequest in, EvaluateResponse out: the one evaluation path of servers and in-process runs alike."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import grpc

from game_server import convert
from game_server.core import drivers
from game_server.core.drivers import RayDriver
from game_server.core.physics import RunResult
from game_server.core.state import TICK_HZ, Gate, SimState
from game_server.core.track import Track
from game_server.game import evaluate, evaluation_start
from plumbing.errors import Cancelled, DomainError, ResourceExhausted, status_name
from rallyrobopilot.v1 import game_pb2, sim_pb2

log = logging.getLogger(__name__)

MAX_BATCH = 1024
# One driver item of a batch: (index in the batch, start state, driver, max_ticks).
_Run = tuple[int, SimState, RayDriver, int]


def result_to_pb(r: RunResult) -> sim_pb2.LapResult:
    return sim_pb2.LapResult(
        finished=r.finished,
        lap_ticks=r.lap_ticks,
        lap_time_s=r.lap_ticks / TICK_HZ,
        progress_m=r.progress_m,
        progress_fraction=r.progress_fraction,
        checkpoints_passed=r.checkpoints_passed,
        wall_contacts=r.wall_contacts,
        ticks=r.ticks,
        final_state=convert.state_to_pb(r.final_state),
    )


def evaluation_args(
    request: game_pb2.EvaluateRequest,
) -> tuple[str, SimState | None, bytes | RayDriver, Gate | None]:
    """Unpacks an EvaluateRequest into core arguments; the same for a server and an in-process run."""
    start = convert.state_from_pb(request.start_state) if request.HasField("start_state") else None
    gate = convert.gate_from_pb(request.finish_gate) if request.HasField("finish_gate") else None
    policy: bytes | RayDriver
    if request.WhichOneof("policy") == "driver":
        policy = RayDriver(tuple(request.driver.params), request.driver.kind, request.driver.recovering)
    else:
        policy = request.program.masks
    return request.track, start, policy, gate


def evaluation_response(result: RunResult, with_trajectory: bool) -> game_pb2.EvaluateResponse:
    response = game_pb2.EvaluateResponse(result=result_to_pb(result))
    if with_trajectory and result.trajectory is not None:
        tr = result.trajectory
        response.trajectory.CopyFrom(
            sim_pb2.Trajectory(
                x_m=tr.x.tolist(),
                y_m=tr.y.tolist(),
                heading_rad=tr.heading.tolist(),
                speed_m_per_s=tr.speed.tolist(),
                wall_contact_ticks=list(tr.wall_contact_ticks),
            )
        )
    return response


def evaluate_in_process(
    request: game_pb2.EvaluateRequest, stop: Callable[[], bool] | None = None
) -> game_pb2.EvaluateResponse:
    """What a game server answers to `request`, computed here: for local runs of the same tasks."""
    track, start, policy, gate = evaluation_args(request)
    result = evaluate(track, start, policy, gate, request.max_ticks, request.return_trajectory, stop)
    return evaluation_response(result, request.return_trajectory)


def _item_error(exc: Exception) -> game_pb2.EvaluateBatchItem:
    return game_pb2.EvaluateBatchItem(
        error=game_pb2.TaskError(code=grpc.StatusCode[status_name(exc)].value[0], message=str(exc)[:1024])
    )


def evaluate_item(
    request: game_pb2.EvaluateRequest, stop: Callable[[], bool] | None = None
) -> game_pb2.EvaluateBatchItem:
    """One item of a batch: its response, or its own error; a bad item never fails its neighbours."""
    try:
        return game_pb2.EvaluateBatchItem(response=evaluate_in_process(request, stop))
    except Cancelled:
        raise  # the caller left: nobody waits for the rest of the batch either
    except DomainError as exc:
        return _item_error(exc)
    except Exception:  # a bug hit by this item alone: its neighbours still get their results
        log.exception("evaluation of a batch item failed")
        return _item_error(RuntimeError("internal error"))


def _driver_runs(
    tasks: Sequence[game_pb2.EvaluateRequest], stop: Callable[[], bool] | None
) -> dict[int, game_pb2.EvaluateBatchItem]:
    """The items of a batch that are sensor drivers, each group on one track run as one population
    (drivers.run_drivers: bit for bit the scalar episode, several times faster). Others are left out, and
    so are items that want a trajectory: evaluated one by one, each of those is dropped as soon as it is
    found not to fit in the reply, where a population would hold all of them at once."""
    groups: dict[tuple[str, Gate | None], list[_Run]] = {}
    items: dict[int, game_pb2.EvaluateBatchItem] = {}
    tracks: dict[str, Track] = {}
    for i, task in enumerate(tasks):
        if task.WhichOneof("policy") != "driver" or task.driver.recovering or task.return_trajectory:
            continue
        try:
            name, start, policy, gate = evaluation_args(task)
            tracks[name], begin = evaluation_start(name, start, policy, task.max_ticks)
        except DomainError as exc:
            items[i] = _item_error(exc)
            continue
        except Exception:  # a bug hit by this item alone
            log.exception("evaluation of a batch item failed")
            items[i] = _item_error(RuntimeError("internal error"))
            continue
        assert isinstance(policy, RayDriver)
        groups.setdefault((name, gate), []).append((i, begin, policy, task.max_ticks))
    for (name, gate), runs in groups.items():
        try:
            results = drivers.run_drivers(
                tracks[name],
                [begin for _, begin, _, _ in runs],
                [policy for _, _, policy, _ in runs],
                max_ticks=[ticks for _, _, _, ticks in runs],
                gate=gate,
                cancelled=stop,
            )
        except Cancelled:
            raise
        except Exception:  # a bug hit by this group alone: the rest of the batch still gets its results
            log.exception("evaluation of a population of drivers failed")
            items.update((i, _item_error(RuntimeError("internal error"))) for i, _, _, _ in runs)
            continue
        for (i, _, _, _), result in zip(runs, results, strict=True):
            items[i] = game_pb2.EvaluateBatchItem(response=evaluation_response(result, False))
    return items


def evaluate_batch(
    tasks: Sequence[game_pb2.EvaluateRequest], max_response_bytes: int, stop: Callable[[], bool] | None = None
) -> game_pb2.EvaluateBatchResponse:
    """Every item evaluated as if alone (sensor drivers on one track together, as one population); an
    item whose response would push the batch's reply past `max_response_bytes` is answered
    RESOURCE_EXHAUSTED instead (sent alone, or in a smaller batch, it fits)."""
    response = game_pb2.EvaluateBatchResponse()
    drivers_done = _driver_runs(tasks, stop)
    used = 0
    for i, task in enumerate(tasks):
        item = drivers_done[i] if i in drivers_done else evaluate_item(task, stop)
        size = item.ByteSize() + 16  # the item's tag and length prefix
        if used + size > max_response_bytes and item.WhichOneof("outcome") == "response":
            item = _item_error(
                ResourceExhausted(
                    f"this item's response ({size} bytes) does not fit in the batch's reply of at most "
                    f"{max_response_bytes} bytes; send it alone or in a smaller batch"
                )
            )
            size = item.ByteSize() + 16
        used += size
        response.items.append(item)
    return response
