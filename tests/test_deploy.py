"""Model versions and their rollout against a real TorchServe: gate, canary, promote, roll back, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.deploy import models_table
from pipeline.serve import ServeConfig, follow_registry
from plumbing.procs import ServiceProcess
from serving.client import ModelRef, TorchServeClient
from serving.endpoints import Endpoints, write_endpoints
from serving.registry import Registry, Router, Routing
from serving.rollout.config import CanaryConfig, GateConfig
from serving.rollout.deployer import Deployer, RolloutConfig
from serving.rollout.records import CanaryFigures, DeploymentRecord
from serving.torchserve import LocalTorchServe, TorchServeConfig, free_port
from trainer.vision.model import DrivingNet
from trainer.vision.train import save_weights

from .tiny_models import SMALL, train_tiny

NAME = "rrp-vision"
GATE = GateConfig(tracks=("gen-1001",), max_ticks=300, max_p99_ms=250.0, rate_hz=0.0)
# The flow is under test here, not this machine's load: live thresholds loose enough for a busy 2-core box.
CANARY = CanaryConfig(cars=2, laps=2, max_ticks=100, max_s=90, track="oval", max_missed_rate=0.05,
                      max_fallback_rate=0.5, max_error_rate=0.2, drain_s=0.5)  # fmt: skip


def _model_dir(root: Path, name: str, model: DrivingNet) -> Path:
    out = root / name
    out.mkdir()
    save_weights(model, out / "model.safetensors")
    card = {"model": f"test {name}", "data": {"source": "generated frames: oval, kidney"}}
    (out / "model_card.json").write_text(json.dumps(card) + "\n")
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """good: trained a few seconds; same: its weights under another header (drives identically); bad: untrained,
    and never presses the throttle."""
    root = tmp_path_factory.mktemp("models")
    good = train_tiny(root / "good", card={"model": "test good", "data": {"source": "generated frames: oval, kidney"}})
    same = root / "same"
    same.mkdir()
    with safe_open(str(good / "model.safetensors"), framework="pt") as f:
        meta = {**(f.metadata() or {}), "rrp-note": "retrained: same weights, another file"}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    save_file(tensors, str(same / "model.safetensors"), metadata=meta)
    (same / "model_card.json").write_text((good / "model_card.json").read_text())
    # Never presses the throttle (its offset makes "none" win every time): a candidate the gate must refuse,
    # however its untrained net happens to steer.
    torch.manual_seed(0)
    never_drives = DrivingNet(SMALL)
    with torch.no_grad():
        never_drives.decision_offset.copy_(torch.tensor([100.0, 0.0, 0.0, 0.0, 0.0, 0.0]))
    bad = _model_dir(root, "bad", never_drives)
    return {"good": good, "same": same, "bad": bad}


@pytest.fixture(scope="module")
def served(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTorchServe]:
    """`rrp serve`'s start: TorchServe with the good model as version 1, the default."""
    server = LocalTorchServe(TorchServeConfig(workdir=tmp_path_factory.mktemp("serve"))).start()
    stop = threading.Event()
    try:
        follow_registry(ServeConfig(models_root=models["good"], follow_every_s=0.3), server, stop)
        assert server.admin().versions(NAME) == {"1": True}
        write_endpoints(server.workdir, server)
        yield server
    finally:
        stop.set()
        server.stop()


class DefaultWatch:
    """Asks the routing's default version, and TorchServe's default, every 100 ms: both must always answer."""

    def __init__(self, server: LocalTorchServe) -> None:
        assert server.keys is not None
        self.registry = Registry(server.model_store)
        self.address, self.key = server.inference_address, server.keys.inference
        self.failures: list[str] = []
        self.defaults: set[str] = set()
        self.checks = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import numpy as np

        frame = np.zeros((48, 64, 3), np.uint8)
        while not self._stop.wait(0.1):
            routing = self.registry.routing()
            if routing is None or not routing.default:
                self.failures.append("no routing default")
                continue
            self.defaults.add(routing.default)
            for version in (routing.default, ""):
                client = TorchServeClient(self.address, ModelRef(NAME, version), self.key)
                try:
                    client.infer(frame, 0.0, timeout_s=5.0)
                except Exception as exc:
                    self.failures.append(f"{version or 'server default'}: {exc}")
                finally:
                    client.close()
            self.checks += 1

    def __enter__(self) -> DefaultWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def _deployer(server: LocalTorchServe, game: str, canary: CanaryConfig = CANARY) -> Deployer:
    config = RolloutConfig(game=(game,), gate=GATE, canary=canary)
    return Deployer(config, Endpoints.resolve(server.workdir, None, "", None))


def _deploy(server: LocalTorchServe, game: str, model: Path, canary: CanaryConfig = CANARY) -> DeploymentRecord:
    return _deployer(server, game, canary).deploy(model)


# -- pure parts --------------------------------------------------------------------------------------------------


def test_the_second_model_replays_a_seeded_share_of_the_first_data() -> None:
    import numpy as np

    from pipeline.deploy_job import DeployJobConfig, replay_sample
    from trainer.vision.data import FrameSetBuilder, in_process_run

    builder = FrameSetBuilder()
    for run in range(4):
        builder.start_run(in_process_run(f"r{run}", "oval", "test", 8, 8))
        for i in range(25):
            builder.add(np.full((8, 8, 3), run * 25 + i, np.uint8), float(i), i % 16)
    frames = builder.build(8, 8)
    assert replay_sample(frames, 1.0, 0) is frames
    sample = replay_sample(frames, 0.35, 0)
    kept = sample.images[:, 0, 0, 0].astype(int)
    assert len(sample) == 35 and list(kept) == sorted(set(kept))  # no repeats, original order
    assert np.array_equal(sample.run_index, kept // 25) and np.array_equal(sample.speeds, kept % 25)
    assert np.array_equal(replay_sample(frames, 0.35, 0).images, sample.images)  # seeded
    assert not np.array_equal(replay_sample(frames, 0.35, 1).images, sample.images)
    for share in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="replay_share"):
            DeployJobConfig(replay_share=share)
    with pytest.raises(ValueError, match="dagger_epochs"):
        DeployJobConfig(dagger_epochs=0)


def test_routing_splits_cars_by_version_and_keeps_a_baseline_car() -> None:
    r = Routing(NAME, default="1", canary="2", canary_share=0.25)
    assert [r.version_for(i, 8) for i in range(8)] == ["1"] * 6 + ["2"] * 2
    assert [r.version_for(i, 2) for i in range(2)] == ["1", "2"]
    assert Routing(NAME, default="1", canary="2", canary_share=1.0).version_for(0, 4) == "1"  # car 0 stays
    assert Routing(NAME, default="1", canary="2", canary_share=0.1).version_for(0, 1) == "2"
    assert Routing(NAME, default="1").version_for(3, 4) == "1"


def test_router_rereads_a_changed_routing_and_survives_a_missing_file(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    registry.set_routing(Routing(NAME, default="1"))
    router = Router(registry.routing_path, every_s=0.0)
    assert router.current().default == "1"
    registry.set_routing(Routing(NAME, default="1", canary="2", canary_share=0.5))
    assert router.current().canary == "2"
    registry.routing_path.unlink()
    assert router.current().canary == "2"  # keeps driving on what it read last


# -- against TorchServe --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_worse_candidate_is_rolled_back_at_the_gate_and_the_default_never_changes(
    served: LocalTorchServe, models: dict[str, Path], game_server_processes: list[ServiceProcess]
) -> None:
    with DefaultWatch(served) as watch:
        record = _deploy(served, game_server_processes[0].address, models["bad"])
    assert record.decision == "rollback", record
    assert "gen-1001" in record.reason, record.reason
    assert [s.stage for s in record.steps] == ["register", "gate", "rollback"]
    registry = Registry(served.model_store)
    routing = registry.routing()
    assert routing is not None and routing.default == "1" and not routing.canary
    assert "2" not in served.admin().versions(NAME), "the candidate must leave TorchServe"
    assert watch.checks > 5 and not watch.failures and watch.defaults == {"1"}
    gate = registry.by_version("2").gate
    assert gate is not None and gate.passed is False and gate.laps["gen-1001@300"].progress < 0.05
    # The record on disk reads back as the record the deployer returned.
    assert registry.deployments()[-1] == record


@pytest.mark.slow
def test_a_candidate_as_good_is_promoted_through_the_canary_and_rolls_back_at_once(
    served: LocalTorchServe, models: dict[str, Path], game_server_processes: list[ServiceProcess],
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from pipeline.deploy import ModelsConfig
    from rrp.serving import models as models_command

    registry = Registry(served.model_store)
    # The cars race in a process of their own, on the routing; the deployer reads their /metrics.
    port = free_port()
    cars, car_lines = _rrp(
        ["autopilot", "--game", game_server_processes[1].address, "--model-server", served.inference_address,
         "--token-file", str(served.key_file), "--routing", str(registry.routing_path), "--cars", "2",
         "--laps", "1000", "--max-ticks", "100", "--realtime", "--track", "oval", "--width", "64", "--height", "48",
         "--metrics-port", str(port)]
    )  # fmt: skip
    live = CanaryConfig(**{**asdict(CANARY), "cars": 0, "live": (f"http://127.0.0.1:{port}/metrics",)})
    try:
        with DefaultWatch(served) as watch:
            record = _deploy(served, game_server_processes[0].address, models["same"], canary=live)
    finally:
        cars.send_signal(signal.SIGTERM)
        assert cars.wait(60) == 0, "".join(car_lines[-20:])
    assert record.decision == "promote", record
    steps = {s.stage: s for s in record.steps}
    assert list(steps) == ["register", "gate", "canary", "promote"]
    canary = steps["canary"].figures
    assert isinstance(canary, CanaryFigures), canary
    assert canary.candidate.laps >= 2 and canary.default.laps >= 1, canary
    laps = [json.loads(line.split("[autopilot] ", 1)[1]) for line in car_lines if line.startswith("[autopilot] {")]
    cand = record.version
    assert {lap["version"] for lap in laps} >= {"1", cand}, laps
    assert {lap["car"] for lap in laps if lap["version"] == cand} == {1}  # car 0 keeps the default
    routing = registry.routing()
    assert routing is not None and routing.default != "1" and routing.previous == "1" and not routing.canary
    new = routing.default
    assert served.admin().versions(NAME) == {"1": False, new: True}
    assert not watch.failures, watch.failures[:3]
    rows = {r.version: r for r in models_table(registry)}
    assert rows[new].role == "default" and rows["1"].role == "previous" and rows[new].gate == "passed"
    assert rows[new].live_completion is not None
    models_command(ModelsConfig(serve_dir=served.workdir))
    assert "default" in capsys.readouterr().out
    # --rollback: the previous version is the default again, at once.
    deployer = _deployer(served, game_server_processes[0].address)
    t0 = time.monotonic()
    deployer.rollback_now()
    assert time.monotonic() - t0 < 5.0
    routing = registry.routing()
    assert routing is not None and routing.default == "1" and routing.previous == new
    assert served.admin().versions(NAME) == {"1": True, new: False}


def _rrp(args: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "rrp.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, **(env or {})}, start_new_session=True,
    )  # fmt: skip
    lines: list[str] = []

    def drain() -> None:
        assert proc.stdout is not None
        lines.extend(proc.stdout)

    threading.Thread(target=drain, daemon=True).start()
    return proc, lines


def _deploy_args(server: LocalTorchServe, game: str, model: Path) -> list[str]:
    return [
        "deploy", "--model", str(model), "--serve-dir", str(server.workdir), "--game", game,
        "--gate-tracks", "gen-1001", "--gate-max-ticks", "300", "--gate-max-p99-ms", "250", "--gate-rate-hz", "0",
        "--canary-cars", "2", "--canary-laps", "2",
        "--canary-max-ticks", "100", "--canary-track", "oval", "--canary-max-missed-rate", "0.05",
        "--canary-max-fallback-rate", "0.5", "--canary-max-error-rate", "0.2",
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["register", "gate", "canary"])
def test_a_deployer_killed_in_any_stage_finishes_the_rollout_when_started_again(
    stage: str, served: LocalTorchServe, models: dict[str, Path], game_server_processes: list[ServiceProcess]
) -> None:
    registry = Registry(served.model_store)
    routing = registry.routing()
    assert routing is not None
    args = _deploy_args(served, game_server_processes[0].address, models["same"])
    with DefaultWatch(served) as watch:
        if routing.default != "1":  # an earlier case promoted the candidate: start each case from version 1
            _deployer(served, game_server_processes[0].address).rollback_now()
        # Version 1 alone, so that registering the candidate takes its real time.
        registry.set_routing(Routing(NAME, default="1"))
        deadline = time.monotonic() + 30
        while set(served.admin().versions(NAME)) != {"1"}:
            assert time.monotonic() < deadline, served.admin().versions(NAME)
            time.sleep(0.1)
        first, lines = _rrp(args)
        deadline = time.monotonic() + 120
        killed = False
        while time.monotonic() < deadline and first.poll() is None:
            running = [r for r in registry.deployments() if r.state == "running"]
            if running and running[-1].stage == stage:
                first.send_signal(signal.SIGKILL)
                first.wait(10)
                killed = True
                break
            time.sleep(0.05)
        assert killed, f"never reached {stage}:\n{''.join(lines[-20:])}"
        unfinished = registry.unfinished()
        assert unfinished is not None and unfinished.stage == stage
        second, lines2 = _rrp(args)
        assert second.wait(240) == 0, "".join(lines2[-30:])
    record = registry.deployments()[-1]
    assert record.id == unfinished.id and record.state == "done" and record.decision == "promote"
    assert registry.unfinished() is None
    assert watch.checks > 5 and not watch.failures, watch.failures[:3]
    final = registry.routing()
    assert final is not None and final.default == record.version and not final.canary


@pytest.mark.slow
def test_the_main_jobs_rollout_step_reports_the_decision_and_prometheus_graphs(
    models: dict[str, Path], game_server_processes: list[ServiceProcess], tmp_path: Path
) -> None:
    from pipeline.deploy_job import DeployJobConfig, run_deploy_job

    # The step's wiring is under test, not the gate's verdict: a busy machine's latency must not stop it at the gate.
    config = DeployJobConfig(cars=2, canary_share=0.5, canary_laps=1, gate_tracks=("gen-1001",), gate_max_ticks=300,
                             lap_max_ticks=150, gate_max_p99_ms=1000.0)  # fmt: skip
    addresses = tuple(p.address for p in game_server_processes)
    figures = run_deploy_job(models["good"], models["same"], addresses, "oval", tmp_path, config)
    assert figures["decision"] in ("promote", "rollback")
    assert [s["stage"] for s in figures["steps"]][:3] == ["register", "gate", "canary"], figures["reason"]
    assert figures["laps"] >= 2
    # Prometheus scraped the cars: laps of both versions are in its series.
    assert set(figures["prometheus"]["laps_per_version"]) >= {"1", "2"}, figures["prometheus"]
    assert {"gate", "canary"} <= set(figures["prometheus"]["stages_seen"]), figures["prometheus"]
    assert "Decision:" in figures["markdown"]
    for name in ("deployment.json", "deployment.md", "rollout.png"):
        assert (tmp_path / name).is_file()


@pytest.mark.slow
def test_a_rollout_is_one_trace_down_to_its_gate_laps(
    served: LocalTorchServe, models: dict[str, Path], game_server_processes: list[ServiceProcess]
) -> None:
    from tests.test_serving import _otlp_receiver

    spans, receiver, env = _otlp_receiver()
    try:
        proc, lines = _rrp(_deploy_args(served, game_server_processes[0].address, models["bad"]), env)
        assert proc.wait(240) == 3, "".join(lines[-30:])  # rolled back at the gate
    finally:
        receiver.stop(0)
    traces: dict[bytes, set[str]] = {}
    for name, trace_id in spans:
        traces.setdefault(trace_id, set()).add(name)
    rollout = [names for names in traces.values() if "deploy" in names]
    assert len(rollout) == 1, sorted({n for n, _ in spans})
    names = rollout[0]
    assert {"deploy.register", "deploy.gate", "gate.lap", "gate.latency", "deploy.rollback"} <= names, names
    # The gate laps' calls are in the same trace: the game server's Drive and TorchServe's Predictions.
    assert any("Drive" in n for n in names) and any("Predictions" in n for n in names), names


@pytest.mark.slow
def test_a_second_model_server_on_the_same_store_serves_the_same_versions_and_follows_a_rollback(
    served: LocalTorchServe, tmp_path: Path, game_server_processes: list[ServiceProcess]
) -> None:
    registry = Registry(served.model_store)
    second = LocalTorchServe(TorchServeConfig(workdir=tmp_path / "replica", model_store=served.model_store)).start()
    stop = threading.Event()
    try:
        follow_registry(ServeConfig(follow_every_s=0.3), second, stop)
        assert second.admin().versions(NAME) == served.admin().versions(NAME)
        assert len(registry.replicas()) == 2
        routing = registry.routing()
        assert routing is not None and routing.previous, "an earlier test promoted and rolled back"
        # --rollback waits until both servers have the previous version as their default.
        _deployer(served, game_server_processes[0].address).rollback_now()
        after = registry.routing()
        assert after is not None and after.default == routing.previous
        for server in (served, second):
            assert server.admin().versions(NAME)[after.default] is True
    finally:
        stop.set()
        second.stop()


@pytest.mark.slow
def test_an_empty_model_store_serves_nothing_until_the_first_deployment_makes_it_the_default(
    models: dict[str, Path], tmp_path: Path, game_server_processes: list[ServiceProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)  # and a relative working directory, as `rrp serve`'s default out/serve is
    server = LocalTorchServe(TorchServeConfig(workdir=Path("serve"))).start()
    stop = threading.Event()
    try:
        follow_registry(ServeConfig(models_root=tmp_path / "nothing", follow_every_s=0.3), server, stop)
        registry = Registry(server.model_store)
        assert registry.routing() is None and server.admin().versions(NAME) == {}
        write_endpoints(server.workdir, server)
        record = _deploy(server, game_server_processes[0].address, models["good"])
        assert record.kind == "first" and record.decision == "promote", record
        assert [s.stage for s in record.steps] == ["register", "promote"]
        routing = registry.routing()
        assert routing is not None and routing.default == "1" and not routing.previous
        assert server.admin().versions(NAME) == {"1": True}
    finally:
        stop.set()
        server.stop()
