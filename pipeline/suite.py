"""The evaluation suite: the model on every track, plain and randomised frames, and from pinned and wrong-way
starts; a typed report, and the Markdown rendered from it."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from game_server.core import drivers, episode
from game_server.core.driver_file import load_driver
from game_server.core.pilot import drive_lap
from game_server.core.recovery import RecoveringDriver, RecoveringPolicy, recovery_starts
from game_server.core.state import TICK_HZ, SimState
from game_server.core.technical import TECH_PREFIX
from game_server.core.tracks import BUILTIN_TRACKS, load_track
from game_server.leaderboard import Leaderboard, Submission, drive_lap_record, submit_lap
from game_server.trackmap import plot_lap_grid
from pipeline.evaluate import DriveRecord, EvalConfig, baselines, drive_on_server, lap_ratios, lap_text
from pipeline.pools import open_pool
from scheduler.executor import EvaluationPool
from trainer.vision.pilot import VisionPilot

# The suite's two conditions: plain frames, and frames under seeded domain randomisation (light, colours,
# camera jitter), so that a model that only drives the renderer's default look shows up.
SUITE_CONDITIONS: tuple[tuple[str, bool], ...] = (("plain", False), ("randomised", True))


@dataclass(frozen=True)
class ConditionSummary:
    """One frame condition over the suite's tracks: laps completed, and the median lap ratios of those."""

    builtin_completed: int
    builtin_tracks: int
    unseen_completed: int  # smooth held-out tracks (gen-<seed>)
    unseen_tracks: int
    wall_contacts: int
    median_vs_driver: float | None
    median_vs_reference: float | None
    technical_completed: int = 0  # technical held-out tracks (tech-<seed>): hairpins, chicanes, narrow stretches
    technical_tracks: int = 0
    technical_median_vs_driver: float | None = None


@dataclass(frozen=True)
class StartSummary:
    """One kind of recovery start: how many of the model's, the teacher's and the bare driver's drives finished."""

    starts: int
    model_finished: int
    teacher_finished: int
    driver_finished: int


@dataclass(frozen=True)
class SuiteReport:
    """What the suite found: a row per track and condition, a row per recovery start, and their summaries."""

    settings: dict[str, Any]
    tracks: list[str]
    rows: list[dict[str, Any]]  # a drive's outcome, its baselines and its lap ratios (those that exist)
    summary: dict[str, ConditionSummary]  # per condition
    recovery: list[dict[str, Any]]
    recovery_summary: dict[str, StartSummary]  # per start kind
    # The keys the model applied each tick of its plain-frame lap from the base state, per track: enough to
    # replay the lap bit for bit (lap videos). Not part of the JSON.
    lap_keys: dict[str, bytes] = dataclasses.field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        found = dataclasses.asdict(self)
        del found["lap_keys"]
        return found

    def row(self, track: str, condition: str) -> dict[str, Any] | None:
        return next((r for r in self.rows if r["track"] == track and r["condition"] == condition), None)


def run_suite(
    pilot: VisionPilot,
    config: EvalConfig,
    tracks: Sequence[str],
    out_dir: Path | None = None,
    pool: EvaluationPool | None = None,
    recovery: bool = True,
    board: Leaderboard | None = None,
    model_version: str = "",
    data_source: str = "",
) -> SuiteReport:
    """Drives every track under every condition (all at once over the pool) and compares each lap with the
    evolved and reference drivers; writes `suite.json`, `suite.md` and `suite_grid.png`.

    With `recovery`, the model also starts pinned against a wall and facing the wrong way at three places on
    each built-in track (plain frames), beside the recovering teacher and the bare evolved driver from the same
    starts (`recovery_grid.png`). The drives are lockstep and seeded: the same model gives the same report.

    With a `board`, every finished lap from the start line goes to the leaderboard, which verifies it by
    replaying its keys before it stores it (`model_version` names the model there).
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
                    drive_on_server,
                    tls=pool.client_tls,
                    track=t,
                    pilot=pilot,
                    max_ticks=budgets[t],
                    randomize=randomize,
                    seed=config.seed,
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
                    drive_on_server,
                    tls=pool.client_tls,
                    track=key[0],
                    pilot=pilot,
                    max_ticks=budgets[key[0]],
                    seed=config.seed,
                    start=start,
                ),
                timeout_s=config.timeout_s,
            )
            for key, start in starts.items()
        }
        records = {key: f.result() for key, f in futures.items()}
        pinned = {key: f.result() for key, f in pinned_futures.items()}
    submit_suite_laps(board, list(records.values()), model_version, data_source)
    rows = []
    panels = []
    for t in tracks:
        base = baselines(t, driver, budgets[t])
        trajectory = base.pop("_driver_trajectory", None)
        laps = []
        for condition, _ in SUITE_CONDITIONS:
            rec = records[(t, condition)]
            row: dict[str, Any] = {
                "track": t, "builtin": t in BUILTIN_TRACKS, "family": track_family(t), "condition": condition
            }  # fmt: skip
            row.update(rec.summary())
            row.update(base)
            row.update(lap_ratios(rec.lap_ticks if rec.finished else None, base, None))
            rows.append(row)
            laps.append((f"{condition} ({lap_text(rec)})", np.array(rec.x), np.array(rec.y)))
        if trajectory is not None:
            laps.append(("evolved driver", trajectory.x, trajectory.y))
        panels.append((load_track(t), laps))
    recovery_rows, recovery_panels = _recovery_rows(starts, pinned, driver, budgets)
    report = SuiteReport(
        settings={k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(config).items()},
        tracks=list(tracks),
        rows=rows,
        summary=suite_summary(rows),
        recovery=recovery_rows,
        recovery_summary=recovery_summary(recovery_rows),
        lap_keys={t: bytes(records[(t, "plain")].applied) for t in tracks},
    )
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "suite.json").write_text(suite_json(report))
        (out_dir / "suite.md").write_text(suite_markdown(report))
        plot_lap_grid(panels, out_dir / "suite_grid.png", "Evaluation suite: driven lines (plain, randomised)")
        if recovery_panels:
            plot_lap_grid(
                recovery_panels, out_dir / "recovery_grid.png", "From pinned and wrong-way starts: the model's lines",
                columns=3,
            )  # fmt: skip
    return report


def submit_suite_laps(
    board: Leaderboard | None, records: Sequence[DriveRecord], model_version: str, data_source: str
) -> list[Submission | None]:
    """Submits every finished lap (each is verified before it is stored; a refusal is logged, never raised)."""
    if board is None:
        return []
    submissions = []
    for rec in records:
        if rec.finished:
            record = drive_lap_record(
                rec.track, rec.applied, rec.lap_ticks, rec.outcome.wall_contacts, rec.final_state,
                model_version=model_version or "unnamed", data_source=data_source,
            )  # fmt: skip
            submissions.append(submit_lap(board, record))
    return submissions


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
        lines.setdefault(t, []).append((f"{label} ({lap_text(rec)})", np.array(rec.x), np.array(rec.y)))
    panels = [(load_track(t), laps) for t, laps in lines.items()]
    return rows, panels


def recovery_summary(rows: Sequence[dict[str, Any]]) -> dict[str, StartSummary]:
    """Per start kind: how many of the model's, the teacher's and the bare driver's drives finished."""
    out: dict[str, StartSummary] = {}
    for kind in ("pinned", "wrong-way"):
        mine = [r for r in rows if r["start"].startswith(kind + "@")]
        out[kind] = StartSummary(
            starts=len(mine),
            model_finished=sum(r["finished"] for r in mine),
            teacher_finished=sum(r["teacher_finished"] for r in mine),
            driver_finished=sum(r.get("driver_finished", False) for r in mine),
        )
    return out


def suite_summary(rows: Sequence[dict[str, Any]]) -> dict[str, ConditionSummary]:
    """Per condition: built-in, smooth and technical held-out laps completed, and the median lap ratios over
    completed laps (the technical family's apart, so that the smooth figures stay comparable across runs)."""

    def median(key: str, mine: list[dict[str, Any]]) -> float | None:
        ratios = [r[key] for r in mine if key in r]
        return round(float(np.median(ratios)), 3) if ratios else None

    out: dict[str, ConditionSummary] = {}
    for condition, _ in SUITE_CONDITIONS:
        mine = [r for r in rows if r["condition"] == condition]
        builtin = [r for r in mine if r["builtin"]]
        unseen = [r for r in mine if track_family(r["track"]) == "smooth"]
        technical = [r for r in mine if track_family(r["track"]) == "technical"]
        out[condition] = ConditionSummary(
            builtin_completed=sum(r["finished"] for r in builtin),
            builtin_tracks=len(builtin),
            unseen_completed=sum(r["finished"] for r in unseen),
            unseen_tracks=len(unseen),
            wall_contacts=sum(r["wall_contacts"] for r in mine),
            median_vs_driver=median("vs_driver", builtin + unseen),
            median_vs_reference=median("vs_reference", builtin + unseen),
            technical_completed=sum(r["finished"] for r in technical),
            technical_tracks=len(technical),
            technical_median_vs_driver=median("vs_driver", technical),
        )
    return out


def track_family(name: str) -> str:
    """built-in, smooth (gen-<seed>) or technical (tech-<seed>): the suite reports each family apart."""
    if name in BUILTIN_TRACKS:
        return "built-in"
    return "technical" if name.startswith(TECH_PREFIX) else "smooth"


def suite_json(report: SuiteReport) -> str:
    """`suite.json`, and the model version's evaluation as the registry records it."""
    return json.dumps(report.to_json(), indent=2) + "\n"


def _ticks(n: int | None) -> str:
    return f"{n} ({n / TICK_HZ:.2f} s)" if n else "-"


def summary_table(report: SuiteReport) -> str:
    """The per-condition table: laps completed, median ratios, wall contacts."""
    lines = [
        "| condition | built-in completed | held-out completed | technical completed | median vs driver | "
        "technical median vs driver | median vs reference | wall contacts |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for condition, s in report.summary.items():
        lines.append(
            f"| {condition} | {s.builtin_completed}/{s.builtin_tracks} | "
            f"{s.unseen_completed}/{s.unseen_tracks} | {s.technical_completed}/{s.technical_tracks} | "
            f"{s.median_vs_driver or '-'} | {s.technical_median_vs_driver or '-'} | "
            f"{s.median_vs_reference or '-'} | {s.wall_contacts} |"
        )
    return "\n".join(lines)


def suite_markdown(report: SuiteReport) -> str:
    lines = [
        "| track | condition | lap | vision lap ticks | progress | wall contacts | evolved driver | reference | "
        "vs driver | vs reference |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report.rows:
        lines.append(
            f"| {r['track']} | {r['condition']} | {'yes' if r['finished'] else 'NO'} | {_ticks(r['lap_ticks'])} | "
            f"{r['progress_fraction']:.0%} | {r['wall_contacts']} | {_ticks(r.get('driver_lap_ticks'))} | "
            f"{_ticks(r['reference_lap_ticks'])} | {r.get('vs_driver', '-')} | {r.get('vs_reference', '-')} |"
        )
    return (
        "# Vision autopilot, evaluation suite\n\n"
        + summary_table(report)
        + "\n\n"
        + "\n".join(lines)
        + "\n\nDriven lines: `suite_grid.png`.\n"
        + recovery_markdown(report)
    )


def recovery_markdown(report: SuiteReport) -> str:
    """The recovery starts' table; empty without them."""
    if not report.recovery:
        return ""
    lines = [
        "\n## From pinned and wrong-way starts (built-in tracks, plain frames)\n",
        "| start | model finished | recovering teacher finished | evolved driver alone finished |",
        "| --- | --- | --- | --- |",
    ]
    for kind, k in report.recovery_summary.items():
        lines.append(
            f"| {kind} | {k.model_finished}/{k.starts} | {k.teacher_finished}/{k.starts} | "
            f"{k.driver_finished}/{k.starts} |"
        )
    lines += [
        "",
        "| track | start | model | ticks to the finish | progress | wall contacts | teacher | evolved driver alone |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report.recovery:
        lines.append(
            f"| {r['track']} | {r['start']} | {'yes' if r['finished'] else 'NO'} | {_ticks(r['lap_ticks'])} | "
            f"{r['progress_fraction']:.0%} | {r['wall_contacts']} | {_ticks(r['teacher_lap_ticks'])} | "
            f"{'yes' if r.get('driver_finished') else 'no'} |"
        )
    return "\n".join(lines) + "\n\nLines: `recovery_grid.png`.\n"
