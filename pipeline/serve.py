"""The model-serving commands' jobs: package a trained model, serve it with TorchServe, race it with cars."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from plumbing.channels import ClientTLS, channel_credentials
from plumbing.errors import FailedPrecondition, InvalidArgument, NotFound
from plumbing.metrics import start_metrics
from plumbing.procs import stop_on_signals
from plumbing.settings import nested, setting
from serving.archive import ArchiveConfig
from serving.autopilot import AutopilotConfig
from serving.client import PROTOCOLS
from serving.endpoints import write_endpoints
from serving.registry import Registry, Routing, add_archive, add_version
from serving.torchserve import TorchServeConfig

if TYPE_CHECKING:
    from serving.reconcile import Reconciler
    from serving.torchserve import LocalTorchServe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackageConfig:
    """`rrp package`: a trained model directory in, a .mar archive out."""

    model: Path = setting(help="trained model directory (model.safetensors and its model card)")
    version: str = setting(help="human version of the archive, e.g. 1 or 2026.11.28")
    out: Path = setting(
        Path("out/serving/model-store"), "directory to write <name>-<version>.mar into", env="archive_out"
    )
    archive: ArchiveConfig = nested(ArchiveConfig)


@dataclass(frozen=True)
class ServeConfig:
    """`rrp serve`: a real TorchServe on loopback with a given archive, or the latest trained model."""

    archive: Path | None = setting(None, "model archive (.mar) to register; the latest trained model when absent")
    models_root: Path = setting(Path("out"), "where to look for the latest trained model (newest model.safetensors)")
    version: str | None = setting(None, "human version of a model packaged here (default: the next number)")
    torchserve: TorchServeConfig = nested(lambda: TorchServeConfig(workdir=Path("out/serve")))
    packaging: ArchiveConfig = nested(ArchiveConfig)
    follow_every_s: float = setting(1.0, "how often TorchServe is brought in line with the registry's routing, s")


@dataclass(frozen=True)
class AutopilotCommandConfig:
    """`rrp autopilot`: cars racing game servers with a served model."""

    game: tuple[str, ...] = setting(help="game server address(es), comma-separated", metavar="ADDR[,ADDR]")
    model_server: tuple[str, ...] = setting(
        help="model server gRPC inference address (rrp serve logs it); several: replicas, the next one taking "
        "over the calls when the one in use is unavailable",
        metavar="ADDR[,ADDR]",
    )
    model: str = setting("rrp-vision", "model to ask, NAME or NAME:VERSION (no version: the server's default)")
    token_file: tuple[Path, ...] = setting(
        (),
        "the model server's inference token: TorchServe's key_file.json or a file holding the bare token; one for "
        "every replica or one per replica, in order (re-read when a restarted server refuses the old one)",
        metavar="PATH[,PATH]",
    )
    protocol: str = setting("torchserve", "inference protocol: TorchServe's own API or the Open Inference Protocol",
                            choices=PROTOCOLS)  # fmt: skip
    routing: Path | None = setting(
        None,
        "the model store's registry/routing.json: each lap drives the version it names for the car (the default, "
        "or the candidate on the canary's share of cars); without it every lap asks --model",
    )
    out: Path | None = setting(None, "directory for autopilot.json and the per-hop latency plot", env="autopilot_out")
    metrics_port: int = setting(0, "port of the Prometheus metrics endpoint (/metrics); 0: none")
    metrics_host: str = setting(
        "127.0.0.1", "address the metrics endpoint binds; 0.0.0.0 for every interface (in a pod)"
    )
    autopilot: AutopilotConfig = nested(AutopilotConfig)
    # With a CA, both the game servers and the model servers (their TLS front) are called over TLS.
    tls: ClientTLS = nested(ClientTLS)


def run_package(config: PackageConfig) -> Path:
    """The archive built; its path."""
    from serving.archive import build_archive

    return build_archive(config.model, config.version, config.out, config.archive)


def latest_model(root: Path) -> Path:
    """The directory of the newest model.safetensors under `root`."""

    found = sorted(root.rglob("model.safetensors"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    if not found:
        raise NotFound(f"no trained model (model.safetensors) under {root}: give --archive, or train one (rrp train)")
    return found[-1].parent


def run_serve(config: ServeConfig) -> int:
    """TorchServe on the registry's routing until SIGTERM or Ctrl-C; 1 when TorchServe itself exits."""
    from serving.torchserve import LocalTorchServe

    stop = stop_on_signals("TorchServe")
    server = LocalTorchServe(config.torchserve)
    try:
        server.start()
        follower = follow_registry(config, server, stop)
        write_endpoints(server.workdir, server)
        routing = follower.registry.routing()
        auth = f"inference token in {server.key_file}" if config.torchserve.token_auth else "token auth off"
        log.info(
            "torchserve listening on %s (management %s, metrics %s); default version %s, following %s; %s",
            server.inference_address, server.management_address, server.metrics_url,
            routing.default if routing else "-", follower.registry.routing_path, auth,
        )  # fmt: skip
        while not stop.wait(1.0):
            if server.proc is None or server.proc.poll() is not None:
                log.error("TorchServe exited:\n%s", server.log_tail())
                return 1
    finally:
        server.stop()
        log.info("TorchServe stopped")
    return 0


def start_registry(config: ServeConfig, server: LocalTorchServe) -> Reconciler:
    """TorchServe starts empty: the registry's routing says what to serve. A store without one gets its first
    version (--archive, or the newest trained model packaged here); --archive on a store with one becomes the
    default. Returns once this server serves the routing's versions."""
    from serving.reconcile import Reconciler

    registry = Registry(server.model_store)
    routing = registry.routing()
    model_dir: Path | None = None
    if routing is None and config.archive is None:
        try:
            model_dir = latest_model(config.models_root)
        except NotFound:
            log.warning("no trained model under %s: serving nothing until rrp deploy --model DIR adds version 1",
                        config.models_root)  # fmt: skip
    if (routing is None and model_dir is not None) or config.archive is not None:
        if config.archive is not None:
            entry = add_archive(registry, config.archive)
        else:
            assert model_dir is not None
            entry = add_version(registry, model_dir, config.version, config.packaging)
        if routing is None or routing.default != entry.version:
            old = routing.default if routing is not None else ""
            registry.set_routing(Routing(entry.name, default=entry.version, previous=old))
    reconciler = Reconciler(registry, server.admin(), server.inference_address, server.inference_key)
    status = reconciler.once()
    routing = registry.routing()
    if routing is not None and status.default != routing.default:
        raise FailedPrecondition(f"the default version does not load: {status.errors}")
    return reconciler


def follow_registry(config: ServeConfig, server: LocalTorchServe, stop: threading.Event) -> Reconciler:
    """`start_registry`, then a thread that keeps the server on the registry's routing until `stop`."""
    reconciler = start_registry(config, server)
    threading.Thread(target=reconciler.run, args=(stop, config.follow_every_s), name="reconcile", daemon=True).start()
    return reconciler


def token_files(servers: tuple[str, ...], files: tuple[Path, ...]) -> dict[str, Path]:
    """Each model server's token file: none (token auth off), one for all, or one each."""
    if not servers:
        raise InvalidArgument("give a model server address: --model-server ADDR[,ADDR]")
    if len(files) not in (0, 1, len(servers)):
        raise InvalidArgument(f"{len(files)} token files for {len(servers)} model servers: give one, or one each")
    if len(files) == 1:
        files = files * len(servers)
    return dict(zip(servers, files, strict=False))


def run_autopilot_command(
    config: AutopilotCommandConfig, on_lap: Callable[[dict[str, object]], None] = lambda summary: None
) -> dict[str, object]:
    """Races the cars until their laps are done (or SIGTERM); each lap's summary goes to `on_lap` as it ends
    (from the cars' threads); returns the totals."""
    from pipeline.plots import plot_latency
    from serving.autopilot import result_json, run_autopilot
    from serving.batching import Batchers
    from serving.client import ModelRef, read_token
    from serving.replicas import FailoverClient, Replicas, connect_replicas

    model = ModelRef.parse(config.model)
    servers, files = config.model_server, config.token_file
    token_file = token_files(servers, files)
    for path in files:
        read_token(path)  # a missing or malformed token file stops here, before any car starts
    tls = config.tls if config.tls.enabled else None
    if tls is not None:
        channel_credentials(tls)  # so does a missing or malformed TLS file

    def token_of(address: str) -> str | None:
        return read_token(token_file.get(address))

    stop = stop_on_signals("the cars")

    def lap_done(r: Any) -> None:
        on_lap(r.summary())

    pilot = config.autopilot
    batched = pilot.batched and config.protocol == "torchserve"
    replicas = Replicas(servers)  # names looked up again every second: replicas that join take calls

    def replicas_of(version: str) -> FailoverClient:
        name = router.current().name if router is not None else model.name
        return connect_replicas(config.protocol, replicas, ModelRef(name, version or model.version), token_of, tls)

    router = None
    if config.routing is not None:
        from serving.registry import Router

        router = Router(config.routing)
    batchers = Batchers(replicas_of, pilot.batch_window_ms / 1e3, pilot.batch_in_flight) if batched else None
    connect_version = batchers.connect if batchers is not None else replicas_of
    endpoint = start_metrics(config.metrics_host, config.metrics_port, "autopilot")
    log.info("racing %d car(s) on %s, model servers %s (%s)", pilot.cars, ",".join(config.game),
             ",".join(replicas.targets), "batched" if batched else "one request per car")  # fmt: skip
    try:
        if router is not None:
            result = run_autopilot(
                pilot,
                config.game,
                stop=stop,
                on_lap=lap_done,
                router=router,
                connect_version=connect_version,
                game_tls=tls,
            )
        else:
            race = (lambda: batchers.race("")) if batchers is not None else None
            result = run_autopilot(
                pilot,
                config.game,
                lambda: connect_version(""),
                stop=stop,
                on_lap=lap_done,
                race_model=race,
                game_tls=tls,
            )
    finally:
        if batchers is not None:
            batchers.close()
        replicas.close()
        if endpoint is not None:
            endpoint.stop()
    report = result_json(result)
    if batchers is not None:
        sizes = batchers.sizes() or [0]
        report["totals"]["batch_frames_mean"] = round(sum(sizes) / len(sizes), 2)
        report["replicas"] = batchers.replica_calls()
    if config.out is not None:
        config.out.mkdir(parents=True, exist_ok=True)
        (config.out / "autopilot.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        plot_latency(result, config.out / "latency.png")
    totals: dict[str, object] = report["totals"]
    return totals
