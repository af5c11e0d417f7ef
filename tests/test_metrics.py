"""Metrics and monitoring: every service's /metrics, a real Prometheus scraping them, the alert rules' unit tests."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from plumbing.errors import InvalidArgument
from plumbing.metrics import LiveGauges, start_metrics
from plumbing.procs import ServiceProcess, rrp_command, start_service
from plumbing.redis_local import LocalRedis, free_port

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy/helm/rallyrobopilot/files/alert-rules.yml"
RULE_TESTS = ROOT / "deploy/monitoring/alert-rules.test.yml"
DASHBOARD = ROOT / "deploy/helm/rallyrobopilot/files/dashboard.json"

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool is not installed (scripts/setup.sh installs Debian's prometheus)"
)
needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None, reason="prometheus is not installed (scripts/setup.sh installs it)"
)


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a /metrics page: (name, labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


# -- the endpoint and the helpers -----------------------------------------------------------------------


def test_metrics_endpoint_serves_the_registry_and_stops() -> None:
    assert start_metrics("127.0.0.1", 0) is None  # 0: no endpoint
    port = free_port()
    endpoint = start_metrics("127.0.0.1", port, "test")
    assert endpoint is not None and endpoint.url == f"http://127.0.0.1:{port}/metrics"
    try:
        assert sample(scrape(port), "process_cpu_seconds_total") > 0
    finally:
        endpoint.stop()
    with pytest.raises(urllib.error.URLError):
        scrape(port)
    with pytest.raises(ValueError):
        start_metrics("127.0.0.1", 70000)


def test_a_server_serves_metrics_on_its_host_until_it_stops_and_a_taken_port_is_a_clear_error() -> None:
    import socket

    from plumbing.bootstrap import ServerConfig, create_server

    port = free_port()
    running = create_server(ServerConfig(port=0, metrics_port=port, service_name="metrics-test"), lambda s: [])
    try:
        assert running.metrics is not None and running.metrics.host == "127.0.0.1"
        assert sample(scrape(port), "process_cpu_seconds_total") > 0
    finally:
        running.stop(0)
    with pytest.raises(urllib.error.URLError):
        scrape(port)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{busy}"):
            create_server(ServerConfig(port=0, metrics_port=busy), lambda s: [])


def test_scheduler_metrics_are_its_pools_counters_per_server_and_summed() -> None:
    from prometheus_client import CollectorRegistry

    from scheduler.core import PoolStatus, ServerStatus
    from scheduler.metrics import PoolCollector

    class Pool:
        def __init__(self, status: PoolStatus) -> None:
            self._status = status

        def status(self) -> PoolStatus:
            return self._status

    a = ServerStatus("10.0.0.1:50051", True, 2, 1, done=40, failed=3, retried=3)
    b = ServerStatus("10.0.0.2:50051", False, 2, 0, done=5, failed=0, retried=1)
    pools = [
        Pool(PoolStatus((a, b), in_flight=1, pending=7, done=45, retried=4, failed=1)),
        Pool(PoolStatus((), 0, 2, 1, 0, 0)),
    ]
    registry = CollectorRegistry()
    collector = PoolCollector(registry)
    for pool in pools:
        collector.track(pool)  # type: ignore[arg-type]

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("rrp_scheduler_queue_length") == 9
    assert value("rrp_scheduler_done_total") == 46
    assert value("rrp_scheduler_retries_total") == 4
    assert value("rrp_scheduler_failed_total") == 1
    assert value("rrp_scheduler_healthy_servers") == 1 and value("rrp_scheduler_servers") == 2
    assert value("rrp_scheduler_server_retries_total", server="10.0.0.1:50051") == 3
    assert value("rrp_scheduler_server_failures_total", server="10.0.0.1:50051") == 3
    assert value("rrp_scheduler_server_healthy", server="10.0.0.2:50051") == 0
    assert value("rrp_scheduler_server_done_total", server="10.0.0.2:50051") == 5


def test_a_collector_stream_ended_by_an_error_is_counted_by_its_code() -> None:
    from collector.ingest import Ingestor
    from plumbing.errors import FailedPrecondition
    from rallyrobopilot.v1 import collector_pb2

    def errors() -> float:
        return REGISTRY.get_sample_value("rrp_collector_errors_total", {"code": "FAILED_PRECONDITION"}) or 0.0

    before, open_before = errors(), REGISTRY.get_sample_value("rrp_collector_streams_open")
    frame_first = [collector_pb2.IngestRequest(frame=collector_pb2.FrameRecord(run_id="r", tick=0))]
    with pytest.raises(FailedPrecondition):
        list(Ingestor(sink=None).run(iter(frame_first), lambda: True))  # type: ignore[arg-type]
    assert errors() == before + 1
    assert REGISTRY.get_sample_value("rrp_collector_streams_open") == open_before  # the stream is no longer open


def test_live_gauges_add_up_the_live_objects_and_forget_stopped_ones() -> None:
    class Server:
        def __init__(self, sessions: int) -> None:
            self.sessions = sessions

    gauges = LiveGauges({"rrp_test_live_sessions": ("sessions", lambda s: s.sessions)})
    try:
        a, b = Server(2), Server(3)
        gauges.track(a)
        gauges.track(b)
        assert REGISTRY.get_sample_value("rrp_test_live_sessions") == 5
        gauges.forget(a)
        assert REGISTRY.get_sample_value("rrp_test_live_sessions") == 3
        del b
        assert REGISTRY.get_sample_value("rrp_test_live_sessions") == 0  # a server gone is not counted
    finally:
        REGISTRY.unregister(gauges)


def test_autopilot_counts_each_versions_ticks_missed_ticks_and_laps_once() -> None:
    from serving.metrics import VersionMeter

    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = value("rrp_autopilot_ticks_total", version="t1"), value("rrp_autopilot_missed_ticks_total", version="t1")
    meter = VersionMeter("t1")
    meter.tick(10, 0)
    meter.tick(25, 3)  # the game server's counts are running totals: only what is new is added
    meter.tick(25, 3)
    meter.lap(True, 31.2, 4)
    assert value("rrp_autopilot_ticks_total", version="t1") - before[0] == 25
    assert value("rrp_autopilot_missed_ticks_total", version="t1") - before[1] == 3
    assert value("rrp_autopilot_laps_total", version="t1", finished="true") == 1
    assert value("rrp_autopilot_lap_seconds_sum", version="t1") == pytest.approx(31.2)
    assert value("rrp_autopilot_wall_contacts_total", version="t1") == 4
    assert VersionMeter("").version == "default"  # a client of the server's default version


class _AlternatingModel:
    """An InferenceClient that answers every other inference at once and lets the others time out."""

    def __init__(self, version: str) -> None:
        self.model, self.version, self.calls = "fake", version, 0

    def infer(self, frame: Any, speed_m_per_s: float, timeout_s: float) -> Any:
        from plumbing.errors import DeadlineExceeded
        from serving.codec import Decision

        self.calls += 1
        if self.calls % 2 == 0:
            time.sleep(timeout_s)
            raise DeadlineExceeded("too slow")
        return Decision((0.0,) * 4, 1)

    def close(self) -> None:
        pass


def test_a_real_time_autopilot_run_moves_its_versions_series(game_server: Any) -> None:
    from serving.autopilot import AutopilotConfig, run_autopilot

    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, {"version": "alt-1", **labels}) or 0.0

    config = AutopilotConfig(track="oval", mode="realtime", max_ticks=30, width=64, height=48)
    result = run_autopilot(config, (game_server.address,), lambda: _AlternatingModel("alt-1"))
    (lap,) = result.laps
    assert value("rrp_autopilot_ticks_total") == lap.ticks >= 30  # a slow tick may skip a frame
    assert value("rrp_autopilot_laps_total", finished="false") == 1
    assert value("rrp_autopilot_fallbacks_total") == lap.fallbacks > 0
    assert value("rrp_autopilot_inference_seconds_count") == len(lap.inference_ms)
    assert value("rrp_autopilot_missed_ticks_total") == lap.missed_ticks
    assert value("rrp_autopilot_wall_contacts_total") == lap.wall_contacts


def _exported_names() -> set[str]:
    """Every metric name the services export, as Prometheus sees it (`_total`, `_bucket`, ...)."""
    for module in ("game_server.metrics", "scheduler.metrics", "collector.metrics", "serving.metrics"):
        importlib.import_module(module)
    names = {"up", "process_cpu_seconds_total"}
    for family in REGISTRY.collect():
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(family.type, ("",))
        names |= {family.name + suffix for suffix in suffixes}
    return names


def _rule_exprs() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def _dashboard_exprs() -> list[str]:
    return [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]


def test_rules_dashboard_and_deploy_readme_name_only_metrics_the_services_export() -> None:
    exported = _exported_names()
    readme = (ROOT / "deploy/README.md").read_text()
    for text in [*_rule_exprs(), *_dashboard_exprs(), readme]:
        for name in re.findall(r"\brrp_[a-z0-9_]+", text):
            assert name in exported, (name, text[:200])


def test_monitor_config_scrapes_each_component_under_the_clusters_job_name() -> None:
    from pipeline.monitor import MonitorConfig, prometheus_config

    config = prometheus_config(
        ("game-server=127.0.0.1:9101", "game-server=127.0.0.1:9102", "127.0.0.1:9103"), RULES, 1.0, 0.5
    )
    assert config["global"] == {"scrape_interval": "1000ms", "evaluation_interval": "500ms"}
    assert config["rule_files"] == [str(RULES)]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "rallyrobopilot"
    assert job["static_configs"] == [
        {"targets": ["127.0.0.1:9101", "127.0.0.1:9102"], "labels": {"component": "game-server"}},
        {"targets": ["127.0.0.1:9103"]},
    ]
    for bad in ("nohost", "h:0", "h:port", "x=:1"):
        with pytest.raises(InvalidArgument):
            MonitorConfig(targets=(bad,))


def test_rrp_monitor_says_what_is_missing() -> None:
    for args, message in (
        (["--prometheus", "no-such-prometheus"], "no-such-prometheus not found: apt-get install prometheus"),
        (["--rules", "/no/such/rules.yml"], "rules file /no/such/rules.yml not found"),
        (["--targets", "nohost"], "expected [COMPONENT=]HOST:PORT"),
    ):
        proc = subprocess.run([*rrp_command(), "monitor", *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1 and message in proc.stderr, proc.stderr
        assert "Prometheus stopped" not in proc.stdout


@needs_promtool
def test_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    check = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    tested = subprocess.run(["promtool", "test", "rules", str(RULE_TESTS)], capture_output=True, text=True, timeout=120)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr
    # Every alert has at least one unit test that names it.
    tests = RULE_TESTS.read_text()
    alerts = [r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]
    untested = [a for a in alerts if f"alertname: {a}\n" not in tests]
    assert set(untested) <= {"RallyRoboPilotSchedulerNoHealthyServer", "RallyRoboPilotSchedulerRetrying",
                             "RallyRoboPilotSchedulerFailures", "RallyRoboPilotInferenceFallbacks",
                             "RallyRoboPilotCollectorRedisSlow"}, untested  # fmt: skip


# -- real services, a real Prometheus ---------------------------------------------------------------------


def _drive_realtime_without_commands(address: str, ticks: int) -> int:
    """A real-time Drive that sends no command: every tick is missed; returns the game server's count."""
    from rallyrobopilot.v1 import game_pb2, game_pb2_grpc

    done = threading.Event()
    with grpc.insecure_channel(address) as channel:
        stub = game_pb2_grpc.GameServiceStub(channel)
        session = stub.CreateSession(game_pb2.CreateSessionRequest(track="oval"), timeout=30).session_id

        def requests() -> Iterator[game_pb2.DriveRequest]:
            start = game_pb2.DriveStart(session_id=session, mode=game_pb2.DRIVE_MODE_REALTIME, max_ticks=ticks)
            yield game_pb2.DriveRequest(start=start)
            done.wait(30)  # the stream stays open: the server ticks on without commands

        try:
            responses = list(stub.Drive(requests(), timeout=30))
        finally:
            done.set()
        stub.CloseSession(game_pb2.CloseSessionRequest(session_id=session), timeout=10)
    return int(responses[-1].missed_ticks)


def _record_and_evaluate(game: ServiceProcess, scheduler: ServiceProcess, collector: ServiceProcess) -> None:
    from game_server.core import drivers
    from rallyrobopilot.v1 import collector_pb2, game_pb2, game_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc, sim_pb2

    d = drivers.default_driver()
    record = game_pb2.RecordRequest(
        run_id="metrics",
        track="oval",
        driver=sim_pb2.DriverParams(kind=d.kind, params=d.params),
        max_ticks=40,
        encoding=collector_pb2.IMAGE_ENCODING_PNG,
        collector_address=collector.address,
    )
    with grpc.insecure_channel(game.address) as channel:
        assert game_pb2_grpc.GameServiceStub(channel).Record(record, timeout=60).frames == 40
    task = game_pb2.EvaluateRequest(track="oval", program=sim_pb2.ControlProgram(masks=b"\x01" * 30))
    with grpc.insecure_channel(scheduler.address) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        assert len(list(stub.MapEvaluate(scheduler_pb2.MapEvaluateRequest(tasks=[task] * 3), timeout=60))) == 3


def _query(url: str, expr: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}", timeout=5) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


@pytest.mark.slow
@pytest.mark.timeout(180)
@needs_prometheus
def test_services_export_metrics_and_rrp_monitor_scrapes_them(tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("game-server", "scheduler", "collector")}
    procs: list[ServiceProcess] = []
    with LocalRedis(tmp_path / "redis") as redis:
        try:
            game = start_service(["game-server", "--port", "0", "--metrics-port", str(ports["game-server"])])
            procs.append(game)
            collector = start_service(
                ["collector", "--port", "0", "--redis", redis.url, "--metrics-port", str(ports["collector"])]
            )
            procs.append(collector)
            scheduler = start_service(
                ["scheduler", "--port", "0", "--servers", game.address, "--metrics-port", str(ports["scheduler"])]
            )
            procs.append(scheduler)
            assert any(f"metrics on http://127.0.0.1:{ports['game-server']}/metrics" in line for line in game.lines)

            _record_and_evaluate(game, scheduler, collector)
            assert _drive_realtime_without_commands(game.address, 5) >= 1

            g = scrape(ports["game-server"])
            assert sample(g, "rrp_game_server_ticks_simulated_total", call="Record") == 40
            assert (
                sample(g, "rrp_game_server_ticks_simulated_total", call="Evaluate")
                + sample(g, "rrp_game_server_ticks_simulated_total", call="EvaluateBatch")
                == 3 * 30
            )
            assert sample(g, "rrp_game_server_ticks_simulated_total", call="Drive") == 5
            assert sample(g, "rrp_game_server_frames_rendered_total") >= 40
            assert sample(g, "rrp_game_server_drive_missed_ticks_total") >= 1
            assert sample(g, "rrp_game_server_sessions_open") == 0
            assert sample(g, "rrp_game_server_evaluate_slots") == 2

            s = scrape(ports["scheduler"])
            assert sample(s, "rrp_scheduler_done_total") == 3
            assert sample(s, "rrp_scheduler_healthy_servers") == 1
            assert sample(s, "rrp_scheduler_server_done_total", server=game.address) == 3
            assert sample(s, "rrp_scheduler_queue_length") == 0
            assert sample(s, "rrp_scheduler_failed_total") == 0

            c = scrape(ports["collector"])
            assert sample(c, "rrp_collector_frames_stored_total") == 40
            assert sample(c, "rrp_collector_bytes_stored_total") > 40 * 100
            assert sample(c, "rrp_collector_acks_total") >= 2  # the start's and at least one batch's
            assert sample(c, "rrp_collector_redis_write_seconds_count") >= 1
            assert sample(c, "rrp_collector_inflight_bytes") == 0

            _check_prometheus_scrapes(ports, tmp_path)
        finally:
            for proc in procs:
                proc.stop()


def _check_prometheus_scrapes(ports: dict[str, int], tmp_path: Path) -> None:
    targets = ",".join(f"{name}=127.0.0.1:{port}" for name, port in ports.items())
    data = tmp_path / "prometheus"
    monitor = subprocess.Popen(
        [*rrp_command(), "monitor", "--targets", targets, "--data-dir", str(data),
         "--scrape-interval", "0.5", "--evaluation-interval", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        assert monitor.stdout is not None
        lines: list[str] = []
        while not any("prometheus on" in line for line in lines):
            line = monitor.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        url = re.search(r"prometheus on (\S+)", lines[-1]).group(1)  # type: ignore[union-attr]
        deadline = time.monotonic() + 30
        while True:
            up = {r["metric"]["component"]: r["value"][1] for r in _query(url, 'up{job="rallyrobopilot"}')}
            if up == dict.fromkeys(ports, "1"):
                break
            assert time.monotonic() < deadline, up
            time.sleep(0.25)
        assert _query(url, "rrp_scheduler_done_total")[0]["value"][1] == "3"
        # Every query of the rules and the dashboard is valid PromQL for this Prometheus.
        for expr in [*_rule_exprs(), *_dashboard_exprs()]:
            _query(url, expr)
        with urllib.request.urlopen(f"{url}/api/v1/rules", timeout=5) as reply:
            rules = json.loads(reply.read())["data"]["groups"]
        assert all(r["health"] != "err" for g in rules for r in g["rules"]), rules
    finally:
        monitor.send_signal(signal.SIGTERM)
        out, _ = monitor.communicate(timeout=30)
    assert monitor.returncode == 0, out
    assert "Prometheus stopped" in out
    assert (data / "prometheus.yml").is_file()
