"""`rrp train`: the vision model from recorded (or generated) frames, or its learning curves."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.curves import CurvesConfig, run_learning_curves
from plumbing.settings import env_value, nested, setting
from trainer.vision.train import DataConfig, TrainConfig, load_frames, resolve_device, save_training_run, train


@dataclass(frozen=True)
class TrainJobConfig:
    """One training run: the data, the training settings, and where the model, card and plots go."""

    data: DataConfig = nested(DataConfig)
    train: TrainConfig = nested(TrainConfig)
    out_dir: Path = setting(Path("out/vision/model"), "folder for weights, TorchScript, card", flag="out", env="out")
    learning_curves: bool = setting(False, "instead: sweep training frames x resolution (64x48, 128x96)")
    curves: CurvesConfig = nested(CurvesConfig)


def run_train_job(config: TrainJobConfig) -> str:
    """Trains and saves the model (or the learning curves); the Redis password comes from the environment.

    Returns what was made, in a line for the CLI to show."""
    data, settings, out = config.data, config.train, config.out_dir
    password = env_value("redis_password")
    if config.learning_curves:
        rows = run_learning_curves(data, settings, config.curves, out, password)
        return f"learning curves ({len(rows)} points) written to {out}"
    resolve_device(settings.device)  # a missing GPU is said before any data is loaded
    frames = load_frames(data, (settings.vision.width, settings.vision.height), redis_password=password)
    result = train(settings, frames)
    card = save_training_run(result, settings, data, frames, out)
    m = card["metrics"]
    return (
        f"{result.train_frames} training frames, best epoch {result.best_epoch}: throttle "
        f"{m['throttle_acc']:.3f}, steering {m['steer_acc']:.3f}, exact {m['exact_acc']:.3f} in "
        f"{result.seconds:.0f} s; model and card in {out}"
    )
