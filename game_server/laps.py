"""Lap records as protobuf: conversion to and from the core's, their id, files (JSON or binary), verdicts."""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Callable
from pathlib import Path

from google.protobuf import json_format
from google.protobuf.message import DecodeError

from game_server import convert, game
from game_server.core import episode, pilot
from game_server.core.driver_file import SavedDriver
from game_server.core.tracks import load_track
from game_server.core.verify import MAX_LAP_KEYS, LapRecord, Refusal, Verdict, record_of_lap, verify_lap
from game_server.evaluation import result_to_pb
from plumbing.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from rallyrobopilot.v1 import lap_pb2

# A record of 100,000 keys is ~134 KB in JSON (base64); anything much larger is not a lap record.
MAX_RECORD_FILE_BYTES = 1024 * 1024


# The core's refusals by their names in the proto (a test checks that the numbers agree too).
REFUSAL_NAMES = {r: "LAP_REFUSAL_UNSPECIFIED" if r is Refusal.NONE else f"LAP_REFUSAL_{r.name}" for r in Refusal}


def record_from_pb(msg: lap_pb2.LapRecord) -> LapRecord:
    """Structural checks only (a track name, a final state, finite numbers); `verify_lap` checks the rest."""
    if not msg.track:
        raise InvalidArgument("a lap record needs its track")
    if not msg.HasField("claimed_final_state"):
        raise InvalidArgument("a lap record needs its claimed_final_state")
    if len(msg.keys) > MAX_LAP_KEYS:  # before any copying of the keys
        raise ResourceExhausted(f"a lap record holds at most {MAX_LAP_KEYS} keys, got {len(msg.keys)}")
    return LapRecord(
        track=msg.track,
        start=convert.state_from_pb(msg.start_state, finite=False) if msg.HasField("start_state") else None,
        keys=msg.keys,
        claimed_lap_ticks=msg.claimed_lap_ticks,
        claimed_wall_contacts=msg.claimed_wall_contacts,
        claimed_final_state=convert.state_from_pb(msg.claimed_final_state, finite=False),
        model_version=msg.model_version,
        driver_id=msg.driver_id,
        data_source=msg.data_source,
        driven_at=msg.driven_at,
    )


def record_to_pb(record: LapRecord) -> lap_pb2.LapRecord:
    msg = lap_pb2.LapRecord(
        track=record.track,
        keys=record.keys,
        claimed_lap_ticks=record.claimed_lap_ticks,
        claimed_wall_contacts=record.claimed_wall_contacts,
        claimed_final_state=convert.state_to_pb(record.claimed_final_state),
        data_source=record.data_source,
        driven_at=record.driven_at,
    )
    if record.start is not None:
        msg.start_state.CopyFrom(convert.state_to_pb(record.start))
    if record.model_version:
        msg.model_version = record.model_version
    elif record.driver_id:
        msg.driver_id = record.driver_id
    return msg


def record_id(msg: lap_pb2.LapRecord) -> str:
    """Hex SHA-256 of the record's deterministic encoding: equal records, equal ids."""
    return hashlib.sha256(msg.SerializeToString(deterministic=True)).hexdigest()


def verdict_to_pb(verdict: Verdict, rid: str) -> lap_pb2.LapVerdict:
    msg = lap_pb2.LapVerdict(
        verified=verdict.verified,
        refusal=REFUSAL_NAMES[verdict.refusal],
        reason=verdict.reason,
        record_id=rid,
    )
    if verdict.replayed is not None:
        msg.replayed.CopyFrom(result_to_pb(verdict.replayed))
    return msg


def verify_record_pb(msg: lap_pb2.LapRecord, cancelled: Callable[[], bool] | None = None) -> lap_pb2.LapVerdict:
    """VerifyLap's answer, computed here (the server's and `rrp lap verify`'s one path): an unknown track
    raises NotFound, a malformed record InvalidArgument or ResourceExhausted; false claims are a verdict."""
    record = record_from_pb(msg)
    verdict = verify_lap(record, cancelled)
    if verdict.refusal is Refusal.UNKNOWN_TRACK:
        raise NotFound(verdict.reason)
    return verdict_to_pb(verdict, record_id(msg))


def read_record(path: Path) -> lap_pb2.LapRecord:
    """A record from a file: protobuf JSON when it starts with "{", else the binary encoding."""
    if path.stat().st_size > MAX_RECORD_FILE_BYTES:
        raise InvalidArgument(f"{path}: a lap record file is at most {MAX_RECORD_FILE_BYTES} bytes")
    data = path.read_bytes()
    msg = lap_pb2.LapRecord()
    try:
        if data.lstrip()[:1] == b"{":
            json_format.Parse(data.decode("utf-8"), msg)
        else:
            msg.ParseFromString(data)
    except (json_format.ParseError, DecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{path}: not a lap record ({exc})") from None
    return msg


def write_record(msg: lap_pb2.LapRecord, path: Path) -> None:
    """Writes protobuf JSON for a .json path, the binary encoding otherwise."""
    if path.suffix == ".json":
        path.write_text(json_format.MessageToJson(msg, indent=2) + "\n")
    else:
        path.write_bytes(msg.SerializeToString(deterministic=True))


def drive_record(track_name: str, driver: SavedDriver | None, max_ticks: int, data_source: str = "") -> LapRecord:
    """Drives one lap from the base state of `track_name` with a saved driver (open-loop program or
    closed-loop driver), or with the reference pilot when `driver` is None, and records it."""
    track = load_track(track_name)
    if driver is None:
        keys, result = pilot.drive_lap(track, max_ticks)
        driver_id = "reference-pilot"
    else:
        policy = (
            episode.Program(driver.masks) if driver.kind == "program" else game.as_policy(driver.ray_driver(), track)
        )
        run = episode.run_episode(track, track.base_state, policy, max_ticks=max_ticks)
        keys, result, driver_id = run.applied, run.result, driver.driver_id
    if not result.finished:
        raise FailedPrecondition(f"the driver did not finish a lap of {track_name} in {max_ticks} ticks")
    return record_of_lap(
        track_name,
        None,
        keys,
        result,
        driver_id=driver_id,
        data_source=data_source,
        driven_at=utc_now(),
    )


def utc_now() -> str:
    """Now, as RFC 3339 in UTC to the second (the form of LapRecord.driven_at)."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
