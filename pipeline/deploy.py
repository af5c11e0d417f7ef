"""`rrp deploy` and `rrp models`: a model version's rollout with no person in the loop, as a job.

The rollout itself (records, judges, live figures, the deployer's state machine) is `serving.rollout`; this job
resolves where the model server is, starts a game server for the gate when none is given, runs one rollout, a
rollback, the resumption of an interrupted one or a watch over a directory, and hands each finished deployment
record to its caller (the CLI prints them).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from plumbing.errors import DomainError, InvalidArgument, NotFound
from plumbing.metrics import start_metrics
from plumbing.procs import stop_on_signals
from plumbing.settings import nested, setting
from serving import metrics
from serving.endpoints import Endpoints, model_store_of
from serving.registry import Registry, Routing, content_id
from serving.rollout.deployer import Deployer, RolloutConfig
from serving.rollout.records import DeploymentRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeployConfig:
    """`rrp deploy`: where the model server is, what to deploy, and the gate's and canary's thresholds."""

    model: Path | None = setting(None, "trained model directory to deploy (model.safetensors + card)")
    rollback: bool = setting(False, "return to the previous default version at once, and stop")
    watch: Path | None = setting(None, "keep running: deploy each new model.safetensors that appears under DIR")
    watch_every_s: float = setting(10.0, "how often --watch looks, s", flag="watch-every")
    serve_dir: Path = setting(Path("out/serve"), "rrp serve's working directory (its endpoints, key file, store)")
    model_store: Path | None = setting(None, "TorchServe's model store (default: the serve dir's)")
    model_server: str = setting("", "TorchServe's gRPC inference address (default: from the serve dir)", metavar="ADDR")
    token_file: Path | None = setting(
        None,
        "TorchServe's inference token: its key_file.json or a file with the token (default: the serve dir's, if any)",
    )
    metrics_port: int = setting(0, "port of the Prometheus metrics endpoint (/metrics); 0: none")
    metrics_host: str = setting("127.0.0.1", "address the metrics endpoint binds; 0.0.0.0 in a pod")
    rollout: RolloutConfig = nested(RolloutConfig)

    def endpoints(self) -> Endpoints:
        return Endpoints.resolve(self.serve_dir, self.model_store, self.model_server, self.token_file)


@dataclass(frozen=True)
class ModelsConfig:
    """`rrp models`: the versions in a model store."""

    serve_dir: Path = setting(Path("out/serve"), "rrp serve's working directory")
    model_store: Path | None = setting(None, "TorchServe's model store (default: the serve dir's)")
    json: bool = setting(False, "print JSON instead of a table")


def run_deploy(config: DeployConfig, on_record: Callable[[DeploymentRecord | None], None]) -> int:
    """The rollout, rollback, resumption or watch `config` asks for; each deployment record goes to `on_record`
    (None: nothing to resume). 3 when a rollout was rolled back."""
    modes = sum((config.model is not None, config.rollback, config.watch is not None))
    if modes > 1:
        raise InvalidArgument("give one of --model, --rollback or --watch")
    if config.model is not None and not (config.model / "model.safetensors").is_file():
        raise NotFound(f"{config.model}: no model.safetensors (train one: rrp train)")
    stop = stop_on_signals("the deployer")
    endpoint = start_metrics(config.metrics_host, config.metrics_port, "deployer")
    metrics.set_stage("idle")
    with contextlib.ExitStack() as stack:

        def local_game() -> tuple[str, ...]:
            """A game server of the deployer's own, started when the gate first needs one."""
            from pipeline.pools import local_game_servers

            return tuple(s.address for s in stack.enter_context(local_game_servers(1)))

        deployer = Deployer(config.rollout, config.endpoints(), stop, games=local_game)
        try:
            if config.rollback:
                on_record(deployer.rollback_now())
            elif config.model is not None:
                record = deployer.deploy(config.model)
                on_record(record)
                return 0 if record.decision in ("promote", "none") else 3
            elif config.watch is not None:
                watch(deployer, config.watch, config.watch_every_s, stop, on_record)
            else:
                on_record(deployer.resume())
        finally:
            if endpoint is not None:
                endpoint.stop()
    return 0


def watch(
    deployer: Deployer, root: Path, every_s: float, stop: threading.Event,
    on_record: Callable[[DeploymentRecord | None], None],
) -> None:  # fmt: skip
    """Deploys each model.safetensors under `root` that the registry has not seen, newest first."""
    seen: set[str] = {v.id for v in deployer.registry.versions()}
    deployer.resume()
    log.info("watching %s for new models", root)
    while not stop.is_set():
        found = sorted(root.rglob("model.safetensors"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
        for weights in reversed(found):
            try:
                vid = content_id(weights)
            except OSError:
                continue  # still being written
            if vid in seen:
                continue
            seen.add(vid)
            try:
                on_record(deployer.deploy(weights.parent))
            except DomainError as exc:
                log.error("deploying %s failed: %s", weights.parent, exc)
            break
        stop.wait(every_s)


@dataclass(frozen=True)
class ModelRow:
    """One version as `rrp models` lists it."""

    version: str
    id: str
    role: str  # "default" | "canary" | "previous" | ""
    created: str
    gate: str  # "passed" | "failed" | "-"
    gate_p99_ms: float | None
    live_completion: float | None
    live_mean_lap_s: float | None
    data: str  # where its training data came from


@dataclass(frozen=True)
class ModelsListing:
    """A model store's versions, its routing and its last deployments."""

    store: Path
    routing: Routing | None
    rows: list[ModelRow]
    deployments: list[DeploymentRecord]


def models_table(registry: Registry) -> list[ModelRow]:
    routing = registry.routing()
    rows = []
    for v in registry.versions():
        role = ""
        if routing is not None:
            role = {routing.default: "default", routing.canary: "canary", routing.previous: "previous"}.get(
                v.version, ""
            )
        gate = "-" if v.gate is None or v.gate.passed is None else ("passed" if v.gate.passed else "failed")
        rows.append(ModelRow(
            version=v.version, id=v.id, role=role,
            created=time.strftime("%Y-%m-%d %H:%M", time.localtime(v.created)), gate=gate,
            gate_p99_ms=v.gate.inference_ms_p99 if v.gate is not None else None,
            live_completion=v.live.candidate.completion if v.live is not None else None,
            live_mean_lap_s=v.live.candidate.mean_lap_s if v.live is not None else None,
            data=str(v.data.get("source", "")),
        ))  # fmt: skip
    return rows


def list_models(config: ModelsConfig) -> ModelsListing:
    store = config.model_store or model_store_of(config.serve_dir)
    registry = Registry(store)
    return ModelsListing(store, registry.routing(), models_table(registry), registry.deployments())
