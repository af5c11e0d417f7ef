"""The main job's last step: train a second model (one DAgger iteration) and roll it out while cars race.

The first model is the default version on a TorchServe of the run's own; cars race the training track in real
time on the routing; the second model goes through the same register -> gate -> canary -> decision as
`rrp deploy`, with the canary's live figures read from a real Prometheus that scrapes this process. The report
shows the decision, both versions' figures, and the rollout as Prometheus saw it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from game_server.core.state import TICK_S
from game_server.core.tracks import DAGGER_TRACKS, UNSEEN_TRACKS
from pipeline.serve import ServeConfig, follow_registry
from plumbing.settings import setting
from serving.endpoints import Endpoints, write_endpoints
from serving.registry import ModelVersion
from serving.rollout.config import CanaryConfig, GateConfig
from serving.rollout.deployer import Deployer, RolloutConfig
from serving.rollout.records import DeploymentRecord

if TYPE_CHECKING:
    from pipeline.monitor import LocalPrometheus
    from trainer.vision.data import FrameSet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeployJobConfig:
    """The main job's second model and its rollout."""

    enabled: bool = setting(True, "train a second model and deploy it through the gate and the canary")
    dagger_epochs: int = setting(3, "fine-tuning epochs of the second model on the first's data plus DAgger's")
    # Fine-tuning on every first-model frame each epoch took ~100 s of a ~14-minute main job; a seeded share of
    # them, replayed beside all of DAgger's, keeps what the first model learnt at a third of the cost.
    replay_share: float = setting(
        0.35, "share of the first model's frames replayed in the fine-tuning (a seeded sample; 1: all)"
    )
    cars: int = setting(3, "cars racing the training track in real time during the rollout")
    canary_share: float = setting(0.67, "share of those cars that drive the candidate")
    canary_laps: int = setting(2, "candidate laps the canary waits for")
    gate_tracks: tuple[str, ...] = setting(UNSEEN_TRACKS[:1], "held-out tracks of the gate")
    gate_max_ticks: int = setting(3000, "tick budget of a gate lap")
    gate_max_p99_ms: float = setting(
        GateConfig().max_p99_ms, "the gate's inference p99 budget, ms (beyond it, and beyond the default's, it fails)"
    )
    lap_max_ticks: int = setting(3000, "tick budget of a racing car's lap")

    def __post_init__(self) -> None:
        if not 0.0 < self.replay_share <= 1.0:
            raise ValueError(f"replay_share is a share: above 0 and at most 1, got {self.replay_share}")
        if self.dagger_epochs < 1:
            raise ValueError(f"dagger_epochs must be at least 1, got {self.dagger_epochs}")


def train_second_model(
    model_path: Path, frames: Any, train_config: Any, data: Any, driver_path: Path, addresses: tuple[str, ...],
    out_dir: Path, epochs: int, replay_share: float = 1.0,
) -> Path:  # fmt: skip
    """One DAgger iteration: the first model drives the training tracks, the evolved driver labels every tick,
    and the model is fine-tuned on these frames plus `replay_share` of the first data (a sample seeded by the
    training seed)."""
    from pipeline.dagger import DaggerConfig, collect_dagger_runs, run_ids_of, to_frames
    from pipeline.evaluate import VisionPilot
    from pipeline.pools import PoolSpec, open_pool
    from trainer.vision.data import concat
    from trainer.vision.train import load_model, save_training_run, train

    model = load_model(model_path)
    pilot = VisionPilot(model, model.config.width, model.config.height)
    dagger = DaggerConfig(driver_path=driver_path, tracks=DAGGER_TRACKS, iterations=1, seed=train_config.seed)
    with open_pool(PoolSpec(servers=addresses)) as (pool, _):
        records = collect_dagger_runs(pilot, dagger, 1, pool)
    new = to_frames(records, run_ids_of(records, 1), pilot)
    retrain = dataclasses.replace(train_config, epochs=epochs, lr=train_config.lr * dagger.lr_scale, keep="last")
    replayed = replay_sample(frames, replay_share, train_config.seed)
    log.info(
        "second model: %d DAgger frames added to %d of the first %d, fine-tuning %d epochs",
        len(new.labels), len(replayed), len(frames), epochs,
    )  # fmt: skip
    both = concat([replayed, new])
    result = train(retrain, both, init=model)
    save_training_run(result, retrain, data, both, out_dir)
    return out_dir


def replay_sample(frames: FrameSet, share: float, seed: int) -> FrameSet:
    """`share` of the frames, drawn without replacement by `seed`, in their original order (all of them at 1)."""
    if share >= 1.0:
        return frames
    rng = np.random.default_rng([seed, 0x4E9])
    keep = np.sort(rng.choice(len(frames), size=max(1, round(share * len(frames))), replace=False))
    return frames.take(keep)


def run_deploy_job(
    first_model: Path, second_model: Path, addresses: tuple[str, ...], track: str, out_dir: Path,
    config: DeployJobConfig, leaderboard: str = "",
) -> dict[str, Any]:  # fmt: skip
    """Serves `first_model` as the default, races `config.cars` cars, rolls `second_model` out; the figures.

    `leaderboard`: a Redis URL that every finished gate lap and racing car's lap is submitted to (verified first)."""
    from pipeline.monitor import LocalPrometheus, MonitorConfig
    from plumbing.metrics import start_metrics
    from plumbing.redis_local import free_port
    from serving.autopilot import AutopilotConfig, AutopilotResult, run_autopilot
    from serving.client import ModelRef, connect
    from serving.registry import Registry, Router
    from serving.torchserve import LocalTorchServe, TorchServeConfig
    from trainer.vision.train import load_model

    workdir = out_dir / "torchserve"
    shutil.rmtree(workdir, ignore_errors=True)  # a fresh run: its own registry
    vision = load_model(first_model / "model.safetensors").config
    endpoint = start_metrics("127.0.0.1", free_port(), "run")
    assert endpoint is not None
    stop = threading.Event()
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(LocalTorchServe(TorchServeConfig(workdir=workdir)))
        # The run's own endpoint (the cars and the deployer) and TorchServe's.
        targets = (f"autopilot=127.0.0.1:{endpoint.port}", f"torchserve=127.0.0.1:{server.ports['metrics']}")
        monitor = MonitorConfig(targets=targets, scrape_interval_s=1.0, evaluation_interval_s=1.0)
        prometheus = stack.enter_context(LocalPrometheus(monitor))
        log.info("Prometheus at %s scraping %s", prometheus.url, ", ".join(targets))
        following = threading.Event()
        follow_registry(ServeConfig(models_root=first_model), server, following)
        write_endpoints(workdir, server)
        registry = Registry(server.model_store)
        assert server.keys is not None
        key, address = server.keys.inference, server.inference_address
        pilot = AutopilotConfig(track=track, cars=config.cars, laps=10_000, max_ticks=config.lap_max_ticks,
                                width=vision.width, height=vision.height, leaderboard=leaderboard)  # fmt: skip
        races: list[AutopilotResult] = []  # the cars' thread's result

        def race() -> None:
            races.append(run_autopilot(
                pilot, addresses, stop=stop, router=Router(registry.routing_path),
                connect_version=lambda v: connect("torchserve", address, ModelRef("rrp-vision", v), key),
            ))  # fmt: skip

        cars = threading.Thread(target=race, name="rollout-cars", daemon=True)
        t0 = time.time()
        cars.start()
        rollout = RolloutConfig(
            game=addresses[:1],
            leaderboard=leaderboard,
            gate=GateConfig(tracks=config.gate_tracks, max_ticks=config.gate_max_ticks,
                            max_p99_ms=config.gate_max_p99_ms),
            canary=CanaryConfig(share=config.canary_share, laps=config.canary_laps, prometheus=prometheus.url,
                                max_s=300.0),
        )  # fmt: skip
        try:
            record = Deployer(rollout, Endpoints.resolve(workdir, None, "", None)).deploy(second_model)
        finally:
            time.sleep(3.0)  # a last scrape after the decision
            stop.set()
            cars.join(timeout=180)
        t1 = time.time()
        following.set()
        versions = {v.version: v for v in registry.versions()}
        graphs = _graphs(prometheus, t0, t1, out_dir / "rollout.png", versions)
    endpoint.stop()
    laps = [r.summary() for race in races for r in race.laps]
    figures: dict[str, Any] = {
        "decision": record.decision,
        "reason": record.reason,
        "steps": [{"stage": s.stage, "seconds": s.seconds, "ok": s.ok, "reason": s.reason} for s in record.steps],
        "versions": {
            n: {"id": v.id, "gate": asdict(v.gate) if v.gate else None, "live": asdict(v.live) if v.live else None}
            for n, v in versions.items()
        },
        "rollout_s": round(t1 - t0, 1),
        "laps": len(laps),
        "missed_ticks": sum(lap["missed_ticks"] for lap in laps),
        "fallbacks": sum(lap["fallbacks"] for lap in laps),
        "prometheus": asdict(graphs),
    }
    (out_dir / "deployment.json").write_text(json.dumps({**figures, "record": asdict(record), "laps": laps},
                                                        indent=2, default=str) + "\n")  # fmt: skip
    figures["markdown"] = markdown(record, versions, figures)
    (out_dir / "deployment.md").write_text(figures["markdown"])
    return figures


@dataclass(frozen=True)
class RolloutGraphs:
    """What the rollout's graphs showed: each version's laps at the end, the deployer's stages, the queries."""

    laps_per_version: dict[str, float]
    stages_seen: list[str]
    queries: dict[str, str]


def version_names(versions: dict[str, ModelVersion]) -> dict[str, str]:
    """One name per version in every panel's legend: "version N", whatever series label it comes from."""
    names = {number: f"version {number}" for number in sorted(versions)}
    names["default"] = "the server's default version"  # cars that asked no version
    return names


def _graphs(
    prometheus: LocalPrometheus, start: float, end: float, path: Path, versions: dict[str, ModelVersion]
) -> RolloutGraphs:
    """The rollout as Prometheus recorded it: laps and inference p99 per version, fallbacks, the deployer's stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    queries = {
        "laps per version": "sum by (version) (rrp_autopilot_laps_total)",
        "inference p99 per version, ms": "1000 * histogram_quantile(0.99, sum by (version, le) "
        "(rate(rrp_autopilot_inference_seconds_bucket[5s])))",
        "fallbacks and missed ticks per second": "sum by (version) (rate(rrp_autopilot_fallbacks_total[5s])) or "
        'label_replace(sum(rate(rrp_autopilot_missed_ticks_total[5s])), "series", "missed ticks", "", "")',
        "deployer stage": "rrp_deployer_stage == 1",
    }
    fig, axes = plt.subplots(len(queries), 1, figsize=(10, 2.4 * len(queries)), sharex=True)
    names = version_names(versions)
    colours = {label: f"C{i}" for i, label in enumerate(names)}  # and one colour in every panel
    totals: dict[str, float] = {}
    stages: list[str] = []
    for ax, (title, expr) in zip(axes, queries.items(), strict=True):
        try:
            series = prometheus.query_range(expr, start, end, 1.0)
        except Exception as exc:  # a missing graph must not lose the run's report
            log.warning("Prometheus query %s: %s", expr, exc)
            series = []
        for s in series:
            metric = s.labels
            label = metric.get("version") or metric.get("stage") or metric.get("series") or "all"
            t = [at - start for at, _ in s.points]
            y = [value for _, value in s.points]
            if title == "deployer stage":
                ax.scatter(t, [label] * len(t), s=4)
            elif "version" in metric:
                ax.plot(t, y, label=names.get(label, f"version {label}"), color=colours.get(label), linewidth=1)
            else:
                ax.plot(t, y, label=f"{label}, all versions", color="grey", linewidth=1, linestyle="--")
            if title == "laps per version" and y:
                totals[label] = y[-1]
            if title == "deployer stage" and y:
                stages.append(label)
        ax.set_title(title, fontsize=9)
        if title != "deployer stage" and series:
            ax.legend(fontsize=7, loc="upper left")
    axes[-1].set_xlabel("seconds since the cars started")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return RolloutGraphs(totals, stages, queries)


def markdown(record: DeploymentRecord, versions: dict[str, ModelVersion], figures: dict[str, Any]) -> str:
    """The report's section: the decision, each step, and both versions' gate laps and live windows."""
    steps = "\n".join(f"| {s.stage} | {s.seconds if s.seconds is not None else '-'} | {s.reason} |"
                      for s in record.steps)  # fmt: skip
    candidate = versions.get(record.version)
    rows = []
    for number, v in sorted(versions.items()):
        for key, lap in sorted(v.gate.laps.items() if v.gate else []):
            done = f"{lap.lap_ticks * TICK_S:.2f} s" if lap.finished else f"{lap.progress:.0%} (DNF)"
            rows.append(f"| {number} | gate {key} | {done} | {lap.wall_contacts} |")
        # The default's live window is kept on the candidate's record of the canary they shared.
        shared = candidate.live if candidate is not None else None
        live = (v.live.candidate if v.live else None) if number == record.version else (shared and shared.default)
        if live:
            rows.append(f"| {number} | canary ({live.laps:.0f} laps live) | completion {live.completion:.0%}, "
                        f"mean lap {live.mean_lap_s:.2f} s | {live.wall_contacts:.0f} |")  # fmt: skip
    table = "\n".join(rows)
    return f"""A second model (the first fine-tuned on one DAgger iteration: it drove the training tracks and the
evolved driver labelled every tick) was rolled out as version {record.version} while
cars raced the training track in real time on the routing: register beside the default with no traffic, gate on
held-out tracks in lockstep against the default, canary on a share of the cars with the live figures read from
Prometheus, then the decision.

**Decision: {record.decision}** ({record.reason}); the rollout took {figures["rollout_s"]} s, during which
the cars drove {figures["laps"]} laps with {figures["missed_ticks"]} missed ticks and {figures["fallbacks"]} fallbacks.

| stage | seconds | outcome |
| --- | --- | --- |
{steps}

| version | where | lap | wall-contact ticks |
| --- | --- | --- | --- |
{table}

![the rollout, as Prometheus recorded it](deployment/rollout.png)
"""
