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
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from game_server.client import GameClient
from plumbing.procs import ServiceProcess, start_service

BIN = Path(sys.executable).parent


def grpcurl(*args: str) -> str:
    result = subprocess.run([str(BIN / "grpcurl"), "-plaintext", *args], capture_output=True, text=True, timeout=60)
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
    """A real OTLP/gRPC trace receiver, as Jaeger's collector port is, keeping what it gets."""

    def __init__(self) -> None:
        self.span_names: list[str] = []
        self.spans: list[tuple[str, str, bytes, bytes]] = []  # (service, name, trace id, parent span id)
        self.got = threading.Event()

    def Export(self, request, context):  # type: ignore[no-untyped-def]
        for rs in request.resource_spans:
            service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
            for ss in rs.scope_spans:
                self.span_names.extend(span.name for span in ss.spans)
                self.spans.extend((service, s.name, s.trace_id, s.parent_span_id) for s in ss.spans)
        self.got.set()
        return trace_service_pb2.ExportTraceServiceResponse()


def _otlp_receiver() -> tuple[_Receiver, grpc.Server, dict[str, str]]:
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
    return receiver, otlp, env


def test_one_trace_spans_scheduler_game_server_and_collector(tmp_path: Path) -> None:
    """A Record call on a game server and the Ingest stream it opens to the collector share one trace."""
    from collector.store import FrameStore
    from game_server.core import drivers
    from plumbing.redis_local import LocalRedis
    from rallyrobopilot.v1 import collector_pb2, game_pb2, game_pb2_grpc, sim_pb2

    receiver, otlp, env = _otlp_receiver()
    with LocalRedis(tmp_path / "redis") as redis:
        collector = start_service(["collector", "--port", "0"], env={**env, "RRP_REDIS_URL": redis.url})
        game = start_service(["game-server", "--port", "0"], env=env)
        try:
            d = drivers.default_driver()
            request = game_pb2.RecordRequest(
                run_id="traced",
                track="oval",
                driver=sim_pb2.DriverParams(kind=d.kind, params=d.params),
                max_ticks=40,
                encoding=collector_pb2.IMAGE_ENCODING_PNG,
                collector_address=collector.address,
            )
            with grpc.insecure_channel(game.address) as channel:
                assert game_pb2_grpc.GameServiceStub(channel).Record(request, timeout=60).frames == 40
            assert FrameStore(redis.client(), "rrp:", redis.url).frame_count("traced") == 40

            def traces() -> tuple[set[bytes], set[bytes]]:
                record = {t for _, n, t, _ in receiver.spans if n.endswith("GameService/Record")}
                ingest = {t for _, n, t, _ in receiver.spans if n.endswith("CollectorService/Ingest")}
                return record, ingest

            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not (traces()[0] & traces()[1]):
                time.sleep(0.1)
            record, ingest = traces()
            assert record & ingest, receiver.spans
            services = {svc for svc, _, t, _ in receiver.spans if t in record}
            assert {"game-server", "collector"} <= services, services

            # The scheduler's MapEvaluate and the game server's evaluations it causes: one trace too.
            scheduler = start_service(["scheduler", "--port", "0", "--servers", game.address], env=env)
            try:
                from rallyrobopilot.v1 import scheduler_pb2, scheduler_pb2_grpc

                task = game_pb2.EvaluateRequest(track="oval", program=sim_pb2.ControlProgram(masks=b"\x01" * 30))
                with grpc.insecure_channel(scheduler.address) as channel:
                    stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
                    batch = scheduler_pb2.MapEvaluateRequest(tasks=[task] * 3)
                    assert len(list(stub.MapEvaluate(batch, timeout=60))) == 3
            finally:
                scheduler.stop()

            def map_traces() -> set[bytes]:
                mapped = {t for _, n, t, _ in receiver.spans if n.endswith("SchedulerService/MapEvaluate")}
                evaluated = {t for _, n, t, _ in receiver.spans if "GameService/Evaluate" in n}
                return mapped & evaluated

            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not map_traces():
                time.sleep(0.1)
            assert map_traces(), receiver.spans
        finally:
            game.stop()
            collector.stop()
            otlp.stop(0)


def test_rpcs_are_traced_over_otlp_when_configured() -> None:
    receiver, otlp, env = _otlp_receiver()
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
        result = subprocess.run([str(BIN / "rrp"), *args, "--help"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "usage: rrp" in result.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)  # ~150 s on an idle machine; the whole job, on a busy one, may take twice that
def test_main_job_smoke(tmp_path: Path) -> None:
    """`rrp run` on a tiny budget: services start, the GA runs on the pool, the lap is raced and reported."""
    result = subprocess.run(
        [
            *(str(BIN / "rrp"), "run", "--out", str(tmp_path), "--population", "6", "--generations", "1"),
            *("--episodes", "4", "--epochs", "1", "--suite-tracks", "oval,gen-3001", "--serving-max-ticks", "300"),
            *("--wrong-way-episodes", "2"),
            # The second model's rollout, on short laps: the wiring is under test here, not the model.
            *("--deploy-dagger-epochs", "1", "--deploy-cars", "2", "--deploy-canary-share", "0.5"),
            *("--deploy-canary-laps", "1", "--deploy-gate-max-ticks", "400", "--deploy-lap-max-ticks", "250"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["race"]["finished"] and summary["race"]["evaluate_identical"]
    assert (
        summary["race"]["stop_reason"] == "finished" and summary["race"]["lap_s"] == summary["race"]["lap_ticks"] / 25
    )
    # Progress reaches the console through logging (the CLI sets it up at INFO).
    assert "pipeline.main_job: evolved driver on kidney over the Drive stream: lap" in result.stderr
    assert "pipeline.main_job: targets met:" in result.stderr
    # The report's suite table is rendered from the suite's data, and says what suite.md says.
    table = (tmp_path / "evaluation" / "suite.md").read_text().split("\n\n", 2)[1]
    assert table.startswith("| condition |") and table in (tmp_path / "report.md").read_text()
    assert summary["collect"]["runs"] == 6 and summary["collect"]["failed"] == 0  # 4 episodes, 2 of them wrong-way
    assert summary["validation"]["passed"], summary["validation"]
    assert summary["train"]["frames"] > 1000
    # Raced, whatever a one-epoch model manages: both conditions, and oval's six recovery starts.
    suite = summary["evaluation"]["suite"]
    assert suite["plain"]["unseen_tracks"] == suite["randomised"]["unseen_tracks"] == 1
    assert summary["evaluation"]["recovery"]["pinned"]["starts"] == 3
    assert "The vision autopilot races: the evaluation suite" in (tmp_path / "report.md").read_text()
    deployment = summary["deployment"]
    assert deployment["decision"] in ("promote", "rollback") and deployment["steps"][0]["stage"] == "register"
    assert "Deployment: a second model through gate and canary" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "deployment" / "rollout.png").stat().st_size > 0
    for name in (
        *("report.md", "lap.png", "frames.png", "evolve/fitness.png", "evolve/best_driver.json"),
        *("validation/validation.md", "model/model.safetensors", "model/model_card.md", "evaluation/suite.md"),
        *("evaluation/suite_grid.png", "evaluation/recovery_grid.png", "model/evaluation.json"),
    ):
        assert (tmp_path / name).stat().st_size > 0
