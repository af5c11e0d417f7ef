"""The rollout's pure parts: the judges, the live window, the exposition parser, records read back from JSON, and
the deployer's inference clients coming from the one factory. No servers: each test takes milliseconds."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from plumbing.errors import FailedPrecondition, InvalidArgument
from serving.client import OpenInferenceClient, TorchServeClient
from serving.endpoints import Endpoints, ServedEndpoints, model_store_of, read_endpoints
from serving.registry import ModelVersion, Registry, Routing
from serving.rollout.config import CanaryConfig, GateConfig
from serving.rollout.deployer import Deployer, RolloutConfig
from serving.rollout.judges import judge_canary, judge_lap, judge_latency, window
from serving.rollout.live import parse_exposition
from serving.rollout.records import (
    CanaryFigures,
    Counters,
    DecisionFigures,
    DeploymentRecord,
    GateFigures,
    GateLap,
    GateOutcome,
    LiveOutcome,
    RegisterFigures,
    RolloutSettings,
    StepRecord,
    dump_record,
    load_record,
)

GATE = GateConfig(tracks=("gen-1001",))
BASE = GateLap("t", "1", finished=True, lap_ticks=1000, lap_s=40.0, progress=1.0, wall_contacts=10, ticks=1000)
EXPOSITION = """# TYPE rrp_autopilot_laps_total counter
rrp_autopilot_laps_total{version="1",finished="true"} 3.0
rrp_autopilot_laps_total{version="2",finished="false"} 2.0
rrp_autopilot_ticks_total{version="2"} 500.0
rrp_autopilot_fallbacks_total{version="2"} 100.0
rrp_autopilot_lap_seconds_sum{version="1"} 120.0
rrp_game_ticks_total 7.0
"""


def test_a_gate_lap_fails_for_each_way_it_is_worse_than_the_default() -> None:
    assert judge_lap(replace(BASE, version="2"), BASE, GATE) == []
    assert "lap 44.00 s" in judge_lap(replace(BASE, lap_ticks=1100, lap_s=44.0), BASE, GATE)[0]
    assert judge_lap(replace(BASE, lap_ticks=1020, lap_s=40.8), BASE, GATE) == []  # within --gate-lap-time-ratio
    dnf = replace(BASE, finished=False, progress=0.5, stop_reason="no progress")
    assert "did not finish (50%, no progress)" in judge_lap(dnf, BASE, GATE)[0]
    base_dnf = replace(BASE, finished=False, progress=0.6)
    assert judge_lap(replace(dnf, progress=0.59), base_dnf, GATE) == []  # within --gate-progress-tolerance
    assert "reached 50%" in judge_lap(dnf, base_dnf, GATE)[0]
    assert judge_lap(replace(BASE, wall_contacts=41), BASE, GATE)  # over 1.5 x 10 + 25
    assert judge_lap(replace(BASE, wall_contacts=40), BASE, GATE) == []


def test_latency_fails_only_over_both_the_budget_and_the_defaults_multiple() -> None:
    assert judge_latency(20.0, 5.0, GATE) == []
    assert judge_latency(30.0, 25.0, GATE) == []  # a loaded machine: within 1.25x the default's
    assert "inference p99 40.0 ms" in judge_latency(40.0, 25.0, GATE)[0]
    with pytest.raises(InvalidArgument, match="training tracks"):
        GateConfig(tracks=("kidney",))


def test_the_exposition_is_summed_per_version_and_the_canary_judges_the_window() -> None:
    after = parse_exposition(EXPOSITION)
    assert set(after) == {"1", "2"}  # series without a version label are not the autopilots'
    assert after["1"] == Counters(laps=3.0, finished=3.0, lap_s_sum=120.0)
    parse_exposition(EXPOSITION, after)  # a second source adds up
    assert after["2"].ticks == 1000.0
    cand, default = window({}, after, "2"), window({}, after, "1")
    assert cand.laps == 4 and cand.fallback_rate == 0.2 and default.completion == 1.0 and default.mean_lap_s == 40.0
    failures = judge_canary(cand, default, CanaryConfig())
    assert any("completion" in f for f in failures) and any("fallback" in f for f in failures)
    assert judge_canary(window(after, after, "2"), default, CanaryConfig()) == [
        "no candidate lap was driven during the canary"
    ]
    good = replace(default, ticks=3000.0)
    assert judge_canary(good, default, CanaryConfig()) == []


def test_records_read_back_from_json_as_they_were_written(tmp_path: Path) -> None:
    lap = replace(BASE, version="2", stop_reason="finished", inference_ms_p50=3.1, inference_ms_p99=7.4)
    canary = CanaryFigures(window({}, parse_exposition(EXPOSITION), "2"), window({}, {}, "1"), 12.5, ["x"])
    record = DeploymentRecord(
        id="1-abc", kind="rollout", candidate="abc", version="2", started=1.0, name="rrp-vision", default="1",
        steps=[StepRecord("register", 1.0, 2.0, 1.0, True, "registered", RegisterFigures(1.0)),
               StepRecord("gate", 2.0, 3.0, 1.0, True, "gate", GateFigures([], 5.0, 4.0, [])),
               StepRecord("canary", 3.0, 4.0, 1.0, False, "canary: x", canary),
               StepRecord("rollback", 4.0)],
        decision="rollback", settings=RolloutSettings(GATE, CanaryConfig(laps=3)),
    )  # fmt: skip
    registry = Registry(tmp_path)
    registry.save_deployment(record)
    assert registry.deployments() == [record] and registry.unfinished() == record
    gate = GateOutcome(False, ["f"], 7.4, {"t@300": lap})
    live = LiveOutcome(canary.candidate, canary.default, passed=False)
    version = ModelVersion("abc", "2", "rrp-vision", "a.mar", "/m", 1.0, gate=gate, live=live)
    registry.save(version)
    assert registry.by_id("abc") == version
    routing = registry.set_routing(Routing("rrp-vision", default="1", staged=("2",)))
    assert registry.routing() == routing and routing.staged == ("2",)
    assert record.summary() == "rollback version 2: " + " (register 1.0 s, gate 1.0 s, canary 1.0 s, rollback - s)"


def test_records_written_before_they_were_typed_read_back_the_same(tmp_path: Path) -> None:
    """The JSON the dict-based deployer wrote: every record on disk reads, and writes back the same keys."""
    lap = {"track": "gen-1001", "version": "2", "finished": False, "lap_ticks": 0, "lap_s": 0.0, "progress": 0.02,
           "wall_contacts": 3, "ticks": 300, "stop_reason": "max ticks", "inference_ms_p50": 2.5,
           "inference_ms_p99": None}  # fmt: skip
    old = {
        "id": "17-abcdef12", "kind": "rollout", "candidate": "abcdef1234567890", "version": "2", "name": "rrp-vision",
        "default": "1", "started": 17.0, "state": "done", "stage": "done", "decision": "rollback", "reason": "gate: x",
        "settings": {"gate": {"tracks": ["gen-1001"], "max_ticks": 300}, "canary": {"laps": 2}}, "ended": 20.0,
        "steps": [
            {"stage": "register", "started": 17.0, "ended": 18.0, "seconds": 1.0, "ok": True,
             "figures": {"load_s": 1.0}, "reason": "registered with no traffic"},
            {"stage": "gate", "started": 18.0, "ended": 19.0, "seconds": 1, "ok": False, "reason": "gate: x",
             "figures": {"laps": [{"track": "gen-1001", "candidate": lap, "default": {**lap, "version": "1"}}],
                         "inference_ms_p99": 3.0, "default_inference_ms_p99": 2.0, "failures": ["x"]}},
            {"stage": "rollback", "started": 19.0, "ended": 20.0, "seconds": 0.5, "ok": True,
             "figures": {"unregistered": "2"}, "reason": "version 2 unregistered"},
        ],
    }  # fmt: skip
    (tmp_path / "registry" / "deployments").mkdir(parents=True)
    (tmp_path / "registry" / "deployments" / "17-abcdef12.json").write_text(json.dumps(old))
    (record,) = Registry(tmp_path).deployments()
    gate = record.step("gate")
    assert gate is not None and isinstance(gate.figures, GateFigures) and gate.seconds == 1.0
    assert gate.figures.laps[0].candidate.progress == 0.02 and gate.figures.laps[0].default.version == "1"
    assert record.step("rollback") == StepRecord("rollback", 19.0, 20.0, 0.5, True, "version 2 unregistered",
                                                 DecisionFigures(unregistered="2"))  # fmt: skip
    written = json.loads(json.dumps(dump_record(record)))
    assert written["steps"][2]["figures"] == {"default": "", "previous": "", "unregistered": "2"}
    written["steps"][2]["figures"] = old["steps"][2]["figures"]  # type: ignore[index]
    assert record.settings is not None and record.settings.gate.max_ticks == 300 and record.settings.canary.laps == 2
    written["settings"] = old["settings"]  # the thresholds now written whole, defaults too
    assert written == json.loads(json.dumps(old))
    # A version never gated was written with empty gate and live objects: they read as absent.
    entry = {"id": "abc", "version": "1", "name": "n", "archive": "a.mar", "source": "/m", "created": 1,
             "card": {"model": "m"}, "gate": {}, "live": {}, "a key of a newer writer": 1}  # fmt: skip
    version = load_record(ModelVersion, entry)
    assert version.gate is None and version.live is None and version.created == 1.0
    with pytest.raises(FailedPrecondition, match="ModelVersion"):
        load_record(ModelVersion, {"id": "abc"})


def test_the_deployer_gets_its_inference_clients_from_the_factory(tmp_path: Path) -> None:
    endpoints = Endpoints(tmp_path, "127.0.0.1:1", "key")
    for protocol, kind in (("torchserve", TorchServeClient), ("oip", OpenInferenceClient)):
        client = Deployer(RolloutConfig(protocol=protocol), endpoints).client("rrp-vision", "2")
        try:
            assert isinstance(client, kind) and (client.model, client.version) == ("rrp-vision", "2")
        finally:
            client.close()
    with pytest.raises(InvalidArgument, match="protocol"):
        Deployer(RolloutConfig(protocol="http"), endpoints).client("rrp-vision", "2")
    with pytest.raises(FailedPrecondition, match="--game"):
        Deployer(RolloutConfig(), endpoints).games()


def test_the_endpoints_file_names_the_store_and_the_inference_address(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition, match="no model server"):
        Endpoints.resolve(tmp_path, None, "", None)
    written = ServedEndpoints(inference="127.0.0.1:7070", model_store=str(tmp_path / "store"))
    (tmp_path / "endpoints.json").write_text(json.dumps(dump_record(written)))
    assert read_endpoints(tmp_path) == written and model_store_of(tmp_path) == tmp_path / "store"
    resolved = Endpoints.resolve(tmp_path, None, "", None)
    assert resolved == Endpoints(tmp_path / "store", "127.0.0.1:7070", None)
    assert Endpoints.resolve(tmp_path, tmp_path, "other:1", None).inference == "other:1"
