"""`rrp package`, `rrp serve`, `rrp autopilot`: the vision model as a TorchServe archive, served, and raced."""

from __future__ import annotations

from typing import Any

from rrp.command import Commands


def _package() -> tuple[type[Any], Any]:
    from pipeline.serve import PackageConfig, run_package

    return PackageConfig, run_package


def _serve() -> tuple[type[Any], Any]:
    from pipeline.serve import ServeConfig, run_serve

    return ServeConfig, run_serve


def _autopilot() -> tuple[type[Any], Any]:
    from pipeline.serve import AutopilotCommandConfig, run_autopilot_command

    return AutopilotCommandConfig, run_autopilot_command


def _deploy() -> tuple[type[Any], Any]:
    from pipeline.deploy import DeployConfig, run_deploy

    return DeployConfig, run_deploy


def _models() -> tuple[type[Any], Any]:
    from pipeline.deploy import ModelsConfig, run_models

    return ModelsConfig, run_models


def register(commands: Commands) -> None:
    commands.add(
        "package",
        _package,
        help="build a TorchServe model archive (.mar) from a trained model",
        description="Packages model.safetensors (no pickle), the thin handler, a model config (batch size, "
        "batch delay, workers, response timeout) and the model card into <out>/<name>-<version>.mar with "
        "torch-model-archiver. The same archive serves locally, in tests and on a cluster.",
    )
    commands.add(
        "serve",
        _serve,
        help="start TorchServe on loopback with the vision model",
        description="Starts a real TorchServe (Java) with a generated config: gRPC inference and management "
        "ports, metrics, a model store, token authorisation on (its key_file.json private, mode 0600, never "
        "logged), management on loopback only. Registers --archive (or packages the newest model.safetensors "
        "under --models-root), waits until the model answers an inference, prints the addresses, and stops "
        "TorchServe and its workers on SIGTERM or Ctrl-C.",
    )
    commands.add(
        "autopilot",
        _autopilot,
        help="race game sessions with the served model, from camera frames alone",
        description="Drives --cars cars over the game servers through the Drive stream: each tick's frame goes "
        "to the model server and the keys come back as the command for that tick. --realtime (the default) "
        "ticks at 25 Hz of wall clock: an inference later than --deadline-ms gets the --fallback command, and "
        "late commands, missed ticks and fallbacks are counted; --lockstep advances one tick per command.",
    )
    commands.add(
        "deploy",
        _deploy,
        help="roll a new model version out: register, gate, canary, promote or roll back",
        description="Registers --model's weights as a new version beside the default (no traffic), gates it "
        "(it loads, answers within --gate-max-p99-ms, and laps the held-out --gate-tracks in lockstep at least as "
        "well as the default), canaries it (--canary-share of the autopilots' cars drive it, read from "
        "routing.json, until --canary-laps of its laps are in), then promotes it or rolls it back, writing a "
        "deployment record of every step. Killed and started again, it finishes or undoes the rollout. "
        "--rollback returns to the previous version at once; --watch DIR deploys each new model that appears.",
    )
    commands.add(
        "models",
        _models,
        help="list the model versions: default, canary, previous, gate and live figures",
        description="Reads the registry beside TorchServe's model store: each version's content id, human "
        "version, role in the routing, its gate and canary figures and its training data, and the last "
        "deployments.",
    )
