"""The main job (`rrp run`): start local services, evolve a driver, race it over gRPC, write the report."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from collector.store import RedisConfig
from game_server.client import GameClient, frame_array, watch_observation
from game_server.core.drivers import RayDriver
from game_server.core.lap import LapWatch
from game_server.core.state import TICK_HZ
from game_server.core.track import Track
from game_server.core.tracks import (
    BUILTIN_TRACKS,
    EVOLVE_TRACKS,
    SUITE_TECH_TRACKS,
    SUITE_UNSEEN_TRACKS,
    TRAINING_TRACKS,
    load_track,
)
from game_server.leaderboard import Leaderboard, LeaderboardConfig, leaderboard_markdown
from game_server.trackmap import plot_laps, save_frame_strip
from pipeline.collect import PINNED_SHARE, CollectConfig, run_collect
from pipeline.deploy_job import DeployJobConfig
from pipeline.evaluate import RUNTIMES
from pipeline.evolve import EvolveJobConfig, EvolveOutcome, run_evolve_job
from pipeline.pools import PoolSpec, local_game_servers, service
from pipeline.record_task import RecordSettings
from pipeline.serving_job import ServingJobConfig, run_serving_job
from pipeline.videos import suite_lap_videos, videos_markdown
from plumbing.redis_local import LocalRedis
from plumbing.settings import nested, setting
from rallyrobopilot.v1 import sim_pb2
from serving.registry import content_id
from trainer.data.redis_source import RedisRuns
from trainer.data.validate import DataRequirements, validate_source
from trainer.evolve import KIND_DRIVER, EvolveConfig
from trainer.vision.model import VisionConfig

if TYPE_CHECKING:
    from trainer.vision.data import FrameSet

log = logging.getLogger(__name__)

MAX_LAP_TICKS = 5_000


@dataclass(frozen=True)
class MainJobConfig:
    """The main job's embedded defaults; every one can be changed from `rrp run`'s flags."""

    track: str = setting("kidney", "training track: the GA's main track, raced over gRPC and by the model")
    extra_tracks: tuple[str, ...] = setting(
        tuple(t for t in EVOLVE_TRACKS if t != "kidney"), "more tracks the evolved driver is scored on"
    )
    out_dir: Path = setting(Path("out/run"), "output folder", flag="out", env="out")
    game_servers: int = setting(2, "local game servers")
    population: int = setting(24, "GA population")
    generations: int = setting(10, "GA generations")
    seed: int = setting(0, "seed of the whole run")
    frames: int = setting(12, "camera frames shown in the report's strip")
    # Data collection: recording episodes of the evolved driver, perturbed and randomised.
    collect_tracks: tuple[str, ...] = setting(TRAINING_TRACKS, "tracks the evolved driver is recorded on")
    episodes: int = setting(36, "recording episodes")
    recovery_share: float = setting(1.0, "share of later episodes that start drifting or pinned (recoveries)")
    pinned_share: float = setting(PINNED_SHARE, "share of those that start at rest pinned against a wall")
    wrong_way_episodes: int = setting(72, "more episodes starting facing the wrong way, the teacher turning round")
    # Inside the recovering teacher: a perturbed evolved driver stuck at an alpine wall for 2,800 ticks, pressing on,
    # taught the model to press into walls, and it failed both alpine wrong-way starts (6/8); the teacher backs
    # out and laps (8/8, docs/vision.md).
    record: RecordSettings = nested(lambda: RecordSettings(recovering=True))
    # The vision model: its training epochs, and the closed-loop evaluation suite it is raced on.
    epochs: int = setting(12, "vision model training epochs at most")
    model: VisionConfig = nested(VisionConfig, prefix="model_")
    suite_tracks: tuple[str, ...] = setting(
        (*BUILTIN_TRACKS, *SUITE_UNSEEN_TRACKS, *SUITE_TECH_TRACKS),
        "evaluation suite: the built-in tracks, 20 smooth and 20 technical ones never trained on",
    )
    suite_recovery: bool = setting(True, "the suite also starts the model pinned and facing the wrong way")
    # onnx: the served archive's runtime, ~3x cheaper a frame than eager PyTorch in the suite's own process.
    suite_runtime: str = setting(
        "onnx", "what runs the model in the suite: eager, torchscript or onnx (model/model.onnx)", choices=RUNTIMES
    )
    # Serving: the trained model packaged, served by a private TorchServe and raced in real time.
    serving: ServingJobConfig = nested(ServingJobConfig, prefix="serving_")
    # Deployment: a second model (one DAgger iteration) rolled out through gate and canary while cars race.
    deployment: DeployJobConfig = nested(DeployJobConfig, prefix="deploy_")

    def __post_init__(self) -> None:
        # Checked before any service starts, not minutes later at the collection step.
        for name in ("recovery_share", "pinned_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a share: between 0 and 1, got {getattr(self, name)}")
        if self.wrong_way_episodes < 0:
            raise ValueError(f"wrong_way_episodes must be 0 or more, got {self.wrong_way_episodes}")


@dataclass
class Report:
    """What the run found, written as summary.json and report.md."""

    sections: list[tuple[str, str]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def add(self, title: str, markdown: str) -> None:
        self.sections.append((title, markdown))

    def write(self, out_dir: Path) -> None:
        (out_dir / "summary.json").write_text(json.dumps(self.figures, indent=2) + "\n")
        body = ["# RallyRoboPilot run report", ""]
        for title, text in self.sections:
            body += [f"## {title}", "", text.strip(), ""]
        (out_dir / "report.md").write_text("\n".join(body))


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_main_job(config: MainJobConfig) -> int:
    # SIGTERM unwinds like Ctrl-C, so every service this job started (Redis, collector, game servers,
    # TorchServe, Prometheus) is stopped on the way out rather than left running.
    signal.signal(signal.SIGTERM, _interrupt)
    out = config.out_dir
    out.mkdir(parents=True, exist_ok=True)
    report = Report()
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(LocalRedis(out / "redis"))
        collector = stack.enter_context(service(["collector", "--port", "0"], {"RRP_REDIS_URL": redis.url}))
        servers = stack.enter_context(local_game_servers(config.game_servers))
        addresses = tuple(s.address for s in servers)
        log.info("redis %s (data in %s), collector %s, %d game servers: %s", redis.url, out / "redis",
                 collector.address, len(servers), ", ".join(addresses))  # fmt: skip
        evolved = _evolve(config, addresses, out / "evolve", report)
        with GameClient(addresses[0]) as client:
            finished = _race(client, config, load_track(config.track), evolved.best.ray_driver(), evolved, report)
        _collect(config, addresses, collector.address, evolved, report)
        # Validation and reading both walk every frame in Redis, each mostly on one core: side by side.
        with ThreadPoolExecutor(1, thread_name_prefix="validate") as validation:
            validated = validation.submit(_validate, config, redis.url, report)
            frames = _read_frames(config, redis.url)
            data_ok = validated.result()
        model_path, trained = _train(config, redis.url, frames, report)
        board = Leaderboard.connect(LeaderboardConfig(RedisConfig(url=redis.url)))
        targets_met = _evaluate(config, model_path, addresses, evolved, report, board)
        _serve(config, model_path.parent, addresses, report, redis.url)
        if config.deployment.enabled:
            _deploy(config, model_path.parent, trained, addresses, evolved, report, redis.url)
        _leaderboard(config, board, report)
    report.figures["wall_time_s"] = round(time.monotonic() - t0, 1)
    report.write(out)
    log.info("report: %s (%s s)", out / "report.md", report.figures["wall_time_s"])
    log.info("targets met: %s", targets_met)
    return 0 if finished and data_ok else 1


def _serve(
    config: MainJobConfig, model_dir: Path, addresses: tuple[str, ...], report: Report, leaderboard: str
) -> None:
    """Packages the model, serves it with TorchServe and races the training track through it in real time."""
    serving = dataclasses.replace(config.serving, track=config.track)
    figures = run_serving_job(model_dir, addresses, config.out_dir / "serving", serving, leaderboard)
    # serving.md sits beside its plot; report.md is one directory up.
    report.add(
        "Serving: TorchServe, real time", figures.pop("markdown").replace("](latency.png)", "](serving/latency.png)")
    )
    report.figures["serving"] = figures


def _deploy(
    config: MainJobConfig, model_dir: Path, trained: dict[str, Any], addresses: tuple[str, ...],
    evolved: EvolveOutcome, report: Report, leaderboard: str,
) -> None:  # fmt: skip
    """A second model, trained and rolled out through the gate and the canary while cars race; the gate's finished
    laps go to the run's leaderboard."""
    from pipeline.deploy_job import run_deploy_job, train_second_model

    out = config.out_dir / "deployment"
    second = train_second_model(
        model_dir / "model.safetensors", trained["frames"], trained["train_config"], trained["data"],
        evolved.driver_path, addresses, out / "model-2", config.deployment.dagger_epochs,
        config.deployment.replay_share,
    )  # fmt: skip
    figures = run_deploy_job(model_dir, second, addresses, config.track, out, config.deployment, leaderboard)
    log.info("deployment of the second model: %s (%s)", figures["decision"], figures["reason"])
    report.add("Deployment: a second model through gate and canary", figures.pop("markdown"))
    report.figures["deployment"] = figures


def _read_frames(config: MainJobConfig, redis_url: str) -> FrameSet:
    from trainer.vision.train import DataConfig, load_frames

    size = (config.model.width, config.model.height)
    return load_frames(DataConfig(redis_url=redis_url, seed=config.seed), size, progress=False)


def _train(config: MainJobConfig, redis_url: str, frames: FrameSet, report: Report) -> tuple[Path, dict[str, Any]]:
    from trainer.vision.train import DataConfig, TrainConfig, save_training_run, train

    out = config.out_dir / "model"
    data = DataConfig(redis_url=redis_url, seed=config.seed)
    # The whole one-cycle schedule, keeping the best epoch: at peak learning rate mid-schedule, validation
    # accuracy on recovery episodes swings by several points, and early stopping there kept an epoch-2 model.
    train_config = TrainConfig(
        vision=config.model, epochs=config.epochs, patience=config.epochs, seed=config.seed, progress=False
    )
    size = (train_config.vision.width, train_config.vision.height)
    log.info("training the vision model on %d frames from Redis", len(frames.labels))
    result = train(train_config, frames)
    card = save_training_run(result, train_config, data, frames, out)
    m = card["metrics"]
    report.figures["train"] = {
        "frames": len(frames.labels),
        "best_epoch": result.best_epoch,
        "seconds": round(result.seconds, 1),
        "val_throttle_acc": m["throttle_acc"],
        "val_steer_acc": m["steer_acc"],
        "val_exact_acc": m["exact_acc"],
    }
    log.info(
        "trained in %.0f s: validation throttle %.3f, steering %.3f, exact keys %.3f; model card %s",
        result.seconds, m["throttle_acc"], m["steer_acc"], m["exact_acc"], out / "model_card.md",
    )  # fmt: skip
    report.add(
        "Vision model",
        f"A CNN from the {size[0]}x{size[1]} camera frame (and the speed, as a dashboard shows it) to the keys, "
        f"trained on the {len(frames.labels)} collected frames read from Redis, split by run (best epoch "
        f"{result.best_epoch}, {result.seconds:.0f} s on this CPU). Validation accuracy: throttle "
        f"{m['throttle_acc']:.3f}, steering {m['steer_acc']:.3f}, exact keys {m['exact_acc']:.3f}. Weights "
        "(safetensors), TorchScript export and [model card](model/model_card.md) in `model/`.\n\n"
        "![training](model/training_curve.png)",
    )
    return out / "model.safetensors", {"frames": frames, "train_config": train_config, "data": data}


def _leaderboard(config: MainJobConfig, board: Leaderboard, report: Report) -> None:
    """The verified laps this run put on its leaderboard (kept in its Redis, so they outlive the run)."""
    tracks = [config.track, *(t for t in BUILTIN_TRACKS if t != config.track)]
    tracks += [t for t in board.tracks() if t not in tracks]
    report.figures["leaderboard"] = {
        t: [dataclasses.asdict(e) for e in board.top(t, 3)] for t in tracks if board.top(t, 1)
    }
    report.add(
        "Leaderboard: verified laps",
        "Every lap the evaluation suite, the rollout's gate and the racing cars finished, replayed from its keys and "
        "verified before it was stored "
        "(`rrp leaderboard --redis URL`, `docs/leaderboard.md`); the best three per track:\n\n"
        + leaderboard_markdown(board, [t for t in tracks if board.top(t, 1)], n=3),
    )


def _evaluate(
    config: MainJobConfig,
    model_path: Path,
    addresses: tuple[str, ...],
    evolved: EvolveOutcome,
    report: Report,
    board: Leaderboard | None = None,
) -> bool:
    """The evaluation suite: every suite track with plain and randomised frames, and the recovery starts."""
    from pipeline.evaluate import EvalConfig, load_pilot
    from pipeline.suite import ConditionSummary, recovery_markdown, run_suite, suite_json, summary_table
    from trainer.vision.export import ONNX_FILE

    pilot = load_pilot(model_path, config.suite_runtime, onnx_path=model_path.parent / ONNX_FILE)
    eval_config = EvalConfig(driver_path=evolved.driver_path, pool=PoolSpec(servers=addresses))
    suite = run_suite(pilot, eval_config, config.suite_tracks, config.out_dir / "evaluation",
                      recovery=config.suite_recovery, board=board, model_version=content_id(model_path),
                      data_source=f"main job, seed {config.seed}")  # fmt: skip
    # The model version's evaluation, as the registry records it when the model is served.
    (model_path.parent / "evaluation.json").write_text(suite_json(suite))
    plain, randomised = suite.summary["plain"], suite.summary["randomised"]
    train_row = suite.row(config.track, "plain") or {}
    train_lap = train_row["lap_ticks"] if train_row.get("finished") else None
    ga_best = evolved.best.lap_ticks
    ratio = train_lap / ga_best if train_lap and ga_best else None
    # Issue 14's targets: every built-in and all but one held-out track in both conditions, and the median
    # lap no slower than the evolved driver's.
    misses_allowed = 1 if plain.unseen_tracks >= 20 else 0
    completed = all(
        s.builtin_completed == s.builtin_tracks and s.unseen_completed >= s.unseen_tracks - misses_allowed
        for s in (plain, randomised)
    )
    medians = [s.median_vs_driver for s in (plain, randomised) if s.median_vs_driver is not None]
    met = completed and bool(medians) and max(medians) <= 1.00
    # Issue 22's targets on the technical held-out family: at least 18 of 20 in both conditions, and a median lap at
    # most 0.97x the evolved driver's.
    technical_medians = [s.technical_median_vs_driver for s in (plain, randomised)]
    technical_met = (
        plain.technical_tracks > 0
        and all(s.technical_completed >= s.technical_tracks - 2 for s in (plain, randomised))
        and all(m is not None and m <= 0.97 for m in technical_medians)
    )
    found = suite.to_json()
    report.figures["evaluation"] = {
        "training_track_lap_ticks": train_lap,
        "ga_best_lap_ticks": ga_best,
        "ratio_to_ga_best": round(ratio, 3) if ratio else None,
        "suite": found["summary"],
        "recovery": found["recovery_summary"],
        "targets_met": met,
        "technical_targets_met": technical_met,
    }
    if ratio:
        ratio_text = f"{ratio:.3f}x the GA's best lap"
    elif train_lap:
        ratio_text = f"a lap of {train_lap} ticks, but the GA found no finishing lap to compare it with"
    else:
        ratio_text = "no lap"

    def counts(s: ConditionSummary) -> str:
        return (
            f"{s.builtin_completed}/{s.builtin_tracks} built-in, {s.unseen_completed}/{s.unseen_tracks} "
            f"held-out, {s.technical_completed}/{s.technical_tracks} technical, median {s.median_vs_driver or '-'}x "
            "the evolved driver"
        )

    freed = ", ".join(f"{k} {v.model_finished}/{v.starts}" for k, v in suite.recovery_summary.items() if v.starts)
    log.info(
        "vision autopilot: %s %s; suite plain %s; randomised %s; recovery starts finished: %s",
        config.track, ratio_text, counts(plain), counts(randomised), freed or "none run",
    )  # fmt: skip
    report.add(
        "The vision autopilot races: the evaluation suite",
        f"The model drives from frames alone, in lockstep on the game servers (drives spread over the pool by the "
        f"scheduler), on {len(config.suite_tracks)} tracks with plain and domain-randomised frames: the built-in "
        f"tracks and held-out generated tracks never used in training. On {config.track}, {ratio_text}. Targets "
        f"(issue 14): every built-in and at least 19 of 20 held-out tracks in both conditions, median lap at most "
        f"1.00x the evolved driver's: {'met' if met else 'NOT met'}. On the technical held-out tracks (issue 22): at "
        f"least 18 of 20 in both conditions, median at most 0.97x the evolved driver's: "
        f"{'met' if technical_met else 'NOT met'}.\n\n{summary_table(suite)}\n"
        f"{recovery_markdown(suite)}\n"
        "Every track and condition: [evaluation/suite.md](evaluation/suite.md).\n\n"
        "![suite](evaluation/suite_grid.png)\n\n"
        + ("![recovery](evaluation/recovery_grid.png)\n" if suite.recovery else ""),
    )
    videos = suite_lap_videos(suite, config.out_dir / "evaluation" / "videos")
    if videos:
        report.add(
            "The model's laps on video",
            "Replayed from the keys the model chose in the suite (plain frames), filmed by the game's own renderer "
            "from a chase camera:\n\n" + videos_markdown(videos, config.out_dir),
        )
    report.figures["videos"] = [str(v.path.relative_to(config.out_dir)) for v in videos]
    return met


def _collect(
    config: MainJobConfig, addresses: tuple[str, ...], collector: str, evolved: EvolveOutcome, report: Report
) -> None:
    collect_config = CollectConfig(
        episodes=config.episodes,
        driver_paths=(evolved.driver_path,),
        tracks=config.collect_tracks,
        out_dir=config.out_dir / "collect",
        seed=config.seed,
        settings=config.record,
        pool=PoolSpec(servers=addresses),
        collector=collector,
        recovery_share=config.recovery_share,
        pinned_share=config.pinned_share,
        wrong_way_episodes=config.wrong_way_episodes,
    )
    summary = run_collect(collect_config)
    log.info("collected %s", summary.describe())
    report.figures["collect"] = {
        "runs": summary.runs,
        "failed": summary.failed,
        "frames": summary.frames,
        "laps_finished": summary.laps_finished,
        "frames_per_s": summary.frames_per_s,
        "perturbed_ticks": summary.perturbed_ticks,
    }
    teacher = ", the driver racing inside the recovering teacher" if config.record.recovering else ""
    report.add(
        "Data collection",
        f"{summary.runs} recording episodes of the evolved driver on {', '.join(config.collect_tracks)}, spread "
        f"over {len(addresses)} game servers by the scheduler, each streaming its frames (128x96 PNG, domain "
        f"randomisation on) to the collector from inside its simulation loop; the applied controls were "
        f"perturbed on {summary.perturbed_ticks} ticks (probability {config.record.perturb_probability} per tick) "
        f"while the driver's intended keys were recorded as labels{teacher}. After each track's first lap, "
        f"episodes start drifting (off the centre line, misaligned, at speed) "
        f"or pinned against a wall; short ones start facing the wrong way, the driver racing inside the recovering "
        f"teacher, which turns round ({summary.recovery_starts or 'none'}). "
        f"{summary.frames} frames in {summary.seconds:.1f} s "
        f"({summary.frames_per_s:.0f} frames/s); {summary.laps_finished} laps finished; {summary.failed} failed.",
    )


def _validate(config: MainJobConfig, redis_url: str, report: Report) -> bool:
    out = config.out_dir / "validation"
    result = validate_source(RedisRuns(redis_url), DataRequirements(), out_dir=out)
    report.figures["validation"] = {"passed": result.passed, "failures": list(result.failures)}
    verdict = "passed" if result.passed else "FAILED: " + "; ".join(result.failures)
    log.info("data validation %s (report in %s)", verdict, out / "validation.md")
    report.add(
        "Data validation",
        f"Validation {verdict}. Full report: [validation/validation.md](validation/validation.md).\n\n"
        "![labels](validation/label_balance.png)\n\n![coverage](validation/coverage.png)\n\n"
        "![samples](validation/samples.png)",
    )
    return result.passed


def _evolve(config: MainJobConfig, addresses: tuple[str, ...], out: Path, report: Report) -> EvolveOutcome:
    evolve_config = EvolveConfig(
        track=config.track,
        kind=KIND_DRIVER,
        population=config.population,
        generations=config.generations,
        seed=config.seed,
        extra_tracks=config.extra_tracks,
    )
    outcome = run_evolve_job(EvolveJobConfig(evolve=evolve_config, pool=PoolSpec(servers=addresses), out_dir=out))
    best, base = outcome.best.lap_ticks, outcome.baseline_lap_ticks
    report.figures["evolve"] = {
        "tracks": list(evolve_config.tracks),
        "best_lap_ticks": best,
        "baseline_lap_ticks": base,
        "driver_id": outcome.best.driver_id,
        "driver_file": str(outcome.driver_path),
    }
    best_text = f"{best} ticks = {best / TICK_HZ:.2f} s" if best else "no finishing lap within the budget"
    report.add(
        "Genetic algorithm",
        f"A closed-loop ray driver evolved with DEAP over {', '.join(evolve_config.tracks)} "
        f"(population {config.population}, {config.generations} generations, evaluated on {len(addresses)} "
        f"game servers through the scheduler's pool).\n\n"
        f"| | lap on {config.track} |\n| --- | --- |\n"
        f"| GA best (driver `{outcome.best.driver_id}`) | {best_text} |\n"
        f"| baseline: pure pursuit on the racing line | {base} ticks = {base / TICK_HZ:.2f} s |\n\n"
        "![fitness](evolve/fitness.png)\n\n![best lap](evolve/best_lap.png)",
    )
    return outcome


def _race(
    client: GameClient, config: MainJobConfig, track: Track, driver: RayDriver, evolved: EvolveOutcome, report: Report
) -> bool:
    """Drives the evolved driver over the Drive stream from the observations alone (rays and speed)."""
    masks = bytearray()
    states: list[sim_pb2.SimState] = []
    watch = LapWatch(MAX_LAP_TICKS)

    def policy(obs: sim_pb2.Observation) -> int | None:
        if watch_observation(watch, obs):
            return None
        mask = driver.act_on(list(obs.rays_m), obs.state.car.speed_m_per_s)
        masks.append(mask)
        return mask

    with client.session(config.track, sim_pb2.FrameOptions(width_px=128, height_px=96)) as created:
        t_drive = time.monotonic()
        for response in client.drive_lockstep(created.session_id, policy, created.observation):
            states.append(response.observation.state)
        drive_s = time.monotonic() - t_drive
        lap = watch.stop()
        log.info(
            "evolved driver on %s over the Drive stream: %s, %d wall-contact ticks, %.1f s",
            config.track, f"lap {lap.lap_ticks} ticks = {lap.lap_s:.2f} s" if lap.finished else "did not finish",
            lap.wall_contacts, drive_s,
        )  # fmt: skip
        evaluated = client.evaluate(config.track, bytes(masks), return_trajectory=True)
        identical = evaluated.result.final_state == states[-1] and list(evaluated.trajectory.x_m) == [
            s.car.x_m for s in states
        ]
        log.info("server-side Evaluate of the same controls: bit-identical trajectory: %s", identical)
        frames, captions = _frame_strip(client, created.session_id, masks, config.frames)

    out = config.out_dir
    x = np.array([s.car.x_m for s in states])
    y = np.array([s.car.y_m for s in states])
    v = np.array([s.car.speed_m_per_s for s in states])
    title = f"{config.track}: evolved driver " + (f"{lap.lap_s:.2f} s" if lap.finished else "(no finish)")
    plot_laps(track, [("evolved driver", x, y, v)], out / "lap.png", title)
    save_frame_strip(frames, captions, out / "frames.png")
    report.figures["race"] = {
        "track": config.track,
        **lap.summary(),
        "evaluate_identical": identical,
        "top_speed_m_per_s": float(v.max()),
    }
    report.add(
        "The evolved driver's lap over gRPC",
        "Driven tick by tick over the lockstep `Drive` stream from the observations' rays and speed: "
        + (f"**{lap.lap_ticks} ticks = {lap.lap_s:.2f} s**" if lap.finished else f"**no finish** ({lap.stop_reason})")
        + f", {lap.wall_contacts} wall-contact ticks; the server-side `Evaluate` of the same controls "
        f"gives a bit-identical trajectory: {identical}.\n\n![lap](lap.png)\n\n![frames](frames.png)",
    )
    return lap.finished


def _frame_strip(
    client: GameClient, session_id: str, masks: bytearray, count: int
) -> tuple[list[np.ndarray], list[str]]:
    """The lap replayed from the start in `count` steps, a camera frame at the end of each."""
    client.reset(session_id)
    cuts = np.linspace(0, len(masks), max(1, count) + 1).astype(int)[1:]
    frames, captions, prev = [], [], 0
    for cut in cuts:
        if cut <= prev:
            continue
        obs = client.step(session_id, bytes(masks[prev:cut]), with_frame=True)
        frames.append(frame_array(obs.frame))
        captions.append(f"t={obs.state.tick / TICK_HZ:.1f}s v={obs.state.car.speed_m_per_s:.0f}")
        prev = cut
    return frames, captions
