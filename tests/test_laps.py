"""Lap records: laps verify, forged ones are refused with their reason, over gRPC and from the protos alone."""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from game_server.client import GameClient
from game_server.core import episode
from game_server.core.drivers import default_driver
from game_server.core.pilot import drive_lap
from game_server.core.state import CarState, LapState, SimState
from game_server.core.tracks import builtin_tracks, load_track
from game_server.core.verify import LapRecord, Refusal, record_of_lap, verify_lap
from game_server.laps import REFUSAL_NAMES, read_record, record_id, record_to_pb, write_record
from game_server.server import GameServer
from rallyrobopilot.v1 import lap_pb2
from rrp.cli import main

REPO = Path(__file__).resolve().parent.parent
GRPCURL = str(Path(sys.executable).parent / "grpcurl")


@pytest.fixture(scope="module")
def oval_lap() -> LapRecord:
    """A lap of the oval by the reference pilot, recorded as a driver would."""
    keys, result = drive_lap(load_track("oval"))
    return record_of_lap("oval", None, keys, result, driver_id="reference-pilot", driven_at="2026-12-07T10:30:00Z")


def test_refusals_are_the_protos() -> None:
    for refusal, name in REFUSAL_NAMES.items():
        assert lap_pb2.LapRefusal.Value(name) == refusal.value
    assert len(REFUSAL_NAMES) == len(lap_pb2.LapRefusal.keys())


@pytest.mark.parametrize("track", [t.name for t in builtin_tracks()] + ["gen-3"])
def test_laps_of_the_evolved_driver_and_of_a_program_verify(track: str) -> None:
    t = load_track(track)
    run = episode.run_episode(t, t.base_state, episode.SensorPolicy(default_driver().act_on), max_ticks=4000)
    assert run.result.finished
    by_driver = verify_lap(record_of_lap(track, None, run.applied, run.result, driver_id="default"))
    assert by_driver.verified, by_driver.reason
    assert by_driver.replayed is not None and by_driver.replayed.lap_ticks == run.result.lap_ticks
    keys, result = drive_lap(t)
    by_program = verify_lap(record_of_lap(track, None, keys, result))
    assert by_program.verified, by_program.reason


def test_a_lap_from_a_given_start_state_verifies() -> None:
    t = load_track("kidney")
    start = episode.run_episode(t, t.base_state, episode.Program(bytes([1]) * 40), max_ticks=40).result.final_state
    run = episode.run_episode(t, start, episode.SensorPolicy(default_driver().act_on), max_ticks=4000)
    verdict = verify_lap(record_of_lap("kidney", start, run.applied, run.result))
    assert verdict.verified, verdict.reason


def _forge(lap: LapRecord, **changes: object) -> LapRecord:
    return dataclasses.replace(lap, **changes)  # type: ignore[arg-type]


def _changed_key(lap: LapRecord, tick: int, new: int) -> LapRecord:
    keys = bytearray(lap.keys)
    keys[tick] = new
    return _forge(lap, keys=bytes(keys))


def forged_records(lap: LapRecord) -> dict[str, tuple[LapRecord, Refusal]]:
    """Each forgery and the refusal it must get."""
    track = load_track(lap.track)
    base = track.base_state
    off_track = SimState(0, CarState(base.car.x + 500.0, base.car.y, base.car.heading), LapState(segment=0))
    # A steering key flipped just before the finish: the lap time and contacts stay, the final state does not.
    last = len(lap.keys) - 5
    return {
        "changed key, same lap time": (_changed_key(lap, last, lap.keys[last] ^ 4), Refusal.FINAL_STATE_MISMATCH),
        "changed key, lap not finished": (_changed_key(lap, 10, 2), Refusal.NOT_FINISHED),
        "claimed time too fast": (_forge(lap, claimed_lap_ticks=lap.claimed_lap_ticks - 1), Refusal.LAP_TICKS_MISMATCH),
        "claimed other contacts": (
            _forge(lap, claimed_wall_contacts=lap.claimed_wall_contacts + 3), Refusal.WALL_CONTACTS_MISMATCH
        ),
        "keys past the finish": (_forge(lap, keys=lap.keys + b"\x01"), Refusal.KEYS_PAST_FINISH),
        "start off the track": (_forge(lap, start=off_track), Refusal.IMPOSSIBLE_START),
        "start not finite": (
            _forge(lap, start=dataclasses.replace(base, car=CarState(math.nan, base.car.y, base.car.heading))),
            Refusal.IMPOSSIBLE_START,
        ),
        "start too fast": (
            _forge(lap, start=dataclasses.replace(base, car=dataclasses.replace(base.car, speed=80.0))),
            Refusal.IMPOSSIBLE_START,
        ),
        "start already finished": (
            _forge(lap, start=dataclasses.replace(base, tick=5, lap=LapState(finished=True, finish_tick=5))),
            Refusal.IMPOSSIBLE_START,
        ),
        "unknown track": (_forge(lap, track="nowhere"), Refusal.UNKNOWN_TRACK),
    }  # fmt: skip


def test_forged_records_are_refused_each_with_its_reason(oval_lap: LapRecord) -> None:
    assert verify_lap(oval_lap).verified
    for name, (forged, refusal) in forged_records(oval_lap).items():
        verdict = verify_lap(forged)
        assert verdict.refusal is refusal, f"{name}: {verdict.refusal.name} {verdict.reason}"
        assert verdict.reason and not verdict.verified
    changed = verify_lap(forged_records(oval_lap)["changed key, same lap time"][0])
    assert "car." in changed.reason  # names the first number that differs


def test_verify_lap_over_grpc(game_server: GameServer, oval_lap: LapRecord) -> None:
    with GameClient(game_server.address) as client:
        verdict = client.verify_lap(record_to_pb(oval_lap))
        assert verdict.verified and verdict.refusal == lap_pb2.LAP_REFUSAL_UNSPECIFIED
        assert verdict.replayed.lap_ticks == oval_lap.claimed_lap_ticks
        assert verdict.record_id == record_id(record_to_pb(oval_lap))
        for name, (forged, refusal) in forged_records(oval_lap).items():
            if refusal is Refusal.UNKNOWN_TRACK:
                with pytest.raises(grpc.RpcError) as err:
                    client.verify_lap(record_to_pb(forged))
                assert err.value.code() == grpc.StatusCode.NOT_FOUND
                continue
            verdict = client.verify_lap(record_to_pb(forged))
            assert not verdict.verified and verdict.refusal == refusal.value, name
        malformed = {
            "no track": lap_pb2.LapRecord(keys=b"\x01", claimed_final_state=record_to_pb(oval_lap).claimed_final_state),
            "no final state": lap_pb2.LapRecord(track="oval", keys=b"\x01"),
            "no keys": _pb(oval_lap, keys=b""),
            "bad key bits": _pb(oval_lap, keys=b"\x01\x10"),
            "bad date": _pb(oval_lap, driven_at="yesterday"),
            "long driver id": _pb(oval_lap, driver_id="d" * 129),
        }
        for name, msg in malformed.items():
            with pytest.raises(grpc.RpcError) as err:
                client.verify_lap(msg)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        with pytest.raises(grpc.RpcError) as err:
            client.verify_lap(_pb(oval_lap, keys=bytes(100_001)))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def _pb(lap: LapRecord, **fields: object) -> lap_pb2.LapRecord:
    msg = record_to_pb(lap)
    for name, value in fields.items():
        setattr(msg, name, value)
    return msg


def _grpcurl(address: str, method: str, body: dict[str, object]) -> dict[str, object]:
    """A call made from the .proto files alone (no generated code, no reflection), in protobuf JSON."""
    cmd = [GRPCURL, "-plaintext", "-import-path", str(REPO / "protos"), "-proto", "rallyrobopilot/v1/game.proto"]
    cmd += ["-d", json.dumps(body), address, f"rallyrobopilot.v1.GameService/{method}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    answer: dict[str, object] = json.loads(out.stdout)
    return answer


def test_a_client_written_from_the_protos_alone_verifies_a_lap(game_server: GameServer) -> None:
    """Drive a lap with Evaluate, write its record in JSON from the answer, and verify it: JSON and protos only."""
    keys, _ = drive_lap(load_track("alpine"))
    program = base64.b64encode(keys).decode()
    evaluated = _grpcurl(game_server.address, "Evaluate", {"track": "alpine", "program": {"masks": program}})
    result = evaluated["result"]
    assert isinstance(result, dict) and result["finished"]
    # protobuf's canonical JSON: lowerCamelCase names, 64-bit integers as strings, bytes in base64.
    record = {
        "track": "alpine",
        "keys": program,
        "claimedLapTicks": result["lapTicks"],
        "claimedWallContacts": result.get("wallContacts", 0),
        "claimedFinalState": result["finalState"],
        "driverId": "grpcurl",
        "drivenAt": "2026-12-07T10:30:00Z",
    }
    verdict = _grpcurl(game_server.address, "VerifyLap", {"record": record})["verdict"]
    assert isinstance(verdict, dict) and verdict["verified"] is True, verdict
    forged = {**record, "claimedLapTicks": str(int(str(result["lapTicks"])) - 25)}
    refused = _grpcurl(game_server.address, "VerifyLap", {"record": forged})["verdict"]
    assert isinstance(refused, dict) and refused.get("verified") is not True
    assert refused["refusal"] == "LAP_REFUSAL_LAP_TICKS_MISMATCH" and "claimed lap time" in str(refused["reason"])


def test_record_files_round_trip_and_the_cli_verifies_them(
    tmp_path: Path, game_server: GameServer, oval_lap: LapRecord, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("lap.json", "lap.bin"):
        write_record(record_to_pb(oval_lap), tmp_path / name)
        assert read_record(tmp_path / name) == record_to_pb(oval_lap)
    assert main(["lap", "verify", str(tmp_path / "lap.json")]) == 0
    assert main(["lap", "verify", str(tmp_path / "lap.bin"), "--game", game_server.address]) == 0
    assert "VERIFIED" in capsys.readouterr().out
    write_record(record_to_pb(_forge(oval_lap, claimed_lap_ticks=1)), tmp_path / "forged.json")
    assert main(["lap", "verify", str(tmp_path / "forged.json"), "--game", game_server.address]) == 1
    assert "LAP_REFUSAL_LAP_TICKS_MISMATCH" in capsys.readouterr().out
    (tmp_path / "junk.json").write_text("{not json")
    assert main(["lap", "verify", str(tmp_path / "junk.json")]) == 1
    assert main(["lap", "record", "--track", "kidney", "--out", str(tmp_path / "k.json")]) == 0
    assert main(["lap", "verify", str(tmp_path / "k.json")]) == 0


def test_verify_lap_answers_bytes_that_do_not_decode_invalid_argument(game_server: GameServer) -> None:
    with grpc.insecure_channel(game_server.address) as channel:
        call = channel.unary_unary("/rallyrobopilot.v1.GameService/VerifyLap")
        with pytest.raises(grpc.RpcError) as err:
            call(b"\xff\xff\xff", timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


FLOATS = st.sampled_from([math.nan, math.inf, -math.inf, 1e300, -0.0, 5e-324, 3.5, -3.15]) | st.floats()
UINTS = st.sampled_from([0, 1, 2**32 - 1, 2**40, 2**64 - 1]) | st.integers(0, 2**32 - 1)


@st.composite
def _mutated(draw: st.DrawFn, lap: lap_pb2.LapRecord) -> lap_pb2.LapRecord:
    """A real record with a few of its fields replaced by extreme or random values."""
    msg = lap_pb2.LapRecord()
    msg.CopyFrom(lap)
    for _ in range(draw(st.integers(1, 3))):
        what = draw(st.sampled_from(["keys", "ticks", "contacts", "start", "final", "track", "ids", "date"]))
        if what == "keys":
            msg.keys = draw(st.binary(max_size=600) | st.sampled_from([msg.keys[:-1], msg.keys + b"\x00"]))
        elif what == "ticks":
            msg.claimed_lap_ticks = draw(st.integers(0, 2**64 - 1))
        elif what == "contacts":
            msg.claimed_wall_contacts = draw(st.integers(0, 2**32 - 1))
        elif what in ("start", "final"):
            state = msg.start_state if what == "start" else msg.claimed_final_state
            state.tick = draw(UINTS)
            state.car.x_m, state.car.heading_rad, state.car.speed_m_per_s = draw(FLOATS), draw(FLOATS), draw(FLOATS)
            state.lap.segment, state.lap.wall_contacts = (
                draw(UINTS.map(lambda v: v % 2**32)),
                draw(UINTS.map(lambda v: v % 2**32)),
            )
            state.lap.progress_m, state.lap.finished = draw(FLOATS), draw(st.booleans())
        elif what == "track":
            msg.track = draw(st.sampled_from(["", "kidney", "gen-7", "gen-x", "x" * 65]) | st.text(max_size=10))
        elif what == "ids":
            msg.model_version = draw(st.text(max_size=140))
        else:
            msg.driven_at = draw(
                st.sampled_from(["", "2026-12-07T10:30:00+02:00", "2026-13-01"]) | st.text(max_size=20)
            )
    return msg


@settings(max_examples=60, deadline=None, derandomize=True)
@given(data=st.data())
def test_verify_lap_never_answers_internal_or_unknown(
    game_server: GameServer, oval_lap: LapRecord, data: st.DataObject
) -> None:
    lap = record_to_pb(oval_lap)
    msg = data.draw(_mutated(lap))
    with GameClient(game_server.address, timeout_s=10) as client:
        try:
            verdict = client.verify_lap(msg)
        except grpc.RpcError as err:
            assert err.code() in {
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            }, err
            return
    assert verdict.verified == (verdict.refusal == lap_pb2.LAP_REFUSAL_UNSPECIFIED)
    assert verdict.reason
    if verdict.verified:  # only a record whose claims were left alone verifies
        claims = ("keys", "claimed_lap_ticks", "claimed_wall_contacts", "claimed_final_state")
        assert all(getattr(msg, c) == getattr(lap, c) for c in claims)
