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
