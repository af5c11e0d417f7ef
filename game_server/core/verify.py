"""Lap records and their verification: replay the keys from the start state and check every claim; pure."""

from __future__ import annotations

import datetime
import enum
from collections.abc import Callable
from dataclasses import dataclass

from game_server.core import episode, physics
from game_server.core.physics import RunResult
from game_server.core.state import SimState
from game_server.core.track import Track
from game_server.core.tracks import load_track
from plumbing.errors import InvalidArgument, NotFound, ResourceExhausted, quote

MAX_LAP_KEYS = 100_000
MAX_ID_CHARS = 128
MAX_SOURCE_CHARS = 256


class Refusal(enum.IntEnum):
    """Why a record was refused; the numbers are the proto's LapRefusal values."""

    NONE = 0
    UNKNOWN_TRACK = 1
    IMPOSSIBLE_START = 2
    NOT_FINISHED = 3
    KEYS_PAST_FINISH = 4
    LAP_TICKS_MISMATCH = 5
    WALL_CONTACTS_MISMATCH = 6
    FINAL_STATE_MISMATCH = 7


@dataclass(frozen=True)
class LapRecord:
    """A lap as its driver claims it: replaying `keys` from `start` (None: the base state) on `track` must
    finish on the last key, in `claimed_lap_ticks`, with `claimed_wall_contacts`, in `claimed_final_state`."""

    track: str
    start: SimState | None
    keys: bytes
    claimed_lap_ticks: int
    claimed_wall_contacts: int
    claimed_final_state: SimState
    model_version: str = ""
    driver_id: str = ""
    data_source: str = ""
    driven_at: str = ""

    @property
    def driven_by(self) -> str:
        """ "model <version>" or "driver <id>", or "" when the record names neither."""
        if self.model_version:
            return f"model {self.model_version}"
        return f"driver {self.driver_id}" if self.driver_id else ""


@dataclass(frozen=True)
class Verdict:
    """Whether a record holds; `replayed` is what its keys really give (None when the start was impossible)."""

    refusal: Refusal
    reason: str
    replayed: RunResult | None

    @property
    def verified(self) -> bool:
        return self.refusal is Refusal.NONE


def validate_record(record: LapRecord) -> None:
    """Rejects a malformed record (InvalidArgument, or ResourceExhausted when oversized); a well-formed
    record with false claims passes here and is refused by `verify_lap`."""
    if len(record.keys) > MAX_LAP_KEYS:
        raise ResourceExhausted(f"a lap record holds at most {MAX_LAP_KEYS} keys, got {len(record.keys)}")
    if not record.keys:
        raise InvalidArgument("a lap record needs its keys, one byte per tick")
    physics.validate_masks(record.keys)
    if record.model_version and record.driver_id:
        raise InvalidArgument("a lap is driven by a model version or a driver id, not both")
    for name, value, limit in (
        ("model_version", record.model_version, MAX_ID_CHARS),
        ("driver_id", record.driver_id, MAX_ID_CHARS),
        ("data_source", record.data_source, MAX_SOURCE_CHARS),
    ):
        if len(value) > limit:
            raise InvalidArgument(f"{name} is at most {limit} characters, got {len(value)}")
    if record.driven_at:
        parse_date(record.driven_at)


def parse_date(text: str) -> datetime.datetime:
    """An RFC 3339 date-time in UTC ("2026-12-07T10:30:00Z" or with +00:00)."""
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise InvalidArgument(f"driven_at must be an RFC 3339 date-time in UTC, got {quote(text)}") from None
    if when.utcoffset() != datetime.timedelta(0):
        raise InvalidArgument(f"driven_at must be in UTC (Z or +00:00), got {quote(text)}")
    return when


def verify_lap(record: LapRecord, cancelled: Callable[[], bool] | None = None) -> Verdict:
    """Replays the record's keys and checks its claims, in the order a reader would: start, finish, time,
    contacts, final state. Malformed records raise (see `validate_record`); false claims give a refusal."""
    validate_record(record)
    try:
        track = load_track(record.track)
    except NotFound as exc:
        return Verdict(Refusal.UNKNOWN_TRACK, str(exc), None)
    start = track.base_state if record.start is None else record.start
    impossible = impossible_start(track, start)
    if impossible:
        return Verdict(Refusal.IMPOSSIBLE_START, f"impossible start state: {impossible}", None)
    lap = episode.run_episode(
        track, start, episode.Program(record.keys), max_ticks=len(record.keys), cancelled=cancelled
    ).result
    n = len(record.keys)
    if not lap.finished:
        return Verdict(
            Refusal.NOT_FINISHED,
            f"the {n} keys end before the finish line ({lap.progress_fraction:.1%} of the lap driven)",
            lap,
        )
    if lap.ticks < n:
        return Verdict(
            Refusal.KEYS_PAST_FINISH,
            f"the lap finishes at key {lap.ticks} of {n}: a record holds no keys past its finish",
            lap,
        )
    if lap.lap_ticks != record.claimed_lap_ticks:
        return Verdict(
            Refusal.LAP_TICKS_MISMATCH,
            f"claimed lap time {record.claimed_lap_ticks} ticks, the keys give {lap.lap_ticks} ticks",
            lap,
        )
    if lap.wall_contacts != record.claimed_wall_contacts:
        return Verdict(
            Refusal.WALL_CONTACTS_MISMATCH,
            f"claimed {record.claimed_wall_contacts} wall contacts, the keys give {lap.wall_contacts}",
            lap,
        )
    if lap.final_state != record.claimed_final_state:
        return Verdict(
            Refusal.FINAL_STATE_MISMATCH,
            "the keys give another final state than claimed: "
            + _first_difference(lap.final_state, record.claimed_final_state),
            lap,
        )
    return Verdict(
        Refusal.NONE,
        f"verified: {n} keys replayed on {track.name} finish in {lap.lap_ticks} ticks with "
        f"{lap.wall_contacts} wall contacts and the claimed final state",
        lap,
    )


def impossible_start(track: Track, start: SimState) -> str:
    """Why `start` cannot begin a lap on `track`, or "" when it can."""
    try:
        physics.validate_state(track, start)
    except InvalidArgument as exc:
        return str(exc)
    return "the lap is already finished" if start.lap.finished else ""


LAP_FIELDS = (
    "next_checkpoint",
    "checkpoints_passed",
    "progress_m",
    "arc_m",
    "segment",
    "wall_contacts",
    "finished",
    "finish_tick",
)


def _first_difference(replayed: SimState, claimed: SimState) -> str:
    pairs = [("tick", replayed.tick, claimed.tick)]
    pairs += [(f"car.{k}", getattr(replayed.car, k), getattr(claimed.car, k)) for k in ("x", "y", "heading", "speed")]
    pairs += [(f"lap.{k}", getattr(replayed.lap, k), getattr(claimed.lap, k)) for k in LAP_FIELDS]
    name, got, want = next((p for p in pairs if p[1] != p[2]), ("state", replayed, claimed))
    return f"{name}: claimed {want!r}, replayed {got!r}"


def record_of_lap(
    track: str,
    start: SimState | None,
    keys: bytes,
    result: RunResult,
    *,
    model_version: str = "",
    driver_id: str = "",
    data_source: str = "",
    driven_at: str = "",
) -> LapRecord:
    """The record of a lap just driven: the applied keys and what they gave (e.g. an Episode's `applied`
    and `result`). Claims nothing a replay would not confirm, as long as `keys` are the applied keys."""
    return LapRecord(
        track=track,
        start=start,
        keys=keys,
        claimed_lap_ticks=result.lap_ticks,
        claimed_wall_contacts=result.wall_contacts,
        claimed_final_state=result.final_state,
        model_version=model_version,
        driver_id=driver_id,
        data_source=data_source,
        driven_at=driven_at,
    )
