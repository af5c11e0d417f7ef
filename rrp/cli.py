"""The `rrp` command: one entry point, one subcommand per component; it parses, sets up logging and delegates."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from plumbing.config import env

if TYPE_CHECKING:
    from trainer.data.records import FrameSource
    from trainer.evolve_job import PoolSpec
    from trainer.vision.evaluate import EvalConfig, VisionPilot
    from trainer.vision.train import DataConfig, TrainConfig


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _add_server_flags(p: argparse.ArgumentParser, default_port: int) -> None:
    p.add_argument("--host", default=env("host", "127.0.0.1", str), help="address to bind (RRP_HOST)")
    p.add_argument("--port", type=int, default=env("port", default_port, int), help="port, 0 = any free (RRP_PORT)")
    p.add_argument("--workers", type=int, default=env("workers", 16, int), help="RPC worker threads (RRP_WORKERS)")


def cmd_game_server(args: argparse.Namespace) -> int:
    from game_server.game import GameConfig
    from game_server.server import GameServerConfig, serve
    from plumbing.bootstrap import ServerConfig

    config = GameServerConfig(
        server=ServerConfig(host=args.host, port=args.port, max_workers=args.workers, service_name="game-server"),
        game=GameConfig(
            max_sessions=args.max_sessions,
            idle_timeout_s=args.idle_timeout,
            evaluate_slots=args.evaluate_slots,
        ),
    )
    serve(config)
    return 0


def cmd_scheduler(args: argparse.Namespace) -> int:
    from plumbing.bootstrap import ServerConfig
    from scheduler.executor import PoolConfig
    from scheduler.server import SchedulerConfig, serve

    if bool(args.servers) == bool(args.discover):
        raise SystemExit("rrp scheduler: give either --servers or --discover (RRP_SERVERS, RRP_DISCOVER)")
    try:
        pool = PoolConfig(
            servers=tuple(a.strip() for a in args.servers.split(",") if a.strip()),
            discover=args.discover or None,
            discover_interval_s=args.discover_interval,
            evaluate_timeout_s=args.evaluate_timeout,
            health_timeout_s=args.health_timeout,
            health_interval_s=args.health_interval,
            max_attempts=args.max_attempts,
            max_pending=args.max_pending,
            unavailable_timeout_s=args.unavailable_timeout or None,
        )
    except ValueError as exc:
        raise SystemExit(f"rrp scheduler: {exc}") from exc
    server = ServerConfig(host=args.host, port=args.port, max_workers=args.workers, service_name="scheduler")
    serve(SchedulerConfig(pool=pool, server=server))
    return 0


def cmd_collector(args: argparse.Namespace) -> int:
    from collector.ingest import IngestLimits
    from collector.server import MAX_MESSAGE_BYTES, CollectorConfig, serve
    from collector.store import RedisConfig
    from plumbing.bootstrap import ServerConfig
    from plumbing.redis_local import LocalRedis

    log = logging.getLogger("rrp.collector")
    local: LocalRedis | None = None
    url = args.redis
    if not url:
        local = LocalRedis(Path(args.redis_dir), appendfsync=args.redis_appendfsync, die_with_parent=True).start()
        url = local.url
        log.info("no --redis given: started a private redis-server at %s (data in %s)", url, local.data_dir)
    try:
        redis_config = RedisConfig(
            url=url,
            username=args.redis_username or None,
            password=env("redis_password", None, str),
            password_file=Path(args.redis_password_file) if args.redis_password_file else None,
            tls_ca_file=Path(args.redis_tls_ca) if args.redis_tls_ca else None,
            tls_cert_file=Path(args.redis_tls_cert) if args.redis_tls_cert else None,
            tls_key_file=Path(args.redis_tls_key) if args.redis_tls_key else None,
            prefix=args.prefix,
        )
        config = CollectorConfig(
            redis=redis_config,
            server=ServerConfig(
                host=args.host,
                port=args.port,
                max_workers=args.workers,
                max_message_bytes=MAX_MESSAGE_BYTES,
                service_name="collector",
            ),
            limits=IngestLimits(inflight_bytes=args.inflight_mb * 1024 * 1024),
        )
        serve(config, on_stop=local.stop if local is not None else None)
    finally:
        if local is not None:
            local.stop()
    return 0


def cmd_play(args: argparse.Namespace) -> int:
    from game_server.core import physics
    from game_server.core.tracks import load_track
    from game_server.play import run_play

    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise SystemExit(
            "rrp play: no display to open a window on (DISPLAY is not set); on a headless machine run it under "
            "a virtual one: xvfb-run -s '-screen 0 1280x720x24' .venv/bin/rrp play"
        )
    if not args.record:
        run_play(load_track(args.track), physics.step)
        return 0
    import contextlib

    from collector.collect import collector_for
    from game_server.play_recording import PlayRecordConfig, PlayRecorder

    with collector_for(args.collector or None, None, Path(args.out) / "redis") as (address, _):
        recorder = PlayRecorder(PlayRecordConfig(address, encoding=_ENCODINGS[args.encoding]), args.track)
        try:
            with contextlib.suppress(SystemExit):  # ursina quits with sys.exit when the window closes
                run_play(load_track(args.track), physics.step, record_hook=recorder)
        finally:
            runs = recorder.close()
    for run in runs:
        print(f"recorded {run.run_id}: {run.frames} frames, {run.acked} acknowledged, collector {address}")
    return 0


_ENCODINGS = {"raw": 1, "png": 2, "jpeg": 3}  # collector.proto ImageEncoding


def cmd_collect(args: argparse.Namespace) -> int:
    from collector.collect import CollectConfig, run_collect
    from collector.tasks import RecordSettings
    from plumbing.errors import DomainError

    settings = RecordSettings(
        collector_address="",
        max_ticks=args.max_ticks,
        encoding=_ENCODINGS[args.encoding],
        jpeg_quality=args.jpeg_quality,
        width_px=args.width,
        height_px=args.height,
        domain_randomization=not args.no_randomize,
        perturb_probability=args.perturb_prob,
        perturb_max_ticks=args.perturb_max_ticks,
    )
    try:
        config = CollectConfig(
            episodes=args.episodes,
            driver_paths=tuple(Path(p) for p in args.drivers.split(",") if p),
            tracks=tuple(t for t in args.tracks.split(",") if t),
            out_dir=Path(args.out),
            seed=args.seed,
            settings=settings,
            collector=args.collector or None,
            redis_url=args.redis or None,
            run_prefix=args.run_prefix,
            recovery_share=args.recovery_share,
            recovery_ticks=args.recovery_ticks,
        )
        summary = run_collect(config, _pool_spec(args))
    except (ValueError, OSError, DomainError) as exc:
        raise SystemExit(f"rrp collect: {exc}") from exc
    return 0 if summary.failed == 0 else 1


def _pool_spec(args: argparse.Namespace) -> PoolSpec:
    from trainer.evolve_job import PoolSpec

    servers = tuple(a for a in (args.servers or "").split(",") if a)
    return PoolSpec(
        servers=servers, discover=args.discover, local_servers=args.local_servers, in_process=args.in_process
    )


def cmd_evolve(args: argparse.Namespace) -> int:
    from trainer.evolve import EvolveConfig
    from trainer.evolve_job import run_evolve_job

    config = EvolveConfig(
        track=args.track,
        kind=args.kind,
        population=args.population,
        generations=args.generations,
        seed=args.seed,
        extra_tracks=tuple(t for t in (args.extra_tracks or "").split(",") if t),
    )
    outcome = run_evolve_job(config, Path(args.out), _pool_spec(args), resume=args.resume)
    return 0 if outcome.best.lap_ticks else 1


def cmd_run(args: argparse.Namespace) -> int:
    from rrp.mainjob import MainJobConfig, run_main_job

    config = MainJobConfig(
        track=args.track,
        out_dir=Path(args.out),
        game_servers=args.game_servers,
        population=args.population,
        generations=args.generations,
        seed=args.seed,
        episodes=args.episodes,
        epochs=args.epochs,
    )
    return run_main_job(config)


def _data_source(args: argparse.Namespace) -> FrameSource:
    from trainer.data.redis_source import RedisRuns
    from trainer.data.shards import ShardSet

    if getattr(args, "shards", None):
        return ShardSet(Path(args.shards))
    return RedisRuns(args.redis, prefix=args.prefix, password=env("redis_password", None, str))


def cmd_data_validate(args: argparse.Namespace) -> int:
    import redis

    from trainer.data.records import DataError
    from trainer.data.validate import load_requirements, validate_source

    shares: dict[str, float] = {}
    for item in args.min_label_share:
        key, _, value = item.partition("=")
        try:
            shares[key] = float(value)
        except ValueError:
            raise SystemExit(f"rrp data validate: --min-label-share wants KEY=SHARE, got {item!r}") from None
    overrides = {
        "min_frames": args.min_frames,
        "min_runs": args.min_runs,
        "min_tracks": args.min_tracks,
        "max_offtrack_share": args.max_offtrack_share,
        "min_track_coverage": args.min_track_coverage,
        "min_label_share": shares,
    }
    try:
        requirements = load_requirements(Path(args.config) if args.config else None, overrides)
        report = validate_source(_data_source(args), requirements, Path(args.out), track=args.track)
    except redis.RedisError as exc:
        raise SystemExit(f"rrp data validate: Redis: {exc}") from exc
    except (ValueError, OSError) as exc:  # DataError is a ValueError: an unreadable export, else a bad config
        kind = "data" if isinstance(exc, DataError) else "config"
        raise SystemExit(f"rrp data validate: {kind} error: {exc}") from exc
    s = report.summary
    print(f"{s['frames']} frames, {s['runs']} runs, {s['tracks']} tracks; report in {args.out}/validation.md")
    if not report.passed:
        print("data validation failed:", *(f"  - {f}" for f in report.failures), sep="\n", file=sys.stderr)
        return 1
    print("data validation passed")
    return 0


def cmd_data_export(args: argparse.Namespace) -> int:
    import redis

    from trainer.data.shards import export_shards

    try:
        manifest = export_shards(_data_source(args), Path(args.out), shard_frames=args.shard_frames, track=args.track)
    except (ValueError, OSError, redis.RedisError) as exc:
        raise SystemExit(f"rrp data export: {exc}") from exc
    frames = sum(r["frames"] for r in manifest["runs"])
    print(f"exported {len(manifest['runs'])} runs, {frames} frames in {len(manifest['shards'])} shards to {args.out}")
    return 0


def _add_data_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    data = sub.add_parser("data", help="check and export the recorded training frames")
    data_sub = data.add_subparsers(dest="data_command", required=True)

    def add_redis_flags(p: argparse.ArgumentParser, group: argparse._MutuallyExclusiveGroup | None = None) -> None:
        (group or p).add_argument(
            "--redis",
            default=env("redis_url", "redis://127.0.0.1:6379/0", str),
            help="Redis URL (RRP_REDIS_URL); the password, if any, from RRP_REDIS_PASSWORD",
        )
        p.add_argument("--prefix", default=env("redis_prefix", "rrp:", str), help="key prefix (RRP_REDIS_PREFIX)")
        p.add_argument("--track", default=None, help="only the runs of this track")

    p = data_sub.add_parser(
        "validate",
        help="report on a data set and fail on unmet requirements",
        description="Reads every frame from Redis or an export, writes validation.json, validation.md and plots "
        "to --out, and exits 1 listing each unmet requirement. Thresholds: defaults, then --config, then flags.",
    )
    where = p.add_mutually_exclusive_group()
    add_redis_flags(p, where)
    where.add_argument("--shards", default=None, help="an export folder (from rrp data export) instead of Redis")
    p.add_argument("--out", default=env("out", "out/data-validation", str), help="report folder (RRP_OUT)")
    p.add_argument("--config", default=None, help="JSON file of requirements (DataRequirements field names)")
    p.add_argument("--min-frames", type=int, default=None, help="least frames in all (default 2000)")
    p.add_argument("--min-runs", type=int, default=None, help="least runs (default 2)")
    p.add_argument("--min-tracks", type=int, default=None, help="least tracks (default 1)")
    p.add_argument(
        "--max-offtrack-share", type=float, default=None, help="most share of wall-contact frames (default 0.2)"
    )
    p.add_argument(
        "--min-track-coverage",
        type=float,
        default=None,
        help="least share of each known track's centre-line segments visited (default 0.5)",
    )
    p.add_argument(
        "--min-label-share",
        action="append",
        default=[],
        metavar="KEY=SHARE",
        help="least share of frames with a key set, e.g. left=0.05; repeatable (defaults forward=0.3 left=0.05 "
        "right=0.05)",
    )
    p.set_defaults(func=cmd_data_validate)

    p = data_sub.add_parser(
        "export",
        help="write runs from Redis to checksummed safetensors shards",
        description="Writes shard-NNNNN.safetensors files and manifest.json (runs, frame counts, SHA-256) "
        "to --out, which must not hold an export already.",
    )
    add_redis_flags(p)
    p.add_argument("--out", required=True, help="export folder")
    p.add_argument("--shard-frames", type=int, default=2048, help="frames per shard (default 2048)")
    p.set_defaults(func=cmd_data_export)


def _vision_data_config(args: argparse.Namespace) -> DataConfig:
    from trainer.vision.train import DataConfig

    return DataConfig(
        redis_url=args.redis,
        redis_prefix=args.redis_prefix,
        shards=Path(args.shards) if args.shards else None,
        tracks=tuple(t for t in args.tracks.split(",") if t),
        episodes=args.episodes,
        ticks=args.ticks,
        perturb_prob=args.perturb,
        randomize=not args.no_randomize,
        driver_path=Path(args.driver) if args.driver else None,
        seed=args.seed,
    )


def _vision_train_config(args: argparse.Namespace) -> TrainConfig:
    from trainer.vision.data import AugmentConfig
    from trainer.vision.model import VisionConfig
    from trainer.vision.train import TrainConfig

    return TrainConfig(
        vision=VisionConfig(width=args.width, height=args.height, seed=args.seed),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        patience=args.patience,
        val_fraction=args.val_fraction,
        split_by=args.split_by,
        augment=None if args.no_augment else AugmentConfig(),
        balance=not args.no_balance,
        threads=args.threads,
        seed=args.seed,
        time_limit_s=args.time_limit,
    )


def cmd_train(args: argparse.Namespace) -> int:
    from trainer.vision.curves import CurvesConfig, run_learning_curves
    from trainer.vision.train import load_frames, save_training_run, train

    data, config = _vision_data_config(args), _vision_train_config(args)
    out = Path(args.out)
    if args.learning_curves:
        curves = CurvesConfig(sizes=tuple(int(n) for n in args.curve_sizes.split(",")))
        rows = run_learning_curves(data, config, curves, out, env("redis_password", None, str))
        print(f"[train] learning curves ({len(rows)} points) written to {out}", flush=True)
        return 0
    frames = load_frames(data, (args.width, args.height), redis_password=env("redis_password", None, str))
    result = train(config, frames)
    card = save_training_run(result, config, data, frames, out)
    m = card["metrics"]
    print(
        f"[train] {result.train_frames} training frames, best epoch {result.best_epoch}: throttle "
        f"{m['throttle_acc']:.3f}, steering {m['steer_acc']:.3f}, exact {m['exact_acc']:.3f} in "
        f"{result.seconds:.0f} s; model and card in {out}",
        flush=True,
    )
    return 0


def _vision_eval_config(args: argparse.Namespace) -> EvalConfig:
    from trainer.vision.evaluate import EvalConfig

    return EvalConfig(
        training_tracks=tuple(t for t in args.eval_tracks.split(",") if t),
        unseen_tracks=tuple(t for t in args.unseen.split(",") if t),
        driver_path=Path(args.driver) if args.driver else None,
        servers=tuple(a for a in args.servers.split(",") if a),
        local_servers=args.local_servers,
        budget_factor=args.budget_factor,
        randomize=args.randomize_frames,
        seed=args.frame_seed,
    )


def _vision_pilot(args: argparse.Namespace) -> VisionPilot:
    import torch

    from trainer.vision.evaluate import VisionPilot
    from trainer.vision.train import TORCHSCRIPT, load_model

    torch.set_num_threads(1)  # the game servers need the other core
    model = load_model(Path(args.model))
    c = model.config
    if args.torchscript:
        return VisionPilot(torch.jit.load(str(Path(args.model).with_name(TORCHSCRIPT))), c.width, c.height)
    return VisionPilot(model, c.width, c.height)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from trainer.vision.evaluate import markdown_report, run_evaluation

    report = run_evaluation(_vision_pilot(args), _vision_eval_config(args), Path(args.out))
    print(markdown_report(report), flush=True)
    return 0


def cmd_dagger(args: argparse.Namespace) -> int:
    import dataclasses

    from trainer.vision.dagger import DaggerConfig, run_dagger
    from trainer.vision.evaluate import game_pool
    from trainer.vision.train import TORCHSCRIPT, WEIGHTS, export_torchscript, load_frames, load_model, save_weights

    if not args.driver:
        raise SystemExit("rrp dagger: --driver (the evolved expert, best_driver.json) is required")
    data, eval_config = _vision_data_config(args), _vision_eval_config(args)
    model = load_model(Path(args.model))
    train_config = dataclasses.replace(_vision_train_config(args), vision=model.config)  # retrain the same net
    config = DaggerConfig(
        driver_path=Path(args.driver),
        tracks=tuple(t for t in args.dagger_tracks.split(",") if t),
        iterations=args.iterations,
        epochs_per_iteration=args.epochs_per_iteration,
        collector=args.collector,
        seed=args.seed,
    )
    frames = load_frames(
        data, (model.config.width, model.config.height), redis_password=env("redis_password", None, str)
    )
    out = Path(args.out)
    with game_pool(eval_config.servers, eval_config.local_servers) as pool:
        model, _ = run_dagger(model, frames, train_config, config, eval_config, pool, out)
    save_weights(model, out / WEIGHTS)
    export_torchscript(model, out / TORCHSCRIPT)
    print((out / "dagger.md").read_text() + f"final model: {out / WEIGHTS}", flush=True)
    return 0


def _add_pool_flags(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument("--servers", default=env("servers", "", str), help="game servers host:port,... (RRP_SERVERS)")
    where.add_argument(
        "--discover", default=env("discover", None, str), help="DNS name[:port] of the game servers (RRP_DISCOVER)"
    )
    where.add_argument("--in-process", action="store_true", help="evaluate in this process with the builtin map")
    p.add_argument(
        "--local-servers", type=int, default=2, help="without --servers/--discover: game servers to start here"
    )


def _add_vision_data_flags(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--redis",
        default=env("redis_url", None, str),
        help="read recorded runs from this Redis URL (RRP_REDIS_URL; password from RRP_REDIS_PASSWORD)",
    )
    src.add_argument("--shards", default=None, help="read runs exported by `rrp data export` from this folder")
    src.add_argument("--generate", action="store_true", help="roll out the driver in process (the default source)")
    p.add_argument("--redis-prefix", default="rrp:", help="key prefix of the collector's Redis data")
    default_tracks = ",".join(["kidney", "oval", "alpine", *(f"gen-{i}" for i in range(1, 10))])
    p.add_argument("--tracks", default=default_tracks, help="--generate: tracks to drive (never the evaluation ones)")
    p.add_argument("--episodes", type=int, default=3, help="--generate: episodes per track (1st from the start line)")
    p.add_argument("--ticks", type=int, default=500, help="--generate: ticks per episode at most")
    p.add_argument("--perturb", type=float, default=0.04, help="--generate: chance per tick of a random-key burst")
    p.add_argument("--no-randomize", action="store_true", help="--generate: no domain randomisation of frames")
    p.add_argument("--driver", default=None, help="evolved driver file (best_driver.json): expert and baseline")
    p.add_argument("--seed", type=int, default=0, help="seed of data, initialisation, order and augmentation")


def _add_vision_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--width", type=int, default=128, help="model input width in pixels")
    p.add_argument("--height", type=int, default=96, help="model input height in pixels")
    p.add_argument("--epochs", type=int, default=12, help="epochs at most")
    p.add_argument("--batch-size", type=int, default=128, help="frames per step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (one-cycle)")
    p.add_argument(
        "--patience", type=int, default=4, help="epochs without a better validation exact-mask accuracy before stopping"
    )
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of runs (or tracks) held out")
    p.add_argument("--split-by", choices=["run", "track"], default="run", help="hold out whole runs or tracks")
    p.add_argument("--no-augment", action="store_true", help="no brightness/contrast/colour/shift/flip jitter")
    p.add_argument("--no-balance", action="store_true", help="no class weights in the loss")
    p.add_argument("--threads", type=int, default=2, help="torch threads (fixed, for reproducibility)")
    p.add_argument("--time-limit", type=float, default=540.0, help="stop after the epoch that crosses this (s)")


def _add_vision_eval_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="out/vision/model/model.safetensors", help="weights (safetensors)")
    p.add_argument("--torchscript", action="store_true", help="drive with the TorchScript export beside the weights")
    p.add_argument("--eval-tracks", default="kidney", help="training track(s) to drive on")
    p.add_argument(
        "--unseen", default=",".join(f"gen-{i}" for i in range(1001, 1006)), help="tracks never used in training"
    )
    if not any(a.dest == "driver" for a in p._actions):
        p.add_argument("--driver", default=None, help="evolved driver file (best_driver.json) to compare with")
    p.add_argument("--servers", default=env("servers", "", str), help="game servers host:port,... (RRP_SERVERS)")
    p.add_argument("--local-servers", type=int, default=2, help="without --servers: game servers to start here")
    p.add_argument("--budget-factor", type=float, default=2.0, help="tick budget as a multiple of the reference lap")
    p.add_argument("--randomize-frames", action="store_true", help="domain-randomised frames while driving")
    p.add_argument("--frame-seed", type=int, default=0, help="seed of that randomisation")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rrp", description="RallyRoboPilot: race, evolve, collect, train, serve.")
    parser.add_argument("--log-level", default=env("log_level", "INFO", str), help="logging level (RRP_LOG_LEVEL)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("game-server", help="serve the racing game over gRPC")
    _add_server_flags(p, 50051)
    p.add_argument(
        "--max-sessions",
        type=int,
        default=env("max_sessions", 32, int),
        help="session limit (RRP_MAX_SESSIONS)",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=env("idle_timeout", 300.0, float),
        help="seconds before an idle session is closed (RRP_IDLE_TIMEOUT)",
    )
    p.add_argument(
        "--evaluate-slots",
        type=int,
        default=env("evaluate_slots", 2, int),
        help="concurrent Evaluate calls before RESOURCE_EXHAUSTED (RRP_EVALUATE_SLOTS)",
    )
    p.set_defaults(func=cmd_game_server)

    p = sub.add_parser("scheduler", help="spread Evaluate batches over a pool of game servers")
    _add_server_flags(p, 50052)
    p.add_argument("--servers", default=env("servers", "", str), help="game servers, host:port,host:port (RRP_SERVERS)")
    p.add_argument(
        "--discover",
        default=env("discover", "", str),
        help="DNS name[:port] resolving to the game servers, re-resolved periodically (RRP_DISCOVER)",
    )
    p.add_argument(
        "--discover-interval",
        type=float,
        default=env("discover_interval", 5.0, float),
        help="seconds between DNS resolutions (RRP_DISCOVER_INTERVAL)",
    )
    p.add_argument(
        "--evaluate-timeout",
        type=float,
        default=env("evaluate_timeout", 60.0, float),
        help="deadline of one Evaluate call, seconds (RRP_EVALUATE_TIMEOUT)",
    )
    p.add_argument(
        "--health-timeout",
        type=float,
        default=env("health_timeout", 2.0, float),
        help="deadline of one health check, seconds (RRP_HEALTH_TIMEOUT)",
    )
    p.add_argument(
        "--health-interval",
        type=float,
        default=env("health_interval", 1.0, float),
        help="seconds between health checks of every server (RRP_HEALTH_INTERVAL)",
    )
    p.add_argument(
        "--max-attempts",
        type=int,
        default=env("max_attempts", 4, int),
        help="attempts per evaluation when servers fail (RRP_MAX_ATTEMPTS)",
    )
    p.add_argument(
        "--max-pending",
        type=int,
        default=env("max_pending", 4096, int),
        help="evaluations queued before submitters wait (RRP_MAX_PENDING)",
    )
    p.add_argument(
        "--unavailable-timeout",
        type=float,
        default=env("unavailable_timeout", 120.0, float),
        help="seconds queued evaluations wait while no game server is healthy before failing with "
        "UNAVAILABLE; 0 waits for ever (RRP_UNAVAILABLE_TIMEOUT)",
    )
    p.set_defaults(func=cmd_scheduler)

    p = sub.add_parser("collector", help="ingest recorded camera frames into Redis Streams over gRPC")
    _add_server_flags(p, 50053)
    p.add_argument(
        "--redis",
        default=env("redis_url", "", str),
        help="Redis URL, redis:// or rediss:// for TLS (RRP_REDIS_URL); none: start a private redis-server",
    )
    p.add_argument(
        "--redis-dir",
        default=env("redis_dir", "out/redis", str),
        help="data folder of the private redis-server (RRP_REDIS_DIR)",
    )
    p.add_argument(
        "--redis-appendfsync",
        choices=["always", "everysec"],
        default=env("redis_appendfsync", "always", str),
        help="private redis-server: fsync its append-only file on every write (power-cut safe) or once a second"
        " (3x faster for raw frames; a crash of Redis alone still loses nothing) (RRP_REDIS_APPENDFSYNC)",
    )
    p.add_argument(
        "--redis-username", default=env("redis_username", "", str), help="Redis ACL user (RRP_REDIS_USERNAME)"
    )
    p.add_argument(
        "--redis-password-file",
        default=env("redis_password_file", "", str),
        help="file holding the Redis password (RRP_REDIS_PASSWORD_FILE); or set RRP_REDIS_PASSWORD",
    )
    p.add_argument(
        "--redis-tls-ca", default=env("redis_tls_ca", "", str), help="CA bundle for rediss:// (RRP_REDIS_TLS_CA)"
    )
    p.add_argument(
        "--redis-tls-cert", default=env("redis_tls_cert", "", str), help="client certificate (RRP_REDIS_TLS_CERT)"
    )
    p.add_argument("--redis-tls-key", default=env("redis_tls_key", "", str), help="client key (RRP_REDIS_TLS_KEY)")
    p.add_argument("--prefix", default=env("redis_prefix", "rrp:", str), help="key prefix (RRP_REDIS_PREFIX)")
    p.add_argument(
        "--inflight-mb",
        type=int,
        default=env("inflight_mb", 64, int),
        help="MB read from all streams but not yet stored before reading pauses (RRP_INFLIGHT_MB)",
    )
    p.set_defaults(func=cmd_collector)

    p = sub.add_parser("play", help="drive the game yourself in a window (WASD or arrows, R reset, Esc quit)")
    p.add_argument("--track", default="oval", help="track name: a built-in or gen-<seed>")
    p.add_argument(
        "--record",
        action="store_true",
        help="stream every tick (frame rendered offscreen from the tick's state, keys as labels) to a collector; "
        "R starts a new run",
    )
    p.add_argument(
        "--collector",
        default=env("collector", "", str),
        help="with --record: collector host:port (RRP_COLLECTOR); none: start one here with a Redis in --out",
    )
    p.add_argument("--encoding", choices=sorted(_ENCODINGS), default="png", help="with --record: image encoding")
    p.add_argument("--out", default=env("out", "out/play", str), help="with --record and no --collector: Redis data")
    p.set_defaults(func=cmd_play)

    p = sub.add_parser(
        "collect",
        help="record camera frames of drivers on a pool of game servers into Redis",
        description="Spreads recording episodes (Record calls) over game servers, round-robin over driver files x "
        "tracks, each with its own perturbation and randomisation seed derived from --seed; writes "
        "collect_summary.json to --out. Run ids are PREFIX-TRACK-NNNN, so collecting again stores nothing twice.",
    )
    p.add_argument("--episodes", type=int, default=8, help="episodes to record")
    p.add_argument("--drivers", required=True, help="driver files (rrp evolve's best_driver.json), PATH[,PATH]")
    p.add_argument("--tracks", default=env("track", "oval", str), help="tracks a,b,c (RRP_TRACK)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--servers", default=env("servers", "", str), help="game servers host:port,... (RRP_SERVERS)")
    where.add_argument(
        "--discover", default=env("discover", None, str), help="DNS name[:port] of the game servers (RRP_DISCOVER)"
    )
    p.add_argument("--local-servers", type=int, default=2, help="without --servers/--discover: game servers to start")
    sink = p.add_mutually_exclusive_group()
    sink.add_argument("--collector", default=env("collector", "", str), help="collector host:port (RRP_COLLECTOR)")
    sink.add_argument(
        "--redis",
        default=env("redis_url", "", str),
        help="Redis URL for a collector started here (RRP_REDIS_URL); neither: a private Redis in --out",
    )
    p.add_argument("--encoding", choices=sorted(_ENCODINGS), default="png", help="image encoding")
    p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality 1..100")
    p.add_argument("--width", type=int, default=128, help="frame width, pixels")
    p.add_argument("--height", type=int, default=96, help="frame height, pixels")
    p.add_argument("--no-randomize", action="store_true", help="no domain randomisation of the frames")
    p.add_argument("--perturb-prob", type=float, default=0.02, help="per-tick probability a perturbation starts")
    p.add_argument("--perturb-max-ticks", type=int, default=12, help="longest perturbation, ticks")
    p.add_argument("--max-ticks", type=int, default=3000, help="ticks per episode at most (it stops at the finish)")
    p.add_argument("--seed", type=int, default=0, help="seed of every episode's seeds")
    p.add_argument(
        "--recovery-share",
        type=float,
        default=0.0,
        help="share of each driver/track pair's later episodes that start from a random state (recoveries)",
    )
    p.add_argument("--recovery-ticks", type=int, default=500, help="length of a recovery episode, ticks")
    p.add_argument("--run-prefix", default="", help="run id prefix (default collect-s<seed>)")
    p.add_argument("--out", default=env("out", "out/collect", str), help="folder for the summary (and Redis data)")
    p.set_defaults(func=cmd_collect, in_process=False)

    p = sub.add_parser("evolve", help="evolve a fast lap (open-loop program) or a closed-loop driver with DEAP")
    p.add_argument("--track", default=env("track", "kidney", str), help="training track (RRP_TRACK)")
    p.add_argument("--kind", choices=["program", "driver"], default="program", help="individual kind")
    p.add_argument("--population", type=int, default=32, help="individuals per generation")
    p.add_argument("--generations", type=int, default=10, help="generations after the initial one")
    p.add_argument("--seed", type=int, default=0, help="seed of the whole run")
    p.add_argument("--extra-tracks", default="", help="driver kind: more tracks to average over (a,b,...)")
    p.add_argument("--out", default=env("out", "out/evolve", str), help="folder for checkpoint, plots, driver")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    _add_pool_flags(p)
    p.set_defaults(func=cmd_evolve)

    p = sub.add_parser("run", help="the main job: local services, evolve, race, report")
    p.add_argument("--track", default=env("track", "kidney", str), help="training track (RRP_TRACK)")
    p.add_argument("--out", default=env("out", "out/run", str), help="output folder (RRP_OUT)")
    p.add_argument("--game-servers", type=int, default=env("game_servers", 2, int), help="local game servers")
    p.add_argument("--population", type=int, default=env("population", 24, int), help="GA population")
    p.add_argument("--generations", type=int, default=env("generations", 10, int), help="GA generations")
    p.add_argument("--seed", type=int, default=env("seed", 0, int), help="seed of the whole run")
    p.add_argument("--episodes", type=int, default=env("episodes", 36, int), help="recording episodes")
    p.add_argument("--epochs", type=int, default=env("epochs", 12, int), help="vision model training epochs")
    p.set_defaults(func=cmd_run)
    _add_data_commands(sub)

    p = sub.add_parser("train", help="train the vision autopilot on recorded or generated frames")
    _add_vision_data_flags(p)
    _add_vision_train_flags(p)
    p.add_argument("--out", default=env("out", "out/vision/model", str), help="folder for weights, TorchScript, card")
    p.add_argument(
        "--learning-curves", action="store_true", help="instead: sweep training frames x resolution (64x48, 128x96)"
    )
    p.add_argument("--curve-sizes", default="1500,5000,15000", help="training-set sizes of the learning curves")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="let the vision model drive on game servers, from frames only")
    _add_vision_eval_flags(p)
    p.add_argument("--out", default=env("out", "out/vision/eval", str), help="folder for JSON, Markdown, maps")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("dagger", help="DAgger: the model drives, the evolved driver labels, the model retrains")
    _add_vision_data_flags(p)
    _add_vision_train_flags(p)
    _add_vision_eval_flags(p)
    p.add_argument("--iterations", type=int, default=3, help="DAgger iterations")
    p.add_argument("--epochs-per-iteration", type=int, default=4, help="retraining epochs per iteration")
    p.add_argument(
        "--dagger-tracks", default="kidney,oval,alpine,gen-1,gen-2,gen-3", help="tracks the model drives to collect"
    )
    p.add_argument("--collector", default=env("collector", None, str), help="collector host:port (RRP_COLLECTOR)")
    p.add_argument("--out", default=env("out", "out/vision/dagger", str), help="output folder")
    p.set_defaults(func=cmd_dagger)
    return parser


def _user_error(exc: BaseException) -> str | None:
    """The message of an error the user can act on (bad input, a missing file, a server that is down);
    None for anything else, which is a bug and keeps its traceback."""
    import grpc

    from plumbing.errors import DomainError
    from scheduler.tasks import EvaluationError

    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, (ValueError, OSError, DomainError, EvaluationError)):
        return str(exc) or type(exc).__name__
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        result: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        message = _user_error(exc)
        if message is None or logging.getLogger().isEnabledFor(logging.DEBUG):
            raise
        command = " ".join(a for a in (args.command, getattr(args, "data_command", None)) if a)
        print(f"rrp {command}: error: {message} (--log-level DEBUG shows where)", file=sys.stderr)
        return 1
    return result


if __name__ == "__main__":
    raise SystemExit(main())
