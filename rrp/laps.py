"""`rrp lap record|verify|submit` and `rrp leaderboard`: lap records anyone can verify, and the board of them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plumbing.channels import ClientTLS
from plumbing.settings import nested, setting
from rrp.command import Commands


def _verify() -> tuple[type[Any], Any]:
    from game_server.laps import read_record, verify_record_pb

    @dataclass(frozen=True)
    class LapVerifyConfig:
        """A lap record file and where to verify it."""

        record: Path = setting(help="lap record file: protobuf JSON, or the binary encoding", positional=True)
        game: str = setting("", "game server address host:port; none: verify here, in process")
        timeout_s: float = setting(60.0, "seconds the game server may take")
        tls: ClientTLS = nested(ClientTLS)

    def run(config: LapVerifyConfig) -> int:
        record = read_record(config.record)
        if config.game:
            from game_server.client import GameClient

            with GameClient(config.game, config.timeout_s, config.tls) as client:
                verdict = client.verify_lap(record)
        else:
            verdict = verify_record_pb(record)
        from rallyrobopilot.v1 import lap_pb2

        status = "VERIFIED" if verdict.verified else f"REFUSED ({lap_pb2.LapRefusal.Name(verdict.refusal)})"
        print(f"{status}: {verdict.reason}\nrecord {verdict.record_id}")
        return 0 if verdict.verified else 1

    return LapVerifyConfig, run


def _record() -> tuple[type[Any], Any]:
    from game_server.core.driver_file import load_driver
    from game_server.laps import record_to_pb, write_record

    @dataclass(frozen=True)
    class LapRecordConfig:
        """Which lap to drive and where its record goes."""

        track: str = setting("oval", "track name: a built-in or gen-<seed>")
        driver: Path | None = setting(None, "driver file (rrp evolve's best_driver.json); none: the reference pilot")
        max_ticks: int = setting(5000, "give up after this many ticks")
        data_source: str = setting("", "where the driver came from, stored in the record")
        out: Path = setting(Path("lap.json"), "record file: .json for protobuf JSON, else binary")

    def run(config: LapRecordConfig) -> int:
        from game_server.laps import drive_record

        driver = load_driver(config.driver) if config.driver is not None else None
        record = drive_record(config.track, driver, config.max_ticks, config.data_source)
        write_record(record_to_pb(record), config.out)
        print(f"{config.out}: {record.claimed_lap_ticks} ticks, {record.claimed_wall_contacts} wall contacts")
        return 0

    return LapRecordConfig, run


def _submit() -> tuple[type[Any], Any]:
    from game_server.laps import read_record
    from game_server.leaderboard import Leaderboard, SubmitConfig

    def run(config: SubmitConfig) -> int:
        _require_redis(config.board)
        submission = Leaderboard.connect(config.board).submit(read_record(config.record))
        rank = f", rank {submission.rank}" if submission.rank else ""
        print(f"{submission.reason}{rank}: record {submission.record_id}")
        return 0 if submission.stored else 1

    return SubmitConfig, run


def _leaderboard() -> tuple[type[Any], Any]:
    from game_server.leaderboard import Leaderboard, ShowConfig, leaderboard_markdown

    def run(config: ShowConfig) -> int:
        _require_redis(config.board)
        board = Leaderboard.connect(config.board)
        tracks = [config.track] if config.track else None
        print(leaderboard_markdown(board, tracks, config.top) or "No verified lap yet.")
        return 0

    return ShowConfig, run


def _require_redis(config: Any) -> None:
    if not config.redis.url:
        raise ValueError("give the leaderboard's Redis with --redis URL (or RRP_REDIS_URL)")


def register(commands: Commands) -> None:
    lap = commands.group("lap", help="lap records: drive one, verify one, submit one to the leaderboard")
    lap.add(
        "record",
        _record,
        help="drive a lap with a driver file (or the reference pilot) and write its record",
        description="Drives one lap from the track's base state and writes a LapRecord (its keys tick by tick, "
        "lap time, wall contacts and final state) that anyone can verify.",
    )
    lap.add(
        "verify",
        _verify,
        help="re-simulate a lap record and confirm or refute it",
        description="Replays the record's keys from its start state, on a game server (--game) or here, and "
        "checks its lap time, wall contacts and final state; exits 0 when verified, 1 when refused (the reason "
        "is printed).",
    )
    lap.add(
        "submit",
        _submit,
        help="verify a lap record and store it on the leaderboard in Redis",
        description="Verifies the record here and stores it when it holds (the same record twice is one entry); "
        "exits 1 when refused.",
    )
    commands.add(
        "leaderboard",
        _leaderboard,
        help="show the best verified laps of each track",
        description="Reads the leaderboard from Redis (--redis URL): per track, the fastest verified laps with "
        "what drove them, its data source and the date.",
    )
