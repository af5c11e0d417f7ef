"""SchedulerService through its public protocol: the `rrp scheduler` process, the Python stub and grpcurl."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from plumbing.procs import ServiceProcess, start_service
from rallyrobopilot.v1 import game_pb2, scheduler_pb2, scheduler_pb2_grpc, sim_pb2
from scheduler.tasks import RequestTask

GRPCURL = str(Path(__file__).resolve().parent.parent / ".venv" / "bin" / "grpcurl")


@pytest.fixture(scope="module")
def scheduler_process() -> Iterator[ServiceProcess]:
    games = [start_service(["game-server", "--port", "0", "--evaluate-slots", "2"]) for _ in range(2)]
    servers = ",".join(g.address for g in games)
    scheduler = start_service(["scheduler", "--port", "0", "--servers", servers], env={"RRP_HEALTH_INTERVAL": "0.2"})
    yield scheduler
    assert scheduler.stop() == 0
    for g in games:
        g.stop()


@pytest.fixture(scope="module")
def stub(scheduler_process: ServiceProcess) -> Iterator[scheduler_pb2_grpc.SchedulerServiceStub]:
    with grpc.insecure_channel(scheduler_process.address) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        deadline = time.monotonic() + 20
        while not all(s.healthy for s in stub.GetPoolStatus(scheduler_pb2.GetPoolStatusRequest(), timeout=5).servers):
            assert time.monotonic() < deadline, "the game servers did not become healthy"
            time.sleep(0.05)
        yield stub


def evaluate(track: str, masks: bytes) -> game_pb2.EvaluateRequest:
    return game_pb2.EvaluateRequest(track=track, program=sim_pb2.ControlProgram(masks=masks))


def test_map_evaluate_streams_every_outcome_by_index(stub: scheduler_pb2_grpc.SchedulerServiceStub) -> None:
    tasks = [evaluate("oval", bytes([1, 5, 9][i % 3]) * (100 + 40 * i)) for i in range(12)]
    tasks[4] = evaluate("oval", b"\x01\xff")  # a bad mask byte
    tasks[7] = evaluate("no-such-track", b"\x01")
    before = stub.GetPoolStatus(scheduler_pb2.GetPoolStatusRequest(), timeout=5)
    outcomes = {r.index: r for r in stub.MapEvaluate(scheduler_pb2.MapEvaluateRequest(tasks=tasks), timeout=60)}
    assert sorted(outcomes) == list(range(12))
    assert outcomes[4].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert outcomes[7].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert "track" in outcomes[7].error.message
    for i, task in enumerate(tasks):
        if i not in (4, 7):
            assert outcomes[i].WhichOneof("outcome") == "response"
            assert outcomes[i].response == RequestTask()(task)
    after = stub.GetPoolStatus(scheduler_pb2.GetPoolStatusRequest(), timeout=5)
    assert after.done - before.done == 10 and after.failed - before.failed == 2
    assert after.in_flight == 0 and after.pending == 0
    assert len(after.servers) == 2 and all(s.healthy and s.capacity == 2 for s in after.servers)
    assert sum(s.done for s in after.servers) - sum(s.done for s in before.servers) == 12


@pytest.mark.parametrize("size", [0, 10_001])
def test_batch_size_is_bounded(stub: scheduler_pb2_grpc.SchedulerServiceStub, size: int) -> None:
    request = scheduler_pb2.MapEvaluateRequest(tasks=[evaluate("oval", b"\x01")] * size)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.MapEvaluate(request, timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def grpcurl(*args: str) -> str:
    done = subprocess.run([GRPCURL, "-plaintext", *args], capture_output=True, text=True, timeout=60, check=True)
    return done.stdout


def json_stream(text: str) -> list[dict[str, object]]:
    decoder, items, pos = json.JSONDecoder(), [], 0
    while (pos := len(text) - len(text[pos:].lstrip())) < len(text):
        item, pos = decoder.raw_decode(text, pos)
        items.append(item)
    return items


def test_grpcurl_lists_and_calls(scheduler_process: ServiceProcess, stub: object) -> None:
    address = scheduler_process.address
    listed = grpcurl(address, "list").split()
    assert "rallyrobopilot.v1.SchedulerService" in listed and "grpc.health.v1.Health" in listed
    body = json.dumps(
        {
            "tasks": [
                {"track": "oval", "program": {"masks": "AQEBAQEBAQE="}},
                {"track": "nowhere", "program": {"masks": "AQ=="}},
            ]
        }
    )
    out = json_stream(grpcurl("-d", body, address, "rallyrobopilot.v1.SchedulerService/MapEvaluate"))
    by_index = {int(str(item.get("index", 0))): item for item in out}
    assert set(by_index) == {0, 1}
    assert by_index[0]["response"]["result"]["ticks"] == "8"  # type: ignore[index]
    assert by_index[1]["error"] == {"code": 5, "message": by_index[1]["error"]["message"]}  # type: ignore[index]
    status = json_stream(grpcurl(address, "rallyrobopilot.v1.SchedulerService/GetPoolStatus"))[0]
    assert len(status["servers"]) == 2  # type: ignore[arg-type]
