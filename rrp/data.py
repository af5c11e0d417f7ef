"""`rrp data validate` and `rrp data export`: check and export the recorded training frames."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from plumbing.settings import env_value, setting
from rrp.command import Commands

if TYPE_CHECKING:
    from trainer.data.records import FrameSource


@dataclass(frozen=True)
class SourceConfig:
    """Where the frames are: a collector's Redis, or an export folder."""

    redis_url: str = setting(
        "redis://127.0.0.1:6379/0",
        "Redis URL (the password, if any, from RRP_REDIS_PASSWORD)",
        flag="redis",
        env="redis_url",
    )
    redis_prefix: str = setting("rrp:", "key prefix of the collector's Redis data")
    track: str | None = setting(None, "only the runs of this track")

    def source(self, shards: Path | None = None) -> FrameSource:
        from trainer.data.redis_source import RedisRuns
        from trainer.data.shards import ShardSet

        if shards is not None:
            return ShardSet(shards)
        return RedisRuns(self.redis_url, prefix=self.redis_prefix, password=env_value("redis_password"))


def _validate_config() -> type[Any]:
    """The validate command's settings; each requirement flag shows the default it overrides."""
    from trainer.data.validate import DataRequirements

    base = DataRequirements()

    def needs(name: str, text: str) -> Any:
        return setting(None, f"{text} (requirement {name}, {getattr(base, name)} unless --config says otherwise)")

    shares = " ".join(f"{k}={v}" for k, v in base.min_label_share)

    @dataclass(frozen=True)
    class ValidateConfig:
        """A data set and the requirements it must meet: defaults, then --config, then these flags."""

        source: SourceConfig = dataclasses.field(default_factory=SourceConfig)
        shards: Path | None = setting(None, "an export folder (from rrp data export) instead of Redis")
        out_dir: Path = setting(Path("out/data-validation"), "report folder", flag="out", env="out")
        config: Path | None = setting(None, "JSON file of requirements (DataRequirements field names)")
        min_frames: int | None = needs("min_frames", "least frames in all")
        min_runs: int | None = needs("min_runs", "least runs")
        min_tracks: int | None = needs("min_tracks", "least tracks")
        max_offtrack_share: float | None = needs("max_offtrack_share", "most share of wall-contact frames")
        min_track_coverage: float | None = needs("min_track_coverage", "least share of each track's centre line")
        min_label_share: tuple[str, ...] = setting(
            (),
            f"least share of frames with a key set, repeatable; merged over {shares}",
            repeat=True,
            metavar="KEY=SHARE",
        )

    return ValidateConfig


@dataclass(frozen=True)
class ExportConfig:
    """An export of recorded runs to checksummed safetensors shards."""

    out_dir: Path = setting(help="export folder (must not hold an export already)", flag="out", env="out")
    source: SourceConfig = dataclasses.field(default_factory=SourceConfig)
    shard_frames: int = setting(2048, "frames per shard")


def validate(config: Any) -> int:
    import redis

    from trainer.data.records import DataError
    from trainer.data.validate import load_requirements, validate_source

    shares: dict[str, float] = {}
    for item in config.min_label_share:
        key, _, value = item.partition("=")
        try:
            shares[key] = float(value)
        except ValueError:
            raise SystemExit(f"rrp data validate: --min-label-share wants KEY=SHARE, got {item!r}") from None
    names = ("min_frames", "min_runs", "min_tracks", "max_offtrack_share", "min_track_coverage")
    overrides: dict[str, Any] = {name: getattr(config, name) for name in names}
    overrides["min_label_share"] = shares
    try:
        requirements = load_requirements(config.config, overrides)
        report = validate_source(
            config.source.source(config.shards), requirements, config.out_dir, track=config.source.track
        )
    except redis.RedisError as exc:
        raise SystemExit(f"rrp data validate: Redis: {exc}") from exc
    except (ValueError, OSError) as exc:  # DataError is a ValueError: an unreadable export, else a bad config
        kind = "data" if isinstance(exc, DataError) else "config"
        raise SystemExit(f"rrp data validate: {kind} error: {exc}") from exc
    s = report.summary
    print(f"{s['frames']} frames, {s['runs']} runs, {s['tracks']} tracks; report in {config.out_dir}/validation.md")
    if not report.passed:
        print("data validation failed:", *(f"  - {f}" for f in report.failures), sep="\n", file=sys.stderr)
        return 1
    print("data validation passed")
    return 0


def export(config: ExportConfig) -> int:
    import redis

    from trainer.data.shards import export_shards

    try:
        manifest = export_shards(
            config.source.source(), config.out_dir, shard_frames=config.shard_frames, track=config.source.track
        )
    except (ValueError, OSError, redis.RedisError) as exc:
        raise SystemExit(f"rrp data export: {exc}") from exc
    frames = sum(r["frames"] for r in manifest["runs"])
    print(
        f"exported {len(manifest['runs'])} runs, {frames} frames in {len(manifest['shards'])} shards to "
        f"{config.out_dir}"
    )
    return 0


def register(commands: Commands) -> None:
    data = commands.group("data", help="check and export the recorded training frames")
    data.add(
        "validate",
        lambda: (_validate_config(), validate),
        help="report on a data set and fail on unmet requirements",
        description="Reads every frame from Redis or an export, writes validation.json, validation.md and plots "
        "to --out, and exits 1 listing each unmet requirement. Thresholds: defaults (shown with each flag), then "
        "--config, then flags.",
    )
    data.add(
        "export",
        lambda: (ExportConfig, export),
        help="write runs from Redis to checksummed safetensors shards",
        description="Writes shard-NNNNN.safetensors files and manifest.json (runs, frame counts, SHA-256) "
        "to --out, which must not hold an export already.",
    )
