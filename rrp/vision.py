"""`rrp train`, `rrp evaluate`, `rrp dagger`: the vision autopilot's training and closed-loop races."""

from __future__ import annotations

from typing import Any

from rrp.command import Commands


def _train() -> tuple[type[Any], Any]:
    from pipeline.train import TrainJobConfig, run_train_job

    def run(config: TrainJobConfig) -> int:
        print(run_train_job(config), flush=True)
        return 0

    return TrainJobConfig, run


def _evaluate() -> tuple[type[Any], Any]:
    from pipeline.evaluate_job import EvaluateJobConfig, run_evaluate_job

    def run(config: EvaluateJobConfig) -> int:
        print(run_evaluate_job(config), flush=True)
        return 0

    return EvaluateJobConfig, run


def _dagger() -> tuple[type[Any], Any]:
    from pipeline.dagger import DaggerJobConfig, run_dagger_job

    def run(config: DaggerJobConfig) -> int:
        print(run_dagger_job(config), flush=True)
        return 0

    return DaggerJobConfig, run


def register(commands: Commands) -> None:
    commands.add(
        "train",
        _train,
        help="train the vision autopilot on recorded or generated frames",
        description="Trains a CNN from camera frame and speed to keys, on runs read from Redis (--redis), an "
        "export (--shards) or rolled out here (--generate, the default); saves safetensors weights, a TorchScript "
        "export and a model card in --out. Epochs and early stopping decide when it ends, never the clock.",
    )
    commands.add(
        "evaluate",
        _evaluate,
        help="let the vision model drive on game servers, from frames only",
        description="Races the model in lockstep on the training and unseen tracks, spread over the pool, and "
        "compares it with the evolved driver and the reference driver.",
    )
    commands.add(
        "dagger",
        _dagger,
        help="DAgger: the model drives, the evolved driver labels, the model retrains",
    )
