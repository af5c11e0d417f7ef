"""The leaderboard: the best verified laps of each track, in Redis; a lap is verified before it is stored.

Keys (prefix `rrp:` by default; docs/redis-schema.md):
  {prefix}laps:{track}      sorted set: member the record id, score lap_ticks * 1e6 + wall_contacts
  {prefix}lap:{record_id}   hash: `record` (the LapRecord's binary encoding) and readable copies
  {prefix}lap-tracks        set: the tracks with at least one lap
The record id is the SHA-256 of the record's deterministic encoding, so the same record submitted twice is
one entry. Redis keeps them on disk with its append-only file (the project's Redis runs with fsync always).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis

from collector.store import RedisConfig
from game_server import convert
from game_server.core import episode
from game_server.core.physics import RunResult
from game_server.core.state import TICK_HZ, SimState
from game_server.core.tracks import load_track
from game_server.core.verify import record_of_lap
from game_server.laps import record_to_pb, utc_now, verify_record_pb
from plumbing.errors import DomainError, InvalidArgument
from plumbing.settings import nested, setting
from rallyrobopilot.v1 import lap_pb2, sim_pb2

log = logging.getLogger(__name__)

# Lap ticks are at most 100,000 and wall contacts at most the ticks, so the score is exact in a double.
_SCORE_TICK = 1_000_000


@dataclass(frozen=True)
class LeaderboardConfig:
    """Where the leaderboard is kept and how many laps of each track it keeps."""

    redis: RedisConfig = nested(RedisConfig)
    keep_per_track: int = setting(100, "best laps kept per track; slower ones are dropped")

    def __post_init__(self) -> None:
        if self.keep_per_track < 1:
            raise ValueError("keep_per_track must be at least 1")


@dataclass(frozen=True)
class SubmitConfig:
    """`rrp lap submit`: a lap record file and the leaderboard it goes to."""

    record: Path = setting(help="lap record file: protobuf JSON, or the binary encoding", positional=True)
    board: LeaderboardConfig = nested(LeaderboardConfig)


@dataclass(frozen=True)
class ShowConfig:
    """`rrp leaderboard`: which tracks of which leaderboard to show."""

    board: LeaderboardConfig = nested(LeaderboardConfig)
    track: str | None = setting(None, "only this track; none: every track with a lap")
    top: int = setting(10, "laps shown per track")


@dataclass(frozen=True)
class Entry:
    """One verified lap on the board."""

    rank: int  # 1 = fastest on its track
    record_id: str
    track: str
    lap_ticks: int
    wall_contacts: int
    driven_by: str  # "model <version>" or "driver <id>"
    data_source: str
    driven_at: str
    verified_at: str

    @property
    def lap_time_s(self) -> float:
        return self.lap_ticks / TICK_HZ


@dataclass(frozen=True)
class Submission:
    """What became of a submitted record: stored (new or already there) or refused, and why."""

    record_id: str
    verdict: lap_pb2.LapVerdict
    stored: bool
    new: bool  # False when the same record was already on the board (or was refused)
    reason: str
    rank: int | None = None  # its rank on its track when stored and still kept


def _driven_by(msg: lap_pb2.LapRecord) -> str:
    kind = msg.WhichOneof("driven_by")
    return f"{'model' if kind == 'model_version' else 'driver'} {getattr(msg, kind)}" if kind else ""


@dataclass
class Leaderboard:
    """The board in one Redis; every method is one or a few round trips."""

    client: redis.Redis
    prefix: str = "rrp:"
    keep_per_track: int = 100
    clock: Callable[[], str] = field(default=utc_now, repr=False)

    @classmethod
    def connect(cls, config: LeaderboardConfig) -> Leaderboard:
        return cls(config.redis.client(), config.redis.prefix, config.keep_per_track)

    def _board(self, track: str) -> str:
        return f"{self.prefix}laps:{track}"

    def _entry(self, rid: str) -> str:
        return f"{self.prefix}lap:{rid}"

    def submit(self, msg: lap_pb2.LapRecord) -> Submission:
        """Verifies `msg` in process and stores it when it holds; never stores an unverified lap.

        Only laps from the track's base state rank (a lap begun elsewhere is refused, not stored), and one
        must name what drove it. Idempotent: the same record again is found by its id and not stored twice."""
        verdict = verify_record_pb(msg)
        rid = verdict.record_id
        if not verdict.verified:
            return Submission(rid, verdict, False, False, f"refused: {verdict.reason}")
        if msg.HasField("start_state") and msg.start_state != convert.state_to_pb(load_track(msg.track).base_state):
            return Submission(rid, verdict, False, False, "refused: only laps from the track's base state rank")
        if not msg.WhichOneof("driven_by"):
            raise InvalidArgument("a leaderboard lap names its model_version or driver_id")
        board = self._board(msg.track)
        if self.client.zscore(board, rid) is not None:
            return Submission(rid, verdict, True, False, "already on the board", self._rank(board, rid))
        replayed = verdict.replayed
        entry = {
            "record": msg.SerializeToString(deterministic=True),
            "track": msg.track,
            "lap_ticks": replayed.lap_ticks,
            "wall_contacts": replayed.wall_contacts,
            "driven_by": _driven_by(msg),
            "data_source": msg.data_source,
            "driven_at": msg.driven_at,
            "verified_at": self.clock(),
        }
        score = replayed.lap_ticks * _SCORE_TICK + replayed.wall_contacts
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(self._entry(rid), mapping=entry)  # type: ignore[arg-type]
            pipe.zadd(board, {rid: score})
            pipe.sadd(f"{self.prefix}lap-tracks", msg.track)
            pipe.execute()
        self._trim(board)
        rank = self._rank(board, rid)
        log.info("lap %s on %s stored: %d ticks, rank %s", rid[:12], msg.track, replayed.lap_ticks, rank)
        return Submission(rid, verdict, True, True, "stored", rank)

    def _rank(self, board: str, rid: str) -> int | None:
        rank = self.client.zrank(board, rid)
        return None if rank is None else int(rank) + 1  # type: ignore[arg-type]

    def _trim(self, board: str) -> None:
        dropped = self.client.zrange(board, self.keep_per_track, -1)
        if dropped:
            with self.client.pipeline(transaction=True) as pipe:
                pipe.zrem(board, *dropped)
                pipe.delete(*(self._entry(r.decode()) for r in dropped))  # type: ignore[union-attr]
                pipe.execute()

    def tracks(self) -> list[str]:
        return sorted(t.decode() for t in self.client.smembers(f"{self.prefix}lap-tracks"))  # type: ignore[union-attr]

    def top(self, track: str, n: int = 10) -> list[Entry]:
        """The `n` best laps of `track`, fastest first (fewer wall contacts break ties)."""
        ids = [r.decode() for r in self.client.zrange(self._board(track), 0, n - 1)]  # type: ignore[union-attr]
        with self.client.pipeline(transaction=False) as pipe:
            for rid in ids:
                pipe.hgetall(self._entry(rid))
            rows = pipe.execute()
        entries = []
        for rank, (rid, row) in enumerate(zip(ids, rows, strict=True), start=1):
            v = {k.decode(): val for k, val in row.items() if k != b"record"}
            entries.append(
                Entry(
                    rank=rank,
                    record_id=rid,
                    track=v["track"].decode(),
                    lap_ticks=int(v["lap_ticks"]),
                    wall_contacts=int(v["wall_contacts"]),
                    driven_by=v["driven_by"].decode(),
                    data_source=v["data_source"].decode(),
                    driven_at=v["driven_at"].decode(),
                    verified_at=v["verified_at"].decode(),
                )
            )
        return entries

    def record(self, rid: str) -> lap_pb2.LapRecord | None:
        """The stored record of an entry, so that anyone can verify it again."""
        data = self.client.hget(self._entry(rid), "record")
        if data is None:
            return None
        msg = lap_pb2.LapRecord()
        msg.ParseFromString(data)  # type: ignore[arg-type]
        return msg


def lap_record(
    track: str,
    start: SimState | None,
    keys: bytes,
    result: RunResult,
    *,
    model_version: str = "",
    driver_id: str = "",
    data_source: str = "",
    driven_at: str | None = None,
) -> lap_pb2.LapRecord:
    """The record of a lap just driven, from its applied keys and its result (an Episode's `applied` and
    `result`); `driven_at` defaults to now."""
    return record_to_pb(
        record_of_lap(
            track,
            start,
            keys,
            result,
            model_version=model_version,
            driver_id=driver_id,
            data_source=data_source,
            driven_at=utc_now() if driven_at is None else driven_at,
        )
    )


def drive_lap_record(
    track: str,
    keys: Sequence[int] | bytes,
    lap_ticks: int,
    wall_contacts: int,
    final_state: sim_pb2.SimState | None = None,
    *,
    model_version: str = "",
    driver_id: str = "",
    data_source: str = "",
) -> lap_pb2.LapRecord:
    """The record of a finished lap driven from the base state, from what a driving loop keeps: the keys it
    applied tick by tick, the lap time and wall contacts it saw and, when it has it, the last observation's
    state. Keys past the lap (a loop that chose one more at the finish) are cut off; without `final_state`,
    the claimed final state is the one these keys give in process (the time and contacts stay the loop's own
    claims, which verification checks)."""
    applied = bytes(keys[:lap_ticks])
    if final_state is not None:
        end = final_state
    else:
        t = load_track(track)
        end = convert.state_to_pb(episode.run_program(t, t.base_state, applied).final_state)
    msg = lap_pb2.LapRecord(
        track=track,
        keys=applied,
        claimed_lap_ticks=lap_ticks,
        claimed_wall_contacts=wall_contacts,
        claimed_final_state=end,
        data_source=data_source,
        driven_at=utc_now(),
    )
    if model_version:
        msg.model_version = model_version
    elif driver_id:
        msg.driver_id = driver_id
    return msg


def submit_lap(board: Leaderboard | None, msg: lap_pb2.LapRecord) -> Submission | None:
    """Submits a finished lap when a board is configured (None: no board, nothing done). A refusal, a
    malformed record or a Redis outage is logged, never raised: the board never fails the run that drove
    the lap. Returns None when nothing could be decided."""
    if board is None:
        return None
    try:
        submission = board.submit(msg)
    except (DomainError, redis.RedisError) as exc:
        log.warning("lap on %s not submitted: %s", msg.track, exc)
        return None
    if not submission.stored:
        log.warning("lap on %s not stored: %s", msg.track, submission.reason)
    return submission


def leaderboard_markdown(board: Leaderboard, tracks: Sequence[str] | None = None, n: int = 5) -> str:
    """The board as Markdown tables, one per track, for reports."""
    parts = []
    for track in tracks if tracks is not None else board.tracks():
        rows = board.top(track, n)
        parts.append(f"### {track}\n")
        if not rows:
            parts.append("No verified lap yet.\n")
            continue
        parts.append("| rank | lap (s) | ticks | wall contacts | driven by | data source | date | record |")
        parts.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
        parts += [
            f"| {e.rank} | {e.lap_time_s:.2f} | {e.lap_ticks} | {e.wall_contacts} | {e.driven_by} | "
            f"{e.data_source or '-'} | {e.driven_at or '-'} | {e.record_id[:12]} |"
            for e in rows
        ]
        parts.append("")
    return "\n".join(parts)
