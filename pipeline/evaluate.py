"""Closed-loop evaluation: the vision model drives from frames alone on game servers, compared with the drivers.

A drive is a lap by the core's stop rules (`game_server.core.lap`); the suite over many tracks and conditions
is `pipeline.suite`, and the `rrp evaluate` job `pipeline.evaluate_job`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from game_server import convert
from game_server.client import GameClient, frame_array
from game_server.core import drivers, episode, physics
from game_server.core.driver_file import load_driver
from game_server.core.lap import LapOutcome, LapWatch, WithOutcome
from game_server.core.pilot import drive_lap
from game_server.core.recovery import RecoveringDriver
from game_server.core.state import TICK_HZ, SimState
from game_server.core.tracks import UNSEEN_TRACKS, load_track
from game_server.render.renderer import FrameSpec, shared_renderer
from game_server.trackmap import plot_laps
from pipeline.pools import PoolSpec, open_pool
from plumbing.channels import ClientTLS
from plumbing.errors import InvalidArgument
from plumbing.settings import nested, setting
from rallyrobopilot.v1 import sim_pb2
from scheduler.executor import EvaluationPool
from trainer.vision.data import expert_label
from trainer.vision.pilot import VisionPilot

log = logging.getLogger(__name__)

# Who labels the states a model visits (DAgger): the evolved driver on its rays and speed, or the recovering
# teacher on the state (it gets out of walls; its decision is a function of the state alone).
Expert = drivers.RayDriver | RecoveringDriver


@dataclass
class DriveRecord(WithOutcome):
    """One closed-loop run: its outcome, the driven line, and (with an expert) the frames it labelled."""

    track: str
    outcome: LapOutcome = field(default_factory=LapOutcome)
    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)
    speed: list[float] = field(default_factory=list)
    frames: list[np.ndarray] = field(default_factory=list)
    expert_labels: list[int] = field(default_factory=list)
    applied: list[int] = field(default_factory=list)  # the keys chosen each tick, in tick order
    observations: list[sim_pb2.Observation] = field(default_factory=list)  # kept frames' states, frame cleared
    final_state: sim_pb2.SimState | None = None  # the last observed state (on a server): a lap record's claim

    def summary(self) -> dict[str, Any]:
        return dict(self.outcome.summary())


class _Episode:
    """The per-tick bookkeeping shared by driving on a server and in process: records, stops, asks the pilot."""

    def __init__(
        self, track: str, pilot: VisionPilot, max_ticks: int, expert: Expert | None, keep_frames: bool
    ) -> None:
        self.record = DriveRecord(track)
        self.watch = LapWatch(max_ticks)
        self.pilot, self.expert, self.keep_frames = pilot, expert, keep_frames

    def observe(
        self,
        tick: int,
        frame: np.ndarray,
        speed: float,
        xy: tuple[float, float],
        progress: float,
        lap: tuple[bool, int, int],
        rays: Sequence[float],
        state: Callable[[], SimState] | None = None,
    ) -> int | None:
        r = self.record
        finished, finish_tick, contacts = lap
        done = self.watch.observe(tick, progress, contacts, finished, finish_tick)
        r.outcome = self.watch.outcome
        if tick > 0:
            r.x.append(xy[0])
            r.y.append(xy[1])
            r.speed.append(speed)
        if done:
            return None
        mask = self.pilot.act(frame, speed)
        if isinstance(self.expert, RecoveringDriver):
            assert state is not None, "the recovering teacher labels from the state"
            r.expert_labels.append(self.expert.act(state()))
        elif self.expert is not None:
            r.expert_labels.append(expert_label(self.expert, rays, speed))
        r.applied.append(mask)
        if self.keep_frames:
            r.frames.append(frame.copy())
        return mask


def frame_options(pilot: VisionPilot, randomize: bool, seed: int) -> sim_pb2.FrameOptions:
    return sim_pb2.FrameOptions(
        width_px=pilot.width, height_px=pilot.height, domain_randomization=randomize, randomization_seed=seed
    )


def drive_on_server(
    address: str,
    track: str,
    pilot: VisionPilot,
    max_ticks: int,
    *,
    randomize: bool = False,
    seed: int = 0,
    expert: Expert | None = None,
    keep_frames: bool = False,
    start: SimState | None = None,
    tls: ClientTLS | None = None,
) -> DriveRecord:
    """Drives one lap in lockstep over gRPC (TLS when `tls` has a CA: the pool's `client_tls`) from frames only;
    `expert` labels each visited state from its rays.

    `start` places the car by Reset (pinned against a wall, facing the wrong way, ...); the lap then ends at
    the finish line."""
    episode = _Episode(track, pilot, max_ticks, expert, keep_frames)

    def policy(obs: sim_pb2.Observation) -> int | None:
        s = obs.state
        episode.record.final_state = s
        mask = episode.observe(
            s.tick,
            frame_array(obs.frame),
            s.car.speed_m_per_s,
            (s.car.x_m, s.car.y_m),
            obs.progress_fraction,
            (s.lap.finished, obs.lap_ticks, s.lap.wall_contacts),
            obs.rays_m,
            lambda: convert.state_from_pb(s),
        )
        if keep_frames and mask is not None:
            kept = sim_pb2.Observation()
            kept.CopyFrom(obs)
            kept.ClearField("frame")
            episode.record.observations.append(kept)
        return mask

    with (
        GameClient(address, tls=tls) as client,
        client.session(track, frame_options(pilot, randomize, seed)) as created,
    ):
        placed = convert.state_to_pb(start) if start is not None else None
        first = client.reset(created.session_id, placed, with_frame=True)
        for _ in client.drive_lockstep(created.session_id, policy, first, with_frames=True):
            pass
    return episode.record


def drive_in_process(
    track_name: str,
    pilot: VisionPilot,
    max_ticks: int,
    *,
    randomize: bool = False,
    seed: int = 0,
    expert: Expert | None = None,
) -> DriveRecord:
    """The same drive with the simulation and renderer in this process: for learning curves, where many short
    evaluations matter more than the network hop (the server path renders the same frames)."""
    track = load_track(track_name)
    bookkeeping = _Episode(track_name, pilot, max_ticks, expert, keep_frames=False)
    renderer = shared_renderer()
    spec = FrameSpec(pilot.width, pilot.height, randomize, seed)

    def observe(state: SimState) -> int | None:
        lap = state.lap
        return bookkeeping.observe(
            state.tick,
            renderer.render(track, state, spec),
            state.car.speed,
            (state.car.x, state.car.y),
            physics.progress_fraction(track, lap),
            (lap.finished, lap.finish_tick, lap.wall_contacts),
            physics.raycast(track, state.car, lap.segment) if expert else (),
            lambda: state,
        )

    class FramePilot(episode.Policy):
        needs_rays = False

        def act(self, index: int, state: SimState, rays: Sequence[float]) -> int:
            mask = observe(state)
            if mask is None:
                raise episode.Stop
            return mask

    run = episode.run_episode(track, track.base_state, FramePilot(), max_ticks=max_ticks + 1)
    if run.result.final_state.lap.finished:
        observe(run.result.final_state)  # the finish: its line and time
    return bookkeeping.record


@dataclass(frozen=True)
class EvalConfig:
    """What to drive, where, and what to compare against."""

    training_tracks: tuple[str, ...] = setting(("kidney",), "training track(s) to drive on", flag="eval-tracks")
    unseen_tracks: tuple[str, ...] = setting(UNSEEN_TRACKS, "tracks never used in training", flag="unseen")
    # The evolved driver: its lap on each track, and the GA's best lap.
    driver_path: Path | None = setting(None, "evolved driver file (best_driver.json) to compare with", flag="driver")
    pool: PoolSpec = nested(PoolSpec)
    budget_factor: float = setting(2.0, "tick budget as a multiple of the reference driver's lap")
    randomize: bool = setting(False, "domain-randomised frames while driving", flag="randomize-frames")
    seed: int = setting(0, "seed of that randomisation", flag="frame-seed", env="frame_seed")
    timeout_s: float = setting(600.0, "seconds one drive may take")


def baselines(track_name: str, driver: drivers.RayDriver | None, max_ticks: int) -> dict[str, Any]:
    """The reference (pure pursuit) and evolved-driver laps on a track, simulated in process."""
    track = load_track(track_name)
    _, ref = drive_lap(track)
    out: dict[str, Any] = {"reference_lap_ticks": ref.lap_ticks}
    if driver is not None:
        run = drivers.run_driver(track, track.base_state, driver, max_ticks=max_ticks, record_trajectory=True)
        out["driver_lap_ticks"] = run.lap_ticks
        out["driver_finished"] = run.finished
        out["_driver_trajectory"] = run.trajectory
    return out


def lap_ratios(lap_ticks: int | None, base: dict[str, Any], ga_best_ticks: int | None) -> dict[str, float]:
    """The vision lap over each baseline that has a lap of its own; a baseline that never finished
    (a tiny GA budget can end without a finishing lap) has nothing to compare with and is left out."""
    if not lap_ticks:
        return {}
    ratios = {}
    if base.get("reference_lap_ticks"):
        ratios["vs_reference"] = round(lap_ticks / base["reference_lap_ticks"], 3)
    if base.get("driver_finished") and base.get("driver_lap_ticks"):
        ratios["vs_driver"] = round(lap_ticks / base["driver_lap_ticks"], 3)
    if ga_best_ticks:
        ratios["vs_ga_best"] = round(lap_ticks / ga_best_ticks, 3)
    return ratios


def run_evaluation(
    pilot: VisionPilot, config: EvalConfig, out_dir: Path | None = None, pool: EvaluationPool | None = None
) -> dict[str, Any]:
    """Drives every track once over the pool (in parallel), compares, and writes JSON, Markdown and maps."""
    saved = load_driver(config.driver_path) if config.driver_path else None
    driver = saved.ray_driver() if saved is not None and saved.kind != "program" else None
    tracks = [*config.training_tracks, *config.unseen_tracks]
    budgets = {t: int(config.budget_factor * drive_lap(load_track(t))[1].lap_ticks) for t in tracks}
    with contextlib.ExitStack() as stack:
        if pool is None:
            pool, _ = stack.enter_context(open_pool(config.pool))
        futures: dict[str, Future[DriveRecord]] = {
            t: pool.run_with_server(
                functools.partial(
                    drive_on_server,
                    tls=pool.client_tls,
                    track=t,
                    pilot=pilot,
                    max_ticks=budgets[t],
                    randomize=config.randomize,
                    seed=config.seed,
                ),
                timeout_s=config.timeout_s,
            )
            for t in tracks
        }
        records = {t: f.result() for t, f in futures.items()}
    rows = []
    for t in tracks:
        base = baselines(t, driver, budgets[t])
        trajectory = base.pop("_driver_trajectory", None)
        rec = records[t]
        row: dict[str, Any] = {"track": t, "seen_in_training": t in config.training_tracks, **rec.summary(), **base}
        ga_best = saved.lap_ticks if saved is not None and saved.track == t else None
        row.update(lap_ratios(rec.lap_ticks if rec.finished else None, base, ga_best))
        rows.append(row)
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            laps = [(f"vision ({lap_text(rec)})", np.array(rec.x), np.array(rec.y), np.array(rec.speed))]
            if trajectory is not None:
                laps.append(("evolved driver", trajectory.x, trajectory.y, trajectory.speed))
            if len(rec.x) > 1:
                plot_laps(load_track(t), laps, out_dir / f"drive_{t}.png", f"{t}: vision autopilot")
    unseen = [r for r in rows if not r["seen_in_training"]]
    report: dict[str, Any] = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(config).items()},
        "ga_best": {"track": saved.track, "lap_ticks": saved.lap_ticks or None} if saved else None,
        "tracks": rows,
        "unseen_laps_completed": sum(r["finished"] for r in unseen),
        "unseen_tracks": len(unseen),
    }
    if out_dir is not None:
        (out_dir / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")
        (out_dir / "evaluation.md").write_text(markdown_report(report))
    return report


def lap_text(rec: DriveRecord) -> str:
    """A drive's legend in a plot: its lap time, or how far it got."""
    return f"lap {rec.lap_ticks / TICK_HZ:.2f} s" if rec.finished else f"no lap, {rec.progress_fraction:.0%}"


def markdown_report(report: dict[str, Any]) -> str:
    def ticks(n: int | None) -> str:
        return f"{n} ({n / TICK_HZ:.2f} s)" if n else "-"

    lines = [
        "| track | seen | lap | vision lap ticks | progress | wall contacts | evolved driver | reference | "
        "vs driver | vs reference | vs GA best |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["tracks"]:
        lines.append(
            f"| {r['track']} | {'yes' if r['seen_in_training'] else 'no'} | {'yes' if r['finished'] else 'NO'} | "
            f"{ticks(r['lap_ticks'])} | {r['progress_fraction']:.0%} | {r['wall_contacts']} | "
            f"{ticks(r.get('driver_lap_ticks'))} | {ticks(r['reference_lap_ticks'])} | {r.get('vs_driver', '-')} | "
            f"{r.get('vs_reference', '-')} | {r.get('vs_ga_best', '-')} |"
        )
    ga = report["ga_best"]
    head = ""
    if ga:
        lap = ticks(ga["lap_ticks"]) if ga["lap_ticks"] else "none (the GA found no finishing lap)"
        head = f"GA best lap: {lap} on {ga['track']}. "
    return (
        f"# Vision autopilot, closed loop\n\n{head}Unseen tracks completed: "
        f"{report['unseen_laps_completed']} of {report['unseen_tracks']}.\n\n" + "\n".join(lines) + "\n"
    )


RUNTIMES = ("eager", "torchscript", "onnx")


def load_pilot(model_path: Path, runtime: str = "eager", onnx_path: Path | None = None) -> VisionPilot:
    """The trained model as a policy, on one thread: the game servers need the other core.

    `runtime`: eager PyTorch; the TorchScript export beside the weights; or the model exported to ONNX now
    (to `onnx_path`, a temporary file without one) and run by onnxruntime, the served archive's runtime."""
    import torch

    from trainer.vision.train import TORCHSCRIPT, load_model

    if runtime not in RUNTIMES:
        raise InvalidArgument(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    torch.set_num_threads(1)
    model = load_model(model_path)
    c = model.config
    if runtime == "torchscript":
        return VisionPilot(torch.jit.load(str(model_path.with_name(TORCHSCRIPT))), c.width, c.height)
    if runtime == "onnx":
        from trainer.vision.export import ONNX_FILE, OnnxPolicyModel, export_onnx

        if onnx_path is not None:
            return VisionPilot(OnnxPolicyModel(export_onnx(model, onnx_path)), c.width, c.height)
        with tempfile.TemporaryDirectory(prefix="rrp-onnx-") as tmp:  # the session holds the model once loaded
            return VisionPilot(OnnxPolicyModel(export_onnx(model, Path(tmp) / ONNX_FILE)), c.width, c.height)
    return VisionPilot(model, c.width, c.height)
