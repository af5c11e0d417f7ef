"""Operations: grpcurl against a live server, health and reflection, SIGTERM shutdown, OTLP traces, the CLI."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from game_server.client import GameClient
from rrp.procs import ServiceProcess, start_service

BIN = Path(sys.executable).parent


def grpcurl(*args: str) -> str:
    result = subprocess.run(
        [str(BIN / "grpcurl"), "-plaintext", *args], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_grpcurl_lists_and_calls_evaluate(game_server_processes: list[ServiceProcess]) -> None:
    address = game_server_processes[0].address
    services = grpcurl(address, "list").split()
    assert "rallyrobopilot.v1.GameService" in services
    assert "grpc.health.v1.Health" in services
    methods = grpcurl(address, "list", "rallyrobopilot.v1.GameService").split()
    assert "rallyrobopilot.v1.GameService.Evaluate" in methods
    masks = base64.b64encode(bytes([1]) * 50).decode()
    body = json.dumps({"track": "oval", "program": {"masks": masks}, "max_ticks": 60})
    out = json.loads(grpcurl("-d", body, address, "rallyrobopilot.v1.GameService/Evaluate"))
    assert out["result"]["ticks"] == "60"
    assert out["result"]["progress_m"] > 10
    with GameClient(address) as c:
        direct = c.evaluate("oval", bytes([1]) * 50, max_ticks=60).result
    assert out["result"]["progress_m"] == direct.progress_m
    health = json.loads(grpcurl(address, "grpc.health.v1.Health/Check"))
    assert health["status"] == "SERVING"


def test_sigterm_stops_gracefully() -> None:
    proc = start_service(["game-server", "--port", "0"])
    with grpc.insecure_channel(proc.address) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    t0 = time.monotonic()
    assert proc.stop(timeout_s=15) == 0
    assert time.monotonic() - t0 < 10
    assert any("stopped" in line for line in proc.lines)


class _Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.span_names: list[str] = []
        self.got = threading.Event()

    def Export(self, request, context):  # type: ignore[no-untyped-def]
        for rs in request.resource_spans:
            for ss in rs.scope_spans:
                self.span_names.extend(span.name for span in ss.spans)
        self.got.set()
        return trace_service_pb2.ExportTraceServiceResponse()


def test_rpcs_are_traced_over_otlp_when_configured() -> None:
    receiver = _Receiver()
    otlp = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, otlp)
    port = otlp.add_insecure_port("127.0.0.1:0")
    otlp.start()
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    proc = start_service(["game-server", "--port", "0"], env=env)
    try:
        with GameClient(proc.address) as c:
            c.evaluate("oval", b"\x01" * 10)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any("Evaluate" in n for n in receiver.span_names):
            time.sleep(0.1)
        assert any(n.endswith("GameService/Evaluate") for n in receiver.span_names), receiver.span_names
    finally:
        proc.stop()
        otlp.stop(0)


def test_cli_help_for_every_command() -> None:
    for args in ([], ["game-server"], ["play"], ["run"], ["evolve"], ["scheduler"]):
        result = subprocess.run(
            [str(BIN / "rrp"), *args, "--help"], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        assert "usage: rrp" in result.stdout


def test_main_job_smoke(tmp_path: Path) -> None:
    """`rrp run` on a tiny budget: services start, the GA runs on the pool, the lap is raced and reported."""
    result = subprocess.run(
        [str(BIN / "rrp"), "run", "--out", str(tmp_path), "--population", "6", "--generations", "1", "--episodes", "4"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["race"]["finished"] and summary["race"]["evaluate_identical"]
    assert summary["collect"]["runs"] == 4 and summary["collect"]["failed"] == 0
    assert summary["validation"]["passed"], summary["validation"]
    for name in ("report.md", "lap.png", "frames.png", "evolve/fitness.png", "evolve/best_driver.json"):
        assert (tmp_path / name).stat().st_size > 0
