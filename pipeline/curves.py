"""Data requirements: validation accuracy and closed-loop lap completion against training frames and resolution."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from game_server.core.pilot import drive_lap
from game_server.core.tracks import UNSEEN_TRACKS, load_track
from pipeline.evaluate import drive_in_process
from trainer.vision.data import FrameSet, resize_frames, split_frames
from trainer.vision.pilot import VisionPilot
from trainer.vision.train import DataConfig, TrainConfig, load_frames, train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CurvesConfig:
    """The grid: training-set sizes (frames) x resolutions, each model driven once on every evaluation track."""

    sizes: tuple[int, ...] = (1500, 5000, 15000)
    resolutions: tuple[tuple[int, int], ...] = ((64, 48), (128, 96))
    eval_tracks: tuple[str, ...] = ("kidney", *UNSEEN_TRACKS)
    budget_factor: float = 2.0


def _at(frames: FrameSet, width: int, height: int) -> FrameSet:
    return dataclasses.replace(frames, images=resize_frames(frames.images, width, height))


def run_learning_curves(
    data: DataConfig,
    train_config: TrainConfig,
    config: CurvesConfig,
    out_dir: Path,
    redis_password: str | None = None,
) -> list[dict[str, Any]]:
    """Generates the data once at the largest resolution, fixes one validation split, and trains on random
    subsets of the training frames (every run keeps some, so track coverage stays the same and only the
    amount of data varies)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    widest = max(config.resolutions)
    frames = load_frames(data, widest, train_config.progress, redis_password)
    train_idx, val_idx = split_frames(frames, train_config.val_fraction, train_config.seed, train_config.split_by)
    order = np.random.default_rng(train_config.seed).permutation(train_idx)
    budgets = {t: int(config.budget_factor * drive_lap(load_track(t))[1].lap_ticks) for t in config.eval_tracks}
    rows: list[dict[str, Any]] = []
    for width, height in config.resolutions:
        train_all, val = _at(frames.take(order), width, height), _at(frames.take(val_idx), width, height)
        for size in config.sizes:
            n = min(size, len(train_all))
            vision = dataclasses.replace(train_config.vision, width=width, height=height)
            result = train(dataclasses.replace(train_config, vision=vision), train_all.take(np.arange(n)), val=val)
            pilot = VisionPilot(result.model, width, height)
            drives = {t: drive_in_process(t, pilot, budgets[t]) for t in config.eval_tracks}
            row = {
                "resolution": f"{width}x{height}",
                "train_frames": n,
                "val_frames": len(val),
                "val_exact_acc": result.best.exact_acc,
                "val_throttle_acc": result.best.throttle_acc,
                "val_steer_acc": result.best.steer_acc,
                "train_seconds": round(result.seconds, 1),
                "laps_completed": sum(d.finished for d in drives.values()),
                "tracks": len(drives),
                "mean_progress": round(float(np.mean([d.progress_fraction for d in drives.values()])), 3),
                "laps": {t: d.lap_ticks if d.finished else None for t, d in drives.items()},
            }
            log.info("learning curve point: %s", json.dumps(row))
            rows.append(row)
            (out_dir / "curves.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out_dir / "curves.md").write_text(curves_markdown(rows))
    plot_curves(rows, out_dir / "learning_curves.png")
    return rows


def curves_markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| resolution | training frames | val exact acc | val throttle acc | val steering acc | laps completed | "
        "mean progress | train s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['resolution']} | {r['train_frames']} | {r['val_exact_acc']:.3f} | {r['val_throttle_acc']:.3f} | "
            f"{r['val_steer_acc']:.3f} | {r['laps_completed']}/{r['tracks']} | {r['mean_progress']:.0%} | "
            f"{r['train_seconds']} |"
        )
    return "# Learning curves\n\n" + "\n".join(lines) + "\n"


def plot_curves(rows: list[dict[str, Any]], path: Path) -> None:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for res in dict.fromkeys(r["resolution"] for r in rows):
        pts = [r for r in rows if r["resolution"] == res]
        n = [r["train_frames"] for r in pts]
        a.plot(n, [r["val_exact_acc"] for r in pts], marker="o", label=f"{res} exact mask")
        a.plot(n, [r["val_steer_acc"] for r in pts], marker=".", ls="--", label=f"{res} steering")
        b.plot(n, [r["laps_completed"] for r in pts], marker="o", label=f"{res} laps")
        b.plot(
            n, [r["mean_progress"] * r["tracks"] for r in pts], marker=".", ls="--", label=f"{res} progress x tracks"
        )
    a.set_ylabel("validation accuracy")
    b.set_ylabel(f"closed loop, of {rows[0]['tracks']} tracks")
    for ax in (a, b):
        ax.set_xscale("log")
        ax.set_xlabel("training frames")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
