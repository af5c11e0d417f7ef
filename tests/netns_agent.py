"""A client that runs inside a test's network namespace and answers JSON-line commands on stdin.

The test process stays in the host's namespace and cannot reach the namespaces' addresses; it starts one agent per
host it needs a client on (`ip netns exec NS python tests/netns_agent.py`) and asks it to call the services there.
Protobuf messages cross the pipe serialized and base64-encoded, never pickled.
"""

from __future__ import annotations

import base64
import json
import sys
import threading
import time
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rallyrobopilot.v1 import (
    collector_pb2,
    collector_pb2_grpc,
    game_pb2,
    game_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)

_records: dict[str, Any] = {}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def health(cmd: dict[str, Any]) -> dict[str, Any]:
    deadline = time.monotonic() + float(cmd.get("wait", 0.0))
    problem = ""
    with grpc.insecure_channel(cmd["address"]) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=cmd.get("service", "")), timeout=2.0).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return {"ok": True}
                problem = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            except grpc.RpcError as exc:
                problem = exc.code().name
            if time.monotonic() >= deadline:
                return {"ok": False, "error": problem}
            time.sleep(0.2)


def pool_status(cmd: dict[str, Any]) -> dict[str, Any]:
    with grpc.insecure_channel(cmd["address"]) as channel:
        status = scheduler_pb2_grpc.SchedulerServiceStub(channel).GetPoolStatus(
            scheduler_pb2.GetPoolStatusRequest(), timeout=5.0
        )
    servers = [
        {"address": s.address, "healthy": s.healthy, "done": s.done, "failed": s.failed, "in_flight": s.in_flight}
        for s in status.servers
    ]
    return {"ok": True, "servers": servers, "retried": status.retried, "done": status.done}


def map_evaluate(cmd: dict[str, Any]) -> dict[str, Any]:
    """MapEvaluate through the scheduler; a progress event every `progress_every` results."""
    tasks = [game_pb2.EvaluateRequest.FromString(_unb64(t)) for t in cmd["tasks"]]
    every = int(cmd.get("progress_every", 0))
    responses: list[str | None] = [None] * len(tasks)
    errors: dict[int, str] = {}
    started = time.monotonic()
    with grpc.insecure_channel(cmd["address"]) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        stream = stub.MapEvaluate(scheduler_pb2.MapEvaluateRequest(tasks=tasks), timeout=float(cmd.get("timeout", 300)))
        for n, item in enumerate(stream, start=1):
            if item.HasField("response"):
                responses[item.index] = _b64(item.response.SerializeToString())
            else:
                errors[item.index] = f"{item.error.code}: {item.error.message}"
            if every and n % every == 0:
                emit({"event": "progress", "done": n, "seconds": time.monotonic() - started})
    return {"ok": True, "responses": responses, "errors": errors, "seconds": time.monotonic() - started}


def record_start(cmd: dict[str, Any]) -> dict[str, Any]:
    request = game_pb2.RecordRequest.FromString(_unb64(cmd["request"]))
    result: dict[str, Any] = {}

    def run() -> None:
        started = time.monotonic()
        try:
            with grpc.insecure_channel(cmd["address"]) as channel:
                response = game_pb2_grpc.GameServiceStub(channel).Record(
                    request, timeout=float(cmd.get("timeout", 120))
                )
            result.update(ok=True, response=_b64(response.SerializeToString()))
        except grpc.RpcError as exc:
            result.update(ok=False, error=f"{exc.code().name}: {exc.details()}")
        result["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    _records[request.run_id] = (thread, result)
    return {"ok": True}


def record_wait(cmd: dict[str, Any]) -> dict[str, Any]:
    thread, result = _records.pop(cmd["run_id"])
    thread.join(float(cmd.get("timeout", 120)))
    if thread.is_alive():
        return {"ok": False, "error": "record still running"}
    return dict(result)


def run_frames(cmd: dict[str, Any]) -> dict[str, Any]:
    with grpc.insecure_channel(cmd["address"]) as channel:
        stub = collector_pb2_grpc.CollectorServiceStub(channel)
        try:
            run = stub.GetRun(collector_pb2.GetRunRequest(run_id=cmd["run_id"]), timeout=2.0).run
        except grpc.RpcError as exc:
            return {"ok": True, "frames": 0, "error": exc.code().name}
    return {"ok": True, "frames": run.stored_frames}


def redis_stream(cmd: dict[str, Any]) -> dict[str, Any]:
    """Length, first and last entry IDs of a stream (IDs only: no frame data is read)."""
    import redis

    client = redis.Redis.from_url(cmd["url"], socket_timeout=5.0)
    try:
        length = client.xlen(cmd["key"])
        first = client.xrange(cmd["key"], count=1)
        last = client.xrevrange(cmd["key"], count=1)
    finally:
        client.close()
    ident = lambda entries: entries[0][0].decode() if entries else None  # noqa: E731
    return {"ok": True, "length": length, "first": ident(first), "last": ident(last)}


OPS = {
    "health": health,
    "pool_status": pool_status,
    "map": map_evaluate,
    "record_start": record_start,
    "record_wait": record_wait,
    "run_frames": run_frames,
    "redis_stream": redis_stream,
}


def main() -> int:
    emit({"event": "ready"})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            return 0
        try:
            reply = OPS[cmd["op"]](cmd)
        except Exception as exc:  # report any failure to the test instead of dying silently
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        emit({"event": "reply", **reply})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
