"""`rrp package`, `rrp serve`, `rrp autopilot`: the vision model as a TorchServe archive, served, and raced."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plumbing.settings import add_flags, from_args, nested, setting
from serving.archive import ArchiveConfig
from serving.autopilot import AutopilotConfig
from serving.client import PROTOCOLS
from serving.torchserve import TorchServeConfig

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
    version: str | None = setting(None, "version for a model packaged here (default: a hash of its weights)")
    torchserve: TorchServeConfig = nested(TorchServeConfig)
    packaging: ArchiveConfig = nested(ArchiveConfig)


@dataclass(frozen=True)
class AutopilotCommandConfig:
    """`rrp autopilot`: cars racing game servers with a served model."""

    game: tuple[str, ...] = setting(help="game server address(es), comma-separated", metavar="ADDR[,ADDR]")
    model_server: str = setting(help="model server gRPC inference address (rrp serve prints it)", metavar="ADDR")
    model: str = setting("rrp-vision", "model to ask, NAME or NAME:VERSION (no version: the server's default)")
    token_file: Path | None = setting(
        None, "the model server's inference token: TorchServe's key_file.json or a file holding the bare token"
    )
    protocol: str = setting("torchserve", "inference protocol: TorchServe's own API or the Open Inference Protocol",
                            choices=PROTOCOLS)  # fmt: skip
    out: Path | None = setting(None, "directory for autopilot.json and the per-hop latency plot", env="autopilot_out")
    autopilot: AutopilotConfig = nested(AutopilotConfig)


def _setup_parser(p: argparse.ArgumentParser, cls: type[Any]) -> None:
    add_flags(p, cls)


def register(sub: Any) -> None:
    """Adds `package`, `serve` and `autopilot` to the `rrp` subcommands (an argparse subparsers object)."""
    subparsers = getattr(sub, "sub", sub)  # also accepts a wrapper that holds the subparsers as `.sub`
    p = subparsers.add_parser(
        "package",
        help="build a TorchServe model archive (.mar) from a trained model",
        description="Packages model.safetensors (no pickle), the thin handler, a model config (batch size, "
        "batch delay, workers, response timeout) and the model card into <out>/<name>-<version>.mar with "
        "torch-model-archiver. The same archive serves locally, in tests and on a cluster.",
    )
    _setup_parser(p, PackageConfig)
    p.set_defaults(run=lambda args: run_package(from_args(PackageConfig, args)))

    p = subparsers.add_parser(
        "serve",
        help="start TorchServe on loopback with the vision model",
        description="Starts a real TorchServe (Java) with a generated config: gRPC inference and management "
        "ports, metrics, a model store, token authorisation on (its key_file.json private, mode 0600, never "
        "logged), management on loopback only. Registers --archive (or packages the newest model.safetensors "
        "under --models-root), waits until the model answers an inference, prints the addresses, and stops "
        "TorchServe and its workers on SIGTERM or Ctrl-C.",
    )
    _setup_parser(p, ServeConfig)
    p.set_defaults(run=lambda args: run_serve(from_args(ServeConfig, args)))

    p = subparsers.add_parser(
        "autopilot",
        help="race game sessions with the served model, from camera frames alone",
        description="Drives --cars cars over the game servers through the Drive stream: each tick's frame goes "
        "to the model server and the keys come back as the command for that tick. --realtime (the default) "
        "ticks at 25 Hz of wall clock: an inference later than --deadline-ms gets the --fallback command, and "
        "late commands, missed ticks and fallbacks are counted; --lockstep advances one tick per command.",
    )
    _setup_parser(p, AutopilotCommandConfig)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--realtime", dest="mode", action="store_const", const="realtime", help="same as --mode realtime")
    mode.add_argument("--lockstep", dest="mode", action="store_const", const="lockstep", help="same as --mode lockstep")
    p.set_defaults(run=lambda args: run_autopilot_command(from_args(AutopilotCommandConfig, args)))


# -- the commands ---------------------------------------------------------------------------------------------


def run_package(config: PackageConfig) -> int:
    from serving.archive import build_archive

    path = build_archive(config.model, config.version, config.out, config.archive)
    print(path, flush=True)
    return 0


def latest_model(root: Path) -> Path:
    """The directory of the newest model.safetensors under `root`."""
    from plumbing.errors import NotFound

    found = sorted(root.rglob("model.safetensors"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    if not found:
        raise NotFound(f"no trained model (model.safetensors) under {root}: give --archive, or train one (rrp train)")
    return found[-1].parent


def weights_version(model_dir: Path) -> str:
    """A content hash of the weights: the same model always gets the same version."""
    import hashlib

    return hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()[:12]


def run_serve(config: ServeConfig) -> int:
    from serving.archive import archive_info, build_archive
    from serving.torchserve import LocalTorchServe

    stop = threading.Event()

    def handle(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping TorchServe", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    server = LocalTorchServe(config.torchserve)
    try:
        server.start()
        archive = config.archive
        if archive is None:
            model_dir = latest_model(config.models_root)
            version = config.version or weights_version(model_dir)
            archive = build_archive(model_dir, version, server.model_store, config.packaging)
        info = archive_info(archive)
        print(f"[serve] registering {archive}", flush=True)
        server.register(archive)
        server.wait_model(info["name"], info["version"], info["input"]["width"], info["input"]["height"])
        print(
            f"torchserve listening on {server.inference_address} (management {server.management_address}, "
            f"metrics {server.metrics_url}); inference token in {server.key_file}",
            flush=True,
        )
        while not stop.wait(1.0):
            if server.proc is None or server.proc.poll() is not None:
                print(f"[serve] TorchServe exited:\n{server.log_tail()}", file=sys.stderr, flush=True)
                return 1
    finally:
        server.stop()
        print("[serve] TorchServe stopped", flush=True)
    return 0


def run_autopilot_command(config: AutopilotCommandConfig) -> int:
    from serving.autopilot import plot_latency, result_json, run_autopilot
    from serving.client import ModelRef, connect, read_token

    model = ModelRef.parse(config.model)
    token = read_token(config.token_file)
    stop = threading.Event()

    def handle(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping the cars", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)

    def on_lap(r: Any) -> None:
        print(f"[autopilot] {json.dumps(r.summary())}", flush=True)

    result = run_autopilot(
        config.autopilot,
        config.game,
        lambda: connect(config.protocol, config.model_server, model, token),
        stop=stop,
        on_lap=on_lap,
    )
    report = result_json(result)
    print(json.dumps(report["totals"]), flush=True)
    if config.out is not None:
        config.out.mkdir(parents=True, exist_ok=True)
        (config.out / "autopilot.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        plot_latency(result, config.out / "latency.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m rrp.serving <command>`: these commands on their own, as `rrp <command>` runs them."""
    parser = argparse.ArgumentParser(prog="rrp")
    parser.add_argument("--log-level", default="INFO", help="logging level")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from plumbing.errors import DomainError

    try:
        return int(args.run(args))
    except DomainError as exc:
        print(f"rrp {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
