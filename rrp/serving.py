"""`rrp package`, `rrp serve`, `rrp autopilot`: the vision model as a TorchServe archive, served, and raced."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from rrp.command import Commands

if TYPE_CHECKING:
    from pipeline.deploy import DeployConfig, ModelsConfig, ModelsListing
    from pipeline.serve import AutopilotCommandConfig, PackageConfig
    from serving.rollout.records import DeploymentRecord


def _package() -> tuple[type[Any], Any]:
    from pipeline.serve import PackageConfig

    return PackageConfig, package


def package(config: PackageConfig) -> int:
    from pipeline.serve import run_package

    print(run_package(config), flush=True)
    return 0


def _serve() -> tuple[type[Any], Any]:
    from pipeline.serve import ServeConfig, run_serve

    return ServeConfig, run_serve


def _autopilot() -> tuple[type[Any], Any]:
    from pipeline.serve import AutopilotCommandConfig

    return AutopilotCommandConfig, autopilot


def autopilot(config: AutopilotCommandConfig) -> int:
    """Races the cars; a line per lap as it ends (`[autopilot] {json}`), then the totals."""
    import threading

    from pipeline.serve import run_autopilot_command

    printing = threading.Lock()

    def on_lap(summary: dict[str, object]) -> None:
        with printing:  # cars are threads: one whole line each
            sys.stdout.write(f"[autopilot] {json.dumps(summary)}\n")
            sys.stdout.flush()

    totals = run_autopilot_command(config, on_lap)
    print(json.dumps(totals), flush=True)
    return 0


def _deploy() -> tuple[type[Any], Any]:
    from pipeline.deploy import DeployConfig

    return DeployConfig, deploy


def deploy(config: DeployConfig) -> int:
    """The rollout; a line per finished deployment."""
    from pipeline.deploy import run_deploy

    def on_record(record: DeploymentRecord | None) -> None:
        print(f"[deploy] {record.summary()}" if record else "[deploy] nothing to resume: give --model DIR", flush=True)

    return run_deploy(config, on_record)


def _models() -> tuple[type[Any], Any]:
    from pipeline.deploy import ModelsConfig

    return ModelsConfig, models


def models(config: ModelsConfig) -> int:
    """The versions as a table (or JSON), and the last deployments."""
    from pipeline.deploy import list_models

    listing = list_models(config)
    if config.json:
        print(json.dumps(_models_json(listing), indent=2, default=str))
        return 0
    if not listing.rows:
        print(f"no model versions in {listing.store} (rrp serve registers the first; rrp deploy --model DIR the next)")
        return 0
    rows = [{k: "-" if v is None else str(v) for k, v in asdict(r).items()} for r in listing.rows]
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in rows[0]}
    print("  ".join(c.ljust(w) for c, w in widths.items()))
    for r in rows:
        print("  ".join(r[c].ljust(w) for c, w in widths.items()))
    for d in listing.deployments[-3:]:
        print(f"[deploy] {d.summary()}")
    return 0


def _models_json(listing: ModelsListing) -> dict[str, object]:
    return {
        "routing": asdict(listing.routing) if listing.routing else None,
        "versions": [asdict(r) for r in listing.rows],
        "deployments": [asdict(d) for d in listing.deployments[-5:]],
    }


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
