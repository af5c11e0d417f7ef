"""Checks a data set before training: counts, tick gaps, label balance, image health, off-track share, coverage."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import random
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from game_server.core.tracks import load_track
from plumbing.errors import DomainError
from trainer.data.records import LABEL_KEYS, DataError, FrameSource, RunInfo

log = logging.getLogger(__name__)

BLANK_STD = 2.0  # a frame whose pixel values (0..255, all channels) vary less than this is near-blank
SAMPLE_GRID = 16  # frames drawn into samples.png
MAX_GAPS_LISTED = 10
_LONGITUDINAL = {0: "coast", 1: "forward", 2: "back"}  # by bits 0-1 of a mask; 3 (both) is conflicting
_LATERAL = {0: "straight", 1: "left", 2: "right"}  # by bits 2-3


def combination_of(mask: int) -> str:
    """One of the 9 key combinations, e.g. "forward+left", or "conflicting" when opposite keys are both held."""
    longitudinal, lateral = mask & 3, (mask >> 2) & 3
    if longitudinal == 3 or lateral == 3:
        return "conflicting"
    return f"{_LONGITUDINAL[longitudinal]}+{_LATERAL[lateral]}"


COMBINATIONS = tuple(f"{a}+{b}" for a in _LONGITUDINAL.values() for b in _LATERAL.values())


@dataclass(frozen=True)
class DataRequirements:
    """Thresholds a data set must meet to be trained on; the defaults suit one GA-replayed lap per run."""

    min_frames: int = 2000
    min_runs: int = 2
    min_tracks: int = 1
    max_offtrack_share: float = 0.2  # frames with wall contact
    min_label_share: tuple[tuple[str, float], ...] = (("forward", 0.3), ("left", 0.05), ("right", 0.05))
    max_missing_ticks: int = 0  # per run
    max_duplicate_ticks: int = 0  # per run
    max_blank_share: float = 0.05
    min_track_coverage: float = 0.5  # per track with known geometry

    def __post_init__(self) -> None:
        for key, share in self.min_label_share:
            if key not in LABEL_KEYS:
                raise ValueError(f"min_label_share: unknown key {key!r}; keys are {', '.join(LABEL_KEYS)}")
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"min_label_share: {key}={share} is not a share within [0, 1]")
        for name in ("max_offtrack_share", "max_blank_share", "min_track_coverage"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1]")
        for name in ("min_frames", "min_runs", "min_tracks", "max_missing_ticks", "max_duplicate_ticks"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> DataRequirements:
        """From a JSON object such as {"min_frames": 500, "min_label_share": {"left": 0.1}}; unknown keys fail."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown requirement(s) {sorted(unknown)}; known: {sorted(known)}")
        kwargs = dict(values)
        if "min_label_share" in kwargs:
            shares = kwargs["min_label_share"]
            if not isinstance(shares, Mapping):
                raise ValueError('min_label_share must map keys to shares, e.g. {"left": 0.1}')
            kwargs["min_label_share"] = tuple((str(k), float(v)) for k, v in shares.items())
        return cls(**kwargs)


def load_requirements(config: Path | None, overrides: Mapping[str, Any]) -> DataRequirements:
    """Defaults, then the JSON config file, then flags (None: not given); label shares merge key by key."""
    values: dict[str, Any] = {}
    if config is not None:
        loaded = json.loads(config.read_text())
        if not isinstance(loaded, dict):
            raise ValueError(f"{config} must hold a JSON object")
        values.update(loaded)
    shares = dict(DataRequirements.min_label_share)
    shares.update(values.get("min_label_share", {}))
    for name, value in overrides.items():
        if name == "min_label_share":
            shares.update(value)
        elif value is not None:
            values[name] = value
    values["min_label_share"] = shares
    return DataRequirements.from_mapping(values)


@dataclass
class _RunStats:
    track: str
    ticks: list[int] = field(default_factory=list)
    offtrack: int = 0
    error: str | None = None


def _tick_report(ticks: list[int], end_frames: int | None) -> dict[str, Any]:
    """Gaps and duplicates of a run's ticks; a RunEnd that announced more frames than stored counts as a gap."""
    if not ticks:
        return {"first_tick": None, "last_tick": None, "missing_ticks": end_frames or 0, "duplicate_ticks": 0,
                "out_of_order": 0, "gaps": []}  # fmt: skip
    unique = np.unique(np.asarray(ticks, dtype=np.int64))
    first, last = int(unique[0]), int(unique[-1])
    gaps = [(int(a) + 1, int(b) - 1) for a, b in itertools.pairwise(unique.tolist()) if b - a > 1]
    if end_frames is not None and first + end_frames - 1 > last:
        gaps.append((last + 1, first + end_frames - 1))
    return {
        "first_tick": first,
        "last_tick": last,
        "missing_ticks": sum(b - a + 1 for a, b in gaps),
        "duplicate_ticks": len(ticks) - len(unique),
        "out_of_order": int(np.count_nonzero(np.diff(np.asarray(ticks)) < 0)),
        "gaps": [list(g) for g in gaps[:MAX_GAPS_LISTED]],
    }


def _share(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


@dataclass(frozen=True)
class ValidationReport:
    """What was measured (JSON-ready) and each unmet requirement as a sentence."""

    summary: dict[str, Any]
    failures: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.failures


def validate_source(
    source: FrameSource,
    requirements: DataRequirements,
    out_dir: Path | None = None,
    track: str | None = None,
) -> ValidationReport:
    """Reads every frame once (streaming: only a small sample of images is kept) and checks the requirements."""
    runs = source.runs(track)
    stats: dict[str, _RunStats] = {}
    key_counts = Counter[str]()
    combos = Counter[str]()
    channel_sum = np.zeros(3)
    channel_sq = np.zeros(3)
    pixels = 0
    blank = 0
    segments: dict[str, set[int]] = defaultdict(set)
    rng = random.Random(0)  # reservoir sampling of the grid: deterministic for a given data set
    grid: list[tuple[str, int, np.ndarray]] = []
    seen = 0
    for run in runs:
        rs = stats[run.run_id] = _RunStats(track=run.track)
        try:
            for sample in source.samples(run.run_id):
                rs.ticks.append(sample.tick)
                rs.offtrack += sample.wall_contact
                for bit, key in enumerate(LABEL_KEYS):
                    key_counts[key] += (sample.label_mask >> bit) & 1
                combos[combination_of(sample.label_mask)] += 1
                n, frame_sum, frame_sq = channel_moments(sample.image)
                channel_sum += frame_sum
                channel_sq += frame_sq
                pixels += n
                blank += spread_from_moments(n * 3, frame_sum.sum(), frame_sq.sum()) < BLANK_STD
                segments[run.track].add(sample.segment)
                seen += 1
                if len(grid) < SAMPLE_GRID:
                    grid.append((run.run_id, sample.tick, sample.image.copy()))
                elif (slot := rng.randrange(seen)) < SAMPLE_GRID:
                    grid[slot] = (run.run_id, sample.tick, sample.image.copy())
        except (DataError, DomainError) as exc:
            rs.error = str(exc)
    total = sum(len(rs.ticks) for rs in stats.values())
    summary = _summarise(runs, stats, total, key_counts, combos, channel_sum, channel_sq, pixels, blank, segments)
    failures = _failures(summary, requirements)
    summary.update(requirements=dataclasses.asdict(requirements), passed=not failures, failures=failures)
    report = ValidationReport(summary=summary, failures=tuple(failures))
    if out_dir is not None:
        write_report(report, out_dir, grid)
    return report


_LEVELS = np.arange(256, dtype=np.float64)
_CHANNEL_OFFSETS = np.array([0, 256, 512], dtype=np.intp)


def channel_moments(image: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """Pixels, and each channel's sum and sum of squares, of an (H, W, 3) uint8 frame: one histogram of its
    768 (channel, level) pairs, exact (integer counts), ~4x cheaper than float64 sums over every value."""
    flat = image.reshape(-1, 3)
    counts = np.bincount((flat + _CHANNEL_OFFSETS).ravel(), minlength=768).reshape(3, 256).astype(np.float64)
    return flat.shape[0], counts @ _LEVELS, counts @ (_LEVELS * _LEVELS)


def spread_from_moments(n: int, total: float, squares: float) -> float:
    """Standard deviation of n values from their sum and sum of squares."""
    mean = total / n
    return float(np.sqrt(max(squares / n - mean * mean, 0.0)))


def _summarise(
    runs: list[RunInfo],
    stats: dict[str, _RunStats],
    total: int,
    key_counts: Counter[str],
    combos: Counter[str],
    channel_sum: np.ndarray,
    channel_sq: np.ndarray,
    pixels: int,
    blank: int,
    segments: dict[str, set[int]],
) -> dict[str, Any]:
    per_run = {}
    per_track: dict[str, dict[str, Any]] = {}
    for run in runs:
        rs = stats[run.run_id]
        per_run[run.run_id] = {
            "track": run.track,
            "frames": len(rs.ticks),
            "end_frames": run.end_frames,
            "offtrack_frames": rs.offtrack,
            "error": rs.error,
            **_tick_report(rs.ticks, run.end_frames),
        }
        t = per_track.setdefault(run.track, {"runs": 0, "frames": 0, "coverage": None, "segments": None})
        t["runs"] += 1
        t["frames"] += len(rs.ticks)
    for name, t in per_track.items():
        try:
            n_points = load_track(name).n_points
        except DomainError:
            log.warning("track %s has no known geometry: its coverage is not measured", name)
            continue
        t["segments"] = n_points
        t["coverage"] = len({s for s in segments[name] if 0 <= s < n_points}) / n_points
    mean = channel_sum / pixels if pixels else np.zeros(3)
    std = np.sqrt(np.maximum(channel_sq / pixels - mean * mean, 0.0)) if pixels else np.zeros(3)
    return {
        "frames": total,
        "runs": len(runs),
        "tracks": len(per_track),
        "per_run": per_run,
        "per_track": per_track,
        "label_share": {k: _share(key_counts[k], total) for k in LABEL_KEYS},
        "combination_share": {c: _share(combos[c], total) for c in (*COMBINATIONS, "conflicting")},
        "image": {
            "mean_rgb": [round(float(v) / 255.0, 6) for v in mean],
            "std_rgb": [round(float(v) / 255.0, 6) for v in std],
            "blank_share": _share(blank, total),
        },
        "offtrack_share": _share(sum(stats[r.run_id].offtrack for r in runs), total),
    }


def _failures(summary: dict[str, Any], req: DataRequirements) -> list[str]:
    out = []
    if summary["frames"] < req.min_frames:
        out.append(f"too few frames: {summary['frames']} < {req.min_frames} required (min_frames)")
    if summary["runs"] < req.min_runs:
        out.append(f"too few runs: {summary['runs']} < {req.min_runs} required (min_runs)")
    if summary["tracks"] < req.min_tracks:
        out.append(f"too few tracks: {summary['tracks']} < {req.min_tracks} required (min_tracks)")
    for run_id, r in summary["per_run"].items():
        if r["error"] is not None:
            out.append(f"run {run_id}: unreadable after {r['frames']} frames: {r['error']}")
            continue  # its ticks after the error were not read: gaps there would be noise
        if r["missing_ticks"] > req.max_missing_ticks:
            gaps = ", ".join(f"{a}..{b}" for a, b in r["gaps"])
            out.append(
                f"run {run_id}: {r['missing_ticks']} missing ticks (gaps {gaps}), "
                f"more than {req.max_missing_ticks} allowed (max_missing_ticks)"
            )
        if r["duplicate_ticks"] > req.max_duplicate_ticks:
            out.append(
                f"run {run_id}: {r['duplicate_ticks']} duplicate ticks, "
                f"more than {req.max_duplicate_ticks} allowed (max_duplicate_ticks)"
            )
    if summary["frames"]:
        for key, minimum in req.min_label_share:
            share = summary["label_share"][key]
            if share < minimum:
                out.append(
                    f"label {key!r} is set in {share:.1%} of frames, below the {minimum:.1%} required "
                    f"(min_label_share {key}={minimum})"
                )
        if summary["offtrack_share"] > req.max_offtrack_share:
            out.append(
                f"{summary['offtrack_share']:.1%} of frames are off track (wall contact), "
                f"above the {req.max_offtrack_share:.1%} allowed (max_offtrack_share)"
            )
        if summary["image"]["blank_share"] > req.max_blank_share:
            out.append(
                f"{summary['image']['blank_share']:.1%} of frames are near-blank, "
                f"above the {req.max_blank_share:.1%} allowed (max_blank_share)"
            )
    for name, t in summary["per_track"].items():
        if t["coverage"] is not None and t["coverage"] < req.min_track_coverage:
            out.append(
                f"track {name}: {t['coverage']:.1%} of its centre-line segments visited, "
                f"below the {req.min_track_coverage:.1%} required (min_track_coverage)"
            )
    return out


def _bar_chart(
    path: Path, title: str, labels: list[str], values: list[float], ylabel: str, colors: list[str] | None = None
) -> None:
    fig = Figure(figsize=(max(4.0, 0.6 * len(labels) + 2.0), 3.5), layout="constrained")
    ax = fig.add_subplot()
    ax.bar(labels, values, color=colors or "tab:blue")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", labelrotation=45)
    fig.savefig(path, dpi=100)


def _sample_grid(path: Path, grid: list[tuple[str, int, np.ndarray]]) -> None:
    cols = 4
    rows = max(1, -(-len(grid) // cols))
    fig = Figure(figsize=(2.4 * cols, 2.0 * rows), layout="constrained")
    for i in range(rows * cols):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.axis("off")
        if i < len(grid):
            run_id, tick, image = grid[i]
            ax.imshow(image)
            ax.set_title(f"{run_id} t{tick}", fontsize=7)
    fig.savefig(path, dpi=100)


def write_report(report: ValidationReport, out_dir: Path, grid: list[tuple[str, int, np.ndarray]]) -> None:
    """validation.json, validation.md and the plots they refer to, in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    s = report.summary
    (out_dir / "validation.json").write_text(json.dumps(s, indent=2))
    combos = s["combination_share"]
    _bar_chart(out_dir / "label_balance.png", "Label keys (blue) and key combinations (orange)",
               [*LABEL_KEYS, *combos], [*s["label_share"].values(), *combos.values()], "share of frames",
               ["tab:blue"] * len(LABEL_KEYS) + ["tab:orange"] * len(combos))  # fmt: skip
    tracks = sorted(s["per_track"])
    _bar_chart(out_dir / "frames_per_track.png", "Frames per track", tracks,
               [s["per_track"][t]["frames"] for t in tracks], "frames")  # fmt: skip
    _bar_chart(out_dir / "coverage.png", "Centre-line coverage per track", tracks,
               [s["per_track"][t]["coverage"] or 0.0 for t in tracks], "share of segments visited")  # fmt: skip
    _sample_grid(out_dir / "samples.png", grid)
    (out_dir / "validation.md").write_text(_markdown(report))


def _markdown(report: ValidationReport) -> str:
    s = report.summary
    lines = [
        "# Data validation",
        "",
        f"**{'PASSED' if report.passed else 'FAILED'}**: {s['frames']} frames, {s['runs']} runs, {s['tracks']} tracks; "
        f"{s['offtrack_share']:.1%} off track (wall contact), {s['image']['blank_share']:.1%} near-blank.",
        "",
    ]
    if report.failures:
        lines += ["## Unmet requirements", "", *[f"- {f}" for f in report.failures], ""]
    lines += ["## Tracks", "", "| track | runs | frames | coverage |", "| --- | --- | --- | --- |"]
    for name, t in sorted(s["per_track"].items()):
        coverage = "unknown geometry" if t["coverage"] is None else f"{t['coverage']:.1%} of {t['segments']}"
        lines.append(f"| {name} | {t['runs']} | {t['frames']} | {coverage} |")
    lines += ["", "## Runs", "", "| run | track | frames | ticks | missing | duplicate | off track | error |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for run_id, r in s["per_run"].items():
        lines.append(
            f"| {run_id} | {r['track']} | {r['frames']} | {r['first_tick']}..{r['last_tick']} | {r['missing_ticks']} "
            f"| {r['duplicate_ticks']} | {r['offtrack_frames']} | {r['error'] or ''} |"
        )
    lines += ["", "## Labels", "", "| key | share |", "| --- | --- |"]
    lines += [f"| {k} | {v:.1%} |" for k, v in s["label_share"].items()]
    lines += ["", "| combination | share |", "| --- | --- |"]
    lines += [f"| {k} | {v:.1%} |" for k, v in s["combination_share"].items()]
    image = s["image"]
    lines += [
        "",
        "## Images",
        "",
        f"Per-channel mean (R, G, B, 0..1): {image['mean_rgb']}; std: {image['std_rgb']}.",
        "",
        "![label balance](label_balance.png) ![frames per track](frames_per_track.png) ![coverage](coverage.png)",
        "",
        "![sample frames](samples.png)",
        "",
    ]
    return "\n".join(lines)
