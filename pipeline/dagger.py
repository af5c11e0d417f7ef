"""DAgger: the vision model drives, the evolved driver labels the states it reaches, the model retrains on the union."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from collector.client import RunProducer
from game_server.core.driver_file import load_driver
from game_server.core.pilot import drive_lap
from game_server.core.recovery import RecoveringDriver
from game_server.core.state import TICK_HZ, SimState
from game_server.core.tracks import DAGGER_TRACKS, load_track
from pipeline.collect import recovery_start
from pipeline.evaluate import DriveRecord, EvalConfig, Expert, VisionPilot, drive_on_server, run_evaluation
from pipeline.pools import open_pool
from plumbing.settings import env_value, nested, setting
from rallyrobopilot.v1 import collector_pb2 as cpb
from scheduler.executor import EvaluationPool
from trainer.vision.data import FrameSet, FrameSetBuilder, concat, in_process_run
from trainer.vision.model import DrivingNet
from trainer.vision.train import DataConfig, TrainConfig, train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DaggerConfig:
    """DAgger settings; the tracks are training tracks only, so the unseen ones stay unseen."""

    # The expert that labels: the evolved ray driver, inside the recovering teacher unless told otherwise.
    driver_path: Path = setting(help="evolved driver file (best_driver.json): expert and baseline", flag="driver")
    # Both off by default: one DAgger iteration with them (the main job's second model) completed fewer
    # held-out laps (12 of 20) and freed fewer pinned starts (3 of 8) than the model it fine-tuned (19, 6).
    recovering: bool = setting(False, "the evolved driver labels inside the recovering teacher (out of walls)")
    recovery_drives: bool = setting(False, "on each track, one more drive from a drifting or pinned start (seeded)")
    tracks: tuple[str, ...] = setting(
        DAGGER_TRACKS, "training tracks the model drives to collect", flag="dagger-tracks"
    )
    iterations: int = setting(3, "DAgger iterations")
    epochs_per_iteration: int = setting(4, "retraining epochs per iteration")
    lr_scale: float = setting(0.25, "fine-tuning learning rate as a share of the training one")
    budget_factor: float = setting(2.0, "tick budget as a multiple of the reference driver's lap")
    # DAgger frames get their own domain randomisation seeds.
    randomize: bool = setting(True, "domain-randomised frames while the model drives")
    collector: str | None = setting(None, "stream the labelled runs to this collector host:port")
    seed: int = setting(0, "seed of data, initialisation, order and augmentation")


def collect_dagger_runs(
    pilot: VisionPilot, config: DaggerConfig, iteration: int, pool: EvaluationPool
) -> list[DriveRecord]:
    """One drive per track with the model in control and the expert labelling every tick, spread over the pool;
    with `recovery_drives`, one more per track from a recovery start, where the model's own mistakes at a wall
    get the teacher's way out as labels."""
    ray = load_driver(config.driver_path).ray_driver()

    def expert(track: str) -> Expert:
        return RecoveringDriver(load_track(track), base=ray.act) if config.recovering else ray

    drives: list[tuple[str, SimState | None]] = [(t, None) for t in config.tracks]
    if config.recovery_drives:
        for i, t in enumerate(config.tracks):
            rng = np.random.default_rng([config.seed, iteration, i, 0xDA])
            _, start = recovery_start(load_track(t), rng, pinned_share=0.5)
            drives.append((t, start))
    futures = [
        pool.run_with_server(
            functools.partial(
                drive_on_server,
                tls=pool.client_tls,
                track=t,
                pilot=pilot,
                max_ticks=int(config.budget_factor * drive_lap(load_track(t))[1].lap_ticks),
                randomize=config.randomize,
                seed=config.seed * 1000 + iteration * 100 + i,
                expert=expert(t),
                keep_frames=True,
                start=start,
            )
        )
        for i, (t, start) in enumerate(drives)
    ]
    return [f.result() for f in futures]


def to_frames(records: list[DriveRecord], run_ids: list[str], pilot: VisionPilot) -> FrameSet:
    builder = FrameSetBuilder()
    for r, run_id in zip(records, run_ids, strict=True):
        builder.start_run(in_process_run(run_id, r.track, "dagger", pilot.width, pilot.height))
        for frame, obs, label in zip(r.frames, r.observations, r.expert_labels, strict=True):
            builder.add(frame, obs.state.car.speed_m_per_s, label)
    return builder.build(pilot.width, pilot.height)


def run_ids_of(records: list[DriveRecord], iteration: int) -> list[str]:
    """Fresh run ids: the collector deduplicates by (run id, tick), so a repeated DAgger run must not reuse them."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    return [f"dagger-{stamp}-it{iteration}-{r.track}-{i}" for i, r in enumerate(records)]


def stream_to_collector(
    records: list[DriveRecord], run_ids: list[str], iteration: int, config: DaggerConfig, driver_id: str
) -> int:
    """Sends the labelled runs like any other recorded run (RunSource DAGGER); returns the frames stored."""
    assert config.collector is not None
    stored = 0
    for r, run_id in zip(records, run_ids, strict=True):
        if not r.frames:
            continue
        h, w = r.frames[0].shape[:2]
        start = cpb.RunStart(
            run_id=run_id,
            track=r.track,
            source=cpb.RUN_SOURCE_DAGGER,
            driver_id=driver_id,
            width_px=w,
            height_px=h,
            encoding=cpb.IMAGE_ENCODING_RAW_RGB,
            domain_randomization=config.randomize,
            labels={"dagger_iteration": str(iteration)},
        )
        with RunProducer(config.collector, start) as producer:
            for frame, obs, label, applied in zip(r.frames, r.observations, r.expert_labels, r.applied, strict=True):
                producer.send(
                    cpb.FrameRecord(
                        run_id=run_id,
                        tick=obs.state.tick,
                        image=frame.tobytes(),
                        applied_mask=applied,
                        label_mask=label,
                        state=obs.state,
                        rays_m=obs.rays_m,
                        progress_fraction=obs.progress_fraction,
                        wall_contact=obs.wall_contact,
                    )
                )
            stats = producer.finish(cpb.RunEnd(finished=r.finished, lap_ticks=r.lap_ticks))
        stored += stats.stored_frames
    return stored


def _row(iteration: int, frames: int, added: int, report: dict[str, Any], val_exact: float | None) -> dict[str, Any]:
    seen = [t for t in report["tracks"] if t["seen_in_training"]]
    return {
        "iteration": iteration,
        "training_frames": frames,
        "dagger_frames_added": added,
        "val_exact_acc": val_exact,
        "training_track_laps": sum(t["finished"] for t in seen),
        "training_tracks": len(seen),
        "unseen_laps": report["unseen_laps_completed"],
        "unseen_tracks": report["unseen_tracks"],
        "laps": {t["track"]: t["lap_ticks"] if t["finished"] else None for t in report["tracks"]},
        "progress": {t["track"]: t["progress_fraction"] for t in report["tracks"]},
    }


def run_dagger(
    model: DrivingNet,
    frames: FrameSet,
    train_config: TrainConfig,
    config: DaggerConfig,
    eval_config: EvalConfig,
    pool: EvaluationPool,
    out_dir: Path,
) -> tuple[DrivingNet, list[dict[str, Any]]]:
    """Iterates drive -> label -> aggregate -> retrain, evaluating lap completion and time after each step."""
    out_dir.mkdir(parents=True, exist_ok=True)
    driver_id = load_driver(config.driver_path).driver_id
    retrain = dataclasses.replace(
        train_config, epochs=config.epochs_per_iteration, lr=train_config.lr * config.lr_scale, keep="last"
    )
    size = (model.config.width, model.config.height)
    pilot = VisionPilot(model, *size)
    report = run_evaluation(pilot, eval_config, out_dir / "iteration-0", pool)
    rows = [_row(0, len(frames), 0, report, None)]
    for it in range(1, config.iterations + 1):
        records = collect_dagger_runs(pilot, config, it, pool)
        run_ids = run_ids_of(records, it)
        new = to_frames(records, run_ids, pilot)
        if config.collector:
            log.info(
                "iteration %d: %d DAgger frames stored by the collector",
                it,
                stream_to_collector(records, run_ids, it, config, driver_id),
            )
        frames = concat([frames, new])
        result = train(retrain, frames, init=model)
        model = result.model
        pilot = VisionPilot(model, *size)
        report = run_evaluation(pilot, eval_config, out_dir / f"iteration-{it}", pool)
        rows.append(_row(it, len(frames), len(new), report, result.best.exact_acc))
        log.info("DAgger iteration %d: %s", it, json.dumps(rows[-1]))
    (out_dir / "dagger.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out_dir / "dagger.md").write_text(dagger_markdown(rows))
    plot_dagger(rows, out_dir / "dagger.png")
    return model, rows


def dagger_markdown(rows: list[dict[str, Any]]) -> str:
    tracks = list(rows[0]["laps"])
    head = "| iteration | frames | added | val exact | train-track laps | unseen laps | " + " | ".join(tracks) + " |"
    lines = [head, "| " + " | ".join(["---"] * (6 + len(tracks))) + " |"]
    for r in rows:
        cells = [
            f"{r['laps'][t] / TICK_HZ:.2f} s" if r["laps"][t] else f"no lap ({r['progress'][t]:.0%})" for t in tracks
        ]
        acc = "-" if r["val_exact_acc"] is None else f"{r['val_exact_acc']:.3f}"
        lines.append(
            f"| {r['iteration']} | {r['training_frames']} | {r['dagger_frames_added']} | {acc} | "
            f"{r['training_track_laps']}/{r['training_tracks']} | {r['unseen_laps']}/{r['unseen_tracks']} | "
            + " | ".join(cells)
            + " |"
        )
    return "# DAgger iterations\n\n" + "\n".join(lines) + "\n"


def plot_dagger(rows: list[dict[str, Any]], path: Path) -> None:
    its = [r["iteration"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(its, [r["training_track_laps"] + r["unseen_laps"] for r in rows], marker="o", label="all tracks")
    a.plot(its, [r["unseen_laps"] for r in rows], marker="o", label="unseen tracks")
    a.set_xlabel("DAgger iteration")
    a.set_ylabel("laps completed")
    a.legend()
    for t in rows[0]["laps"]:
        b.plot(its, [np.nan if r["laps"][t] is None else r["laps"][t] / TICK_HZ for r in rows], marker="o", label=t)
    b.set_xlabel("DAgger iteration")
    b.set_ylabel("lap time (s); gaps = no lap")
    b.legend(fontsize=7)
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@dataclass(frozen=True)
class DaggerJobConfig:
    """`rrp dagger`: the model to improve, the expert, its data and training, and the evaluation."""

    dagger: DaggerConfig = nested()
    model: Path = setting(Path("out/vision/model/model.safetensors"), "weights (safetensors) of the model")
    data: DataConfig = nested(DataConfig)
    train: TrainConfig = nested(TrainConfig)
    eval: EvalConfig = nested(EvalConfig)
    out_dir: Path = setting(Path("out/vision/dagger"), "output folder", flag="out", env="out")


def run_dagger_job(config: DaggerJobConfig) -> str:
    """DAgger from a trained model; saves the final weights and TorchScript beside the iteration reports, and
    returns the report's Markdown for the CLI to show."""
    from trainer.vision.train import TORCHSCRIPT, WEIGHTS, export_torchscript, load_frames, load_model, save_weights

    model = load_model(config.model)
    train_config = dataclasses.replace(config.train, vision=model.config)  # retrain the same net
    size = (model.config.width, model.config.height)
    frames = load_frames(config.data, size, redis_password=env_value("redis_password"))
    out = config.out_dir
    with open_pool(config.eval.pool) as (pool, _):
        model, rows = run_dagger(model, frames, train_config, config.dagger, config.eval, pool, out)
    save_weights(model, out / WEIGHTS)
    export_torchscript(model, out / TORCHSCRIPT)
    return dagger_markdown(rows) + f"final model: {out / WEIGHTS}"
