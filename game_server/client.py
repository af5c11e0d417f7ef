"""A typed client of GameService, with a deadline on every call."""

from __future__ import annotations

import contextlib
import logging
import queue
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import grpc
import numpy as np

from game_server.core.lap import LapWatch
from plumbing import telemetry
from plumbing.channels import ClientTLS, open_channel
from rallyrobopilot.v1 import game_pb2, game_pb2_grpc, lap_pb2, sim_pb2

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 8 * 1024 * 1024


def channel_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]


def frame_array(frame: sim_pb2.Frame) -> np.ndarray:
    """The frame's pixels as an (H, W, 3) uint8 array."""
    return np.frombuffer(frame.rgb, dtype=np.uint8).reshape(frame.height_px, frame.width_px, 3)


def watch_observation(watch: LapWatch, obs: sim_pb2.Observation) -> bool:
    """Feeds an observation to a lap's stop rules; True when the lap stops there."""
    s = obs.state
    return watch.observe(
        int(s.tick), obs.progress_fraction, int(s.lap.wall_contacts), s.lap.finished, int(obs.lap_ticks)
    )


@dataclass
class DriveStep:
    """What the policy of a lockstep Drive sees each tick."""

    observation: sim_pb2.Observation


class WatchStream(Protocol):
    """A WatchSession stream: its messages, and `cancel()` to end it."""

    def __iter__(self) -> Iterator[game_pb2.WatchSessionResponse]: ...

    def __next__(self) -> game_pb2.WatchSessionResponse: ...

    def cancel(self) -> bool: ...


class GameClient:
    """Thin wrapper over the generated stub; `timeout_s` bounds every unary call; TLS when `tls` has a CA.

    Every call of one client goes to one server, even when `address` names several (a headless Service): a
    session lives on the server that created it."""

    def __init__(self, address: str, timeout_s: float = 30.0, tls: ClientTLS | None = None) -> None:
        self.address = address
        self.timeout_s = timeout_s
        channel = open_channel(address, tls, channel_options(), spread=False)
        self.channel = telemetry.instrument_channel(channel)
        self.stub = game_pb2_grpc.GameServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> GameClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def list_tracks(self) -> list[sim_pb2.TrackSummary]:
        return list(self.stub.ListTracks(game_pb2.ListTracksRequest(), timeout=self.timeout_s).tracks)

    def get_track(self, name: str) -> sim_pb2.Track:
        return self.stub.GetTrack(game_pb2.GetTrackRequest(track=name), timeout=self.timeout_s).track

    def verify_lap(self, record: lap_pb2.LapRecord) -> lap_pb2.LapVerdict:
        return self.stub.VerifyLap(game_pb2.VerifyLapRequest(record=record), timeout=self.timeout_s).verdict

    def create_session(
        self, track: str, frame_options: sim_pb2.FrameOptions | None = None
    ) -> game_pb2.CreateSessionResponse:
        req = game_pb2.CreateSessionRequest(track=track, frame_options=frame_options)
        return self.stub.CreateSession(req, timeout=self.timeout_s)

    def close_session(self, session_id: str) -> None:
        self.stub.CloseSession(game_pb2.CloseSessionRequest(session_id=session_id), timeout=self.timeout_s)

    @contextlib.contextmanager
    def session(
        self, track: str, frame_options: sim_pb2.FrameOptions | None = None
    ) -> Iterator[game_pb2.CreateSessionResponse]:
        """A session open for the `with` block and closed after it, however the block ends.

        A close that fails (the server gone, the session reaped as idle) is logged, not raised: the server
        frees the session itself, and the block's own outcome or error is what the caller needs."""
        created = self.create_session(track, frame_options)
        try:
            yield created
        finally:
            try:
                self.close_session(created.session_id)
            except grpc.RpcError as exc:
                log.warning("session %s on %s not closed: %s", created.session_id, self.address, exc)

    def reset(
        self, session_id: str, state: sim_pb2.SimState | None = None, with_frame: bool = False
    ) -> sim_pb2.Observation:
        req = game_pb2.ResetRequest(session_id=session_id, state=state, with_frame=with_frame)
        return self.stub.Reset(req, timeout=self.timeout_s).observation

    def step(self, session_id: str, masks: bytes, with_frame: bool = False) -> sim_pb2.Observation:
        req = game_pb2.StepRequest(
            session_id=session_id, controls=sim_pb2.ControlProgram(masks=masks), with_frame=with_frame
        )
        return self.stub.Step(req, timeout=self.timeout_s).observation

    def server_info(self) -> game_pb2.GetServerInfoResponse:
        return self.stub.GetServerInfo(game_pb2.GetServerInfoRequest(), timeout=self.timeout_s)

    def evaluate(
        self,
        track: str,
        masks: bytes,
        *,
        start_state: sim_pb2.SimState | None = None,
        finish_gate: sim_pb2.Gate | None = None,
        max_ticks: int = 0,
        return_trajectory: bool = False,
        timeout_s: float | None = None,
    ) -> game_pb2.EvaluateResponse:
        req = game_pb2.EvaluateRequest(
            track=track,
            program=sim_pb2.ControlProgram(masks=masks),
            start_state=start_state,
            finish_gate=finish_gate,
            max_ticks=max_ticks,
            return_trajectory=return_trajectory,
        )
        return self.stub.Evaluate(req, timeout=timeout_s or self.timeout_s)

    def watch(self, session_id: str = "", max_rate_hz: int = 0, timeout_s: float | None = None) -> WatchStream:
        """A session's newest states as it is driven (the oldest open session when `session_id` is empty);
        the returned stream is also a call: `cancel()` ends it."""
        req = game_pb2.WatchSessionRequest(session_id=session_id, max_rate_hz=max_rate_hz)
        return self.stub.WatchSession(req, timeout=timeout_s)

    def drive_lockstep(
        self,
        session_id: str,
        policy: Callable[[sim_pb2.Observation], int | None],
        first: sim_pb2.Observation,
        *,
        with_frames: bool = False,
        timeout_s: float = 600.0,
    ) -> Iterator[game_pb2.DriveResponse]:
        """Drives tick by tick: `policy` maps the last observation to a mask, or None to stop."""
        outbox: queue.SimpleQueue[game_pb2.DriveRequest | None] = queue.SimpleQueue()
        outbox.put(
            game_pb2.DriveRequest(
                start=game_pb2.DriveStart(
                    session_id=session_id, mode=game_pb2.DRIVE_MODE_LOCKSTEP, with_frames=with_frames
                )
            )
        )

        def requests() -> Iterator[game_pb2.DriveRequest]:
            while (item := outbox.get()) is not None:
                yield item

        def command(obs: sim_pb2.Observation) -> bool:
            mask = policy(obs)
            if mask is None:
                outbox.put(None)
                return False
            controls = sim_pb2.Controls(
                forward=bool(mask & 1), back=bool(mask & 2), left=bool(mask & 4), right=bool(mask & 8)
            )
            outbox.put(game_pb2.DriveRequest(command=game_pb2.DriveCommand(tick=obs.state.tick, controls=controls)))
            return True

        responses = self.stub.Drive(requests(), timeout=timeout_s)
        if not command(first):
            responses.cancel()
            return
        for response in responses:
            yield response
            if not command(response.observation):
                break
        # Half-close and let the server end the stream, rather than cancelling it.
        outbox.put(None)
        for _ in responses:
            pass
