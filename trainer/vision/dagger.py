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
from game_server.core.pilot import drive_lap
from game_server.core.state import TICK_HZ
from game_server.core.tracks import load_track
from rallyrobopilot.v1 import collector_pb2 as cpb
from scheduler.executor import EvaluationPool
from trainer.driver_file import load_driver
from trainer.vision.data import FrameSet, FrameSetBuilder, concat, in_process_run
from trainer.vision.evaluate import DriveRecord, EvalConfig, VisionPilot, drive_on_server, run_evaluation
from trainer.vision.model import DrivingNet
from trainer.vision.train import TrainConfig, train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DaggerConfig:
    """DAgger settings; the tracks are training tracks only, so the unseen ones stay unseen."""

    driver_path: Path  # the expert that labels: the evolved ray driver
    tracks: tuple[str, ...] = ("kidney", "oval", "alpine", "gen-1", "gen-2", "gen-3")
    iterations: int = 3
    epochs_per_iteration: int = 4
    lr_scale: float = 0.25  # fine-tuning learning rate as a share of the training one
    budget_factor: float = 2.0
    randomize: bool = True  # DAgger frames get their own domain randomisation seeds
    collector: str | None = None  # stream the labelled runs to this collector (RunSource DAGGER)
    seed: int = 0


def collect_dagger_runs(
    pilot: VisionPilot, config: DaggerConfig, iteration: int, pool: EvaluationPool
) -> list[DriveRecord]:
    """One drive per track with the model in control and the expert labelling every tick, spread over the pool."""
    expert = load_driver(config.driver_path).ray_driver()
    futures = [
        pool.run_with_server(
            functools.partial(
                drive_on_server,
                track=t,
                pilot=pilot,
                max_ticks=int(config.budget_factor * drive_lap(load_track(t))[1].lap_ticks),
                randomize=config.randomize,
                seed=config.seed * 1000 + iteration * 100 + i,
                expert=expert,
                keep_frames=True,
            )
        )
        for i, t in enumerate(config.tracks)
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
    return [f"dagger-{stamp}-it{iteration}-{r.track}" for r in records]


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
