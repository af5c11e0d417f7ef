"""Closed-loop evaluation: the vision model drives from frames alone on game servers, compared with the drivers."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
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
from game_server.core.pilot import drive_lap
from game_server.core.recovery import RecoveringDriver, RecoveringPolicy, recovery_starts
from game_server.core.state import TICK_HZ, SimState
from game_server.core.tracks import BUILTIN_TRACKS, SUITE_UNSEEN_TRACKS, UNSEEN_TRACKS, load_track
from game_server.render.renderer import FrameSpec, shared_renderer
from game_server.trackmap import plot_lap_grid, plot_laps
from pipeline.pools import PoolSpec, open_pool
from plumbing.settings import nested, setting
from rallyrobopilot.v1 import sim_pb2
from scheduler.executor import EvaluationPool
from trainer.vision.data import expert_label
from trainer.vision.pilot import VisionPilot

log = logging.getLogger(__name__)

# Who labels the states a model visits (DAgger): the evolved driver on its rays and speed, or the recovering
# teacher on the state (it gets out of walls; its decision is a function of the state alone).
Expert = drivers.RayDriver | RecoveringDriver

STUCK_TICKS = 250  # 10 s without new progress: the car is stuck or lost; the run stops there


@dataclass
class DriveRecord:
    """One closed-loop run: outcome, the driven line, and (with an expert) the frames it labelled."""

    track: str
    finished: bool = False
    lap_ticks: int = 0
    ticks: int = 0
    progress_fraction: float = 0.0
    wall_contacts: int = 0
    stop_reason: str = ""
    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)
    speed: list[float] = field(default_factory=list)
    frames: list[np.ndarray] = field(default_factory=list)
    expert_labels: list[int] = field(default_factory=list)
    applied: list[int] = field(default_factory=list)
    observations: list[sim_pb2.Observation] = field(default_factory=list)  # kept frames' states, frame cleared

    def summary(self) -> dict[str, Any]:
        return {
            "finished": self.finished,
            "lap_ticks": self.lap_ticks,
            "lap_s": self.lap_ticks / TICK_HZ,
            "ticks": self.ticks,
            "progress_fraction": round(self.progress_fraction, 4),
            "wall_contacts": self.wall_contacts,
            "stop_reason": self.stop_reason,
        }


class _Episode:
    """The per-tick bookkeeping shared by driving on a server and in process: records, stops, asks the pilot."""

    def __init__(
        self, track: str, pilot: VisionPilot, max_ticks: int, expert: Expert | None, keep_frames: bool
    ) -> None:
        self.record = DriveRecord(track)
        self.pilot, self.max_ticks, self.expert, self.keep_frames = pilot, max_ticks, expert, keep_frames
        self.best_progress, self.best_tick = -1.0, 0

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
        r.ticks, r.progress_fraction, r.wall_contacts, r.finished = tick, progress, contacts, finished
        if tick > 0:
            r.x.append(xy[0])
            r.y.append(xy[1])
            r.speed.append(speed)
        if finished:
            r.lap_ticks, r.stop_reason = finish_tick, "finished"
            return None
        if progress > self.best_progress + 1e-6:
            self.best_progress, self.best_tick = progress, tick
        if tick - self.best_tick >= STUCK_TICKS:
            r.stop_reason = f"no progress for {STUCK_TICKS} ticks"
            return None
        if tick >= self.max_ticks:
            r.stop_reason = f"tick budget {self.max_ticks} spent"
            return None
        mask = self.pilot.act(frame, speed)
        if isinstance(self.expert, RecoveringDriver):
            assert state is not None, "the recovering teacher labels from the state"
            r.expert_labels.append(self.expert.act(state()))
        elif self.expert is not None:
            r.expert_labels.append(expert_label(self.expert, rays, speed))
        if self.keep_frames:
            r.frames.append(frame.copy())
            r.applied.append(mask)
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
) -> DriveRecord:
    """Drives one lap in lockstep over gRPC from frames only; `expert` labels each visited state from its rays.

    `start` places the car by Reset (pinned against a wall, facing the wrong way, ...); the lap then ends at
    the finish line."""
    episode = _Episode(track, pilot, max_ticks, expert, keep_frames)

    def policy(obs: sim_pb2.Observation) -> int | None:
        s = obs.state
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

    with GameClient(address) as client:
        session = client.create_session(track, frame_options(pilot, randomize, seed)).session_id
        try:
            placed = convert.state_to_pb(start) if start is not None else None
            first = client.reset(session, placed, with_frame=True)
            for _ in client.drive_lockstep(session, policy, first, with_frames=True):
                pass
        finally:
            client.close_session(session)
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
            laps = [(f"vision ({_lap_text(rec)})", np.array(rec.x), np.array(rec.y), np.array(rec.speed))]
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


def _lap_text(rec: DriveRecord) -> str:
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


# The suite's two conditions: plain frames, and frames under seeded domain randomisation (light, colours,
# camera jitter), so that a model that only drives the renderer's default look shows up.
SUITE_CONDITIONS: tuple[tuple[str, bool], ...] = (("plain", False), ("randomised", True))


def run_suite(
    pilot: VisionPilot,
    config: EvalConfig,
    tracks: Sequence[str],
    out_dir: Path | None = None,
    pool: EvaluationPool | None = None,
    recovery: bool = True,
) -> dict[str, Any]:
    """Drives every track under every condition (all at once over the pool) and compares each lap with the
    evolved and reference drivers; writes `suite.json`, `suite.md` and `suite_grid.png`.

    With `recovery`, the model also starts pinned against a wall and facing the wrong way at three places on
    each built-in track (plain frames), beside the recovering teacher and the bare evolved driver from the same
    starts (`recovery_grid.png`). The drives are lockstep and seeded: the same model gives the same report.
    """
    saved = load_driver(config.driver_path) if config.driver_path else None
    driver = saved.ray_driver() if saved is not None and saved.kind != "program" else None
    budgets = {t: int(config.budget_factor * drive_lap(load_track(t))[1].lap_ticks) for t in tracks}
    with contextlib.ExitStack() as stack:
        if pool is None:
            pool, _ = stack.enter_context(open_pool(config.pool))
        futures: dict[tuple[str, str], Future[DriveRecord]] = {
            (t, condition): pool.run_with_server(
                functools.partial(
                    drive_on_server, track=t, pilot=pilot, max_ticks=budgets[t], randomize=randomize, seed=config.seed
                ),
                timeout_s=config.timeout_s,
            )
            for t in tracks
            for condition, randomize in SUITE_CONDITIONS
        }
        starts = {
            (t, label): start
            for t in (tracks if recovery else ())
            if t in BUILTIN_TRACKS
            for label, start in recovery_starts(load_track(t))
        }
        pinned_futures = {
            key: pool.run_with_server(
                functools.partial(
                    drive_on_server, track=key[0], pilot=pilot, max_ticks=budgets[key[0]], seed=config.seed, start=start
                ),
                timeout_s=config.timeout_s,
            )
            for key, start in starts.items()
        }
        records = {key: f.result() for key, f in futures.items()}
        pinned = {key: f.result() for key, f in pinned_futures.items()}
    rows = []
    panels = []
    for t in tracks:
        base = baselines(t, driver, budgets[t])
        trajectory = base.pop("_driver_trajectory", None)
        laps = []
        for condition, _ in SUITE_CONDITIONS:
            rec = records[(t, condition)]
            row: dict[str, Any] = {"track": t, "builtin": t in BUILTIN_TRACKS, "condition": condition}
            row.update(rec.summary())
            row.update(base)
            row.update(lap_ratios(rec.lap_ticks if rec.finished else None, base, None))
            rows.append(row)
            laps.append((f"{condition} ({_lap_text(rec)})", np.array(rec.x), np.array(rec.y)))
        if trajectory is not None:
            laps.append(("evolved driver", trajectory.x, trajectory.y))
        panels.append((load_track(t), laps))
    recovery_rows, recovery_panels = _recovery_rows(starts, pinned, driver, budgets)
    report: dict[str, Any] = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(config).items()},
        "tracks": list(tracks),
        "rows": rows,
        "summary": suite_summary(rows),
        "recovery": recovery_rows,
        "recovery_summary": recovery_summary(recovery_rows),
    }
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "suite.json").write_text(json.dumps(report, indent=2) + "\n")
        (out_dir / "suite.md").write_text(suite_markdown(report))
        plot_lap_grid(panels, out_dir / "suite_grid.png", "Evaluation suite: driven lines (plain, randomised)")
        if recovery_panels:
            plot_lap_grid(
                recovery_panels, out_dir / "recovery_grid.png", "From pinned and wrong-way starts: the model's lines",
                columns=3,
            )  # fmt: skip
    return report


def _recovery_rows(
    starts: dict[tuple[str, str], SimState],
    pinned: dict[tuple[str, str], DriveRecord],
    driver: drivers.RayDriver | None,
    budgets: dict[str, int],
) -> tuple[list[dict[str, Any]], list[Any]]:
    """Per recovery start: the model's drive, the recovering teacher's and the bare evolved driver's."""
    rows: list[dict[str, Any]] = []
    lines: dict[str, list[tuple[str, np.ndarray, np.ndarray]]] = {}
    for (t, label), start in starts.items():
        track, rec = load_track(t), pinned[(t, label)]
        row: dict[str, Any] = {"track": t, "start": label, **rec.summary()}
        teacher = RecoveringDriver(track, base=driver.act if driver is not None else None)
        run = episode.run_episode(track, start, RecoveringPolicy(teacher), max_ticks=budgets[t]).result
        row["teacher_finished"], row["teacher_lap_ticks"] = run.finished, run.lap_ticks if run.finished else None
        if driver is not None:
            bare = drivers.run_driver(track, start, driver, max_ticks=budgets[t])
            row["driver_finished"] = bare.finished
        rows.append(row)
        lines.setdefault(t, []).append((f"{label} ({_lap_text(rec)})", np.array(rec.x), np.array(rec.y)))
    panels = [(load_track(t), laps) for t, laps in lines.items()]
    return rows, panels


def recovery_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per start kind: how many of the model's, the teacher's and the bare driver's drives finished."""
    out: dict[str, Any] = {}
    for kind in ("pinned", "wrong-way"):
        mine = [r for r in rows if r["start"].startswith(kind + "@")]
        out[kind] = {
            "starts": len(mine),
            "model_finished": sum(r["finished"] for r in mine),
            "teacher_finished": sum(r["teacher_finished"] for r in mine),
            "driver_finished": sum(r.get("driver_finished", False) for r in mine),
        }
    return out


def suite_summary(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per condition: built-in and held-out laps completed, and the median lap ratios over completed laps."""
    out: dict[str, dict[str, Any]] = {}
    for condition, _ in SUITE_CONDITIONS:
        mine = [r for r in rows if r["condition"] == condition]
        builtin = [r for r in mine if r["builtin"]]
        unseen = [r for r in mine if not r["builtin"]]
        summary: dict[str, Any] = {
            "builtin_completed": sum(r["finished"] for r in builtin),
            "builtin_tracks": len(builtin),
            "unseen_completed": sum(r["finished"] for r in unseen),
            "unseen_tracks": len(unseen),
            "wall_contacts": sum(r["wall_contacts"] for r in mine),
        }
        for key in ("vs_driver", "vs_reference"):
            ratios = [r[key] for r in mine if key in r]
            summary[f"median_{key}"] = round(float(np.median(ratios)), 3) if ratios else None
        out[condition] = summary
    return out


def suite_markdown(report: dict[str, Any]) -> str:
    def ticks(n: int | None) -> str:
        return f"{n} ({n / TICK_HZ:.2f} s)" if n else "-"

    head = [
        "| condition | built-in completed | held-out completed | median vs driver | median vs reference | "
        "wall contacts |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for condition, s in report["summary"].items():
        head.append(
            f"| {condition} | {s['builtin_completed']}/{s['builtin_tracks']} | "
            f"{s['unseen_completed']}/{s['unseen_tracks']} | {s['median_vs_driver'] or '-'} | "
            f"{s['median_vs_reference'] or '-'} | {s['wall_contacts']} |"
        )
    lines = [
        "| track | condition | lap | vision lap ticks | progress | wall contacts | evolved driver | reference | "
        "vs driver | vs reference |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['track']} | {r['condition']} | {'yes' if r['finished'] else 'NO'} | {ticks(r['lap_ticks'])} | "
            f"{r['progress_fraction']:.0%} | {r['wall_contacts']} | {ticks(r.get('driver_lap_ticks'))} | "
            f"{ticks(r['reference_lap_ticks'])} | {r.get('vs_driver', '-')} | {r.get('vs_reference', '-')} |"
        )
    return (
        "# Vision autopilot, evaluation suite\n\n"
        + "\n".join(head)
        + "\n\n"
        + "\n".join(lines)
        + "\n\nDriven lines: `suite_grid.png`.\n"
        + recovery_markdown(report)
    )


def recovery_markdown(report: dict[str, Any]) -> str:
    """The recovery starts' table; empty without them."""
    rows = report.get("recovery") or []
    if not rows:
        return ""

    def ticks(n: int | None) -> str:
        return f"{n} ({n / TICK_HZ:.2f} s)" if n else "-"

    s = report["recovery_summary"]
    lines = [
        "\n## From pinned and wrong-way starts (built-in tracks, plain frames)\n",
        "| start | model finished | recovering teacher finished | evolved driver alone finished |",
        "| --- | --- | --- | --- |",
    ]
    for kind, k in s.items():
        lines.append(
            f"| {kind} | {k['model_finished']}/{k['starts']} | {k['teacher_finished']}/{k['starts']} | "
            f"{k['driver_finished']}/{k['starts']} |"
        )
    lines += [
        "",
        "| track | start | model | ticks to the finish | progress | wall contacts | teacher | evolved driver alone |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['track']} | {r['start']} | {'yes' if r['finished'] else 'NO'} | {ticks(r['lap_ticks'])} | "
            f"{r['progress_fraction']:.0%} | {r['wall_contacts']} | {ticks(r['teacher_lap_ticks'])} | "
            f"{'yes' if r.get('driver_finished') else 'no'} |"
        )
    return "\n".join(lines) + "\n\nLines: `recovery_grid.png`.\n"


@dataclass(frozen=True)
class EvaluateJobConfig:
    """`rrp evaluate`: which model drives, where, and where the report goes."""

    model: Path = setting(Path("out/vision/model/model.safetensors"), "weights (safetensors) of the model")
    torchscript: bool = setting(False, "drive with the TorchScript export beside the weights")
    eval: EvalConfig = nested(EvalConfig)
    out_dir: Path = setting(Path("out/vision/eval"), "folder for JSON, Markdown, maps", flag="out", env="out")
    suite: bool = setting(False, "run the suite instead: --suite-tracks, plain and domain-randomised frames")
    suite_tracks: tuple[str, ...] = setting(
        (*BUILTIN_TRACKS, *SUITE_UNSEEN_TRACKS), "the suite's tracks: every built-in and 20 held-out generated ones"
    )
    suite_recovery: bool = setting(
        True, "with --suite, also start pinned against walls and facing the wrong way on the built-in tracks"
    )


def load_pilot(model_path: Path, torchscript: bool = False) -> VisionPilot:
    """The trained model as a policy, on one torch thread: the game servers need the other core."""
    import torch

    from trainer.vision.train import TORCHSCRIPT, load_model

    torch.set_num_threads(1)
    model = load_model(model_path)
    c = model.config
    if torchscript:
        return VisionPilot(torch.jit.load(str(model_path.with_name(TORCHSCRIPT))), c.width, c.height)
    return VisionPilot(model, c.width, c.height)


def run_evaluate_job(config: EvaluateJobConfig) -> int:
    pilot = load_pilot(config.model, config.torchscript)
    if config.suite:
        report = run_suite(pilot, config.eval, config.suite_tracks, config.out_dir, recovery=config.suite_recovery)
        print(suite_markdown(report), flush=True)
        return 0
    report = run_evaluation(pilot, config.eval, config.out_dir)
    print(markdown_report(report), flush=True)
    return 0
