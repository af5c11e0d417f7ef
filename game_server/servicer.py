"""GameService over gRPC: converts messages to core calls and back; errors map to codes in plumbing.bootstrap."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc
import numpy as np

from game_server import convert, metrics
from game_server.core.state import SimState
from game_server.core.track import Track
from game_server.core.tracks import builtin_tracks, load_track
from game_server.evaluation import MAX_BATCH, evaluate_batch, evaluation_args, evaluation_response
from game_server.game import DriveEvent, Game, Observation, RaceBatch
from game_server.laps import verify_record_pb
from game_server.recording import OpenProducer, connect_collector, outcome_to_pb, record_episode, spec_from_pb
from game_server.render import FrameSpec
from plumbing import __version__
from plumbing.errors import FailedPrecondition, InvalidArgument
from rallyrobopilot.v1 import game_pb2, game_pb2_grpc, sim_pb2


def observation_to_pb(obs: Observation) -> sim_pb2.Observation:
    msg = sim_pb2.Observation(
        state=convert.state_to_pb(obs.state),
        rays_m=obs.rays,
        progress_fraction=obs.progress_fraction,
        wall_contact=obs.wall_contact,
        lap_ticks=obs.lap_ticks,
    )
    if obs.frame is not None:
        msg.frame.CopyFrom(convert.frame_to_pb(obs.frame))
    return msg


def _drive_event_to_pb(e: DriveEvent) -> game_pb2.DriveResponse:
    return game_pb2.DriveResponse(
        observation=observation_to_pb(e.observation),
        applied_tick=e.applied_tick,
        late_commands=e.late_commands,
        missed_ticks=e.missed_ticks,
        applied_controls=convert.mask_to_controls(e.applied_mask),
    )


def _commands(requests: Iterator[game_pb2.DriveRequest]) -> Iterator[tuple[int, int]]:
    for req in requests:
        if req.WhichOneof("kind") != "command":
            raise FailedPrecondition("a Drive stream takes exactly one start message, first")
        yield req.command.tick, convert.controls_to_mask(req.command.controls)


def _race_batches(requests: Iterator[game_pb2.RaceRequest]) -> Iterator[RaceBatch]:
    for req in requests:
        if req.WhichOneof("kind") != "commands":
            raise FailedPrecondition("a Race stream takes exactly one start message, first")
        batch = req.commands
        yield (
            [(c.car, c.command.tick, convert.controls_to_mask(c.command.controls)) for c in batch.commands],
            list(batch.leave),
        )


def _left(context: grpc.ServicerContext | None) -> Callable[[], bool]:
    """True once the caller cancelled or its deadline passed: the work it asked for then stops.

    In-process callers (local runs of the same tasks) pass no context and never leave."""
    if context is None:
        return lambda: False
    return lambda: not context.is_active()


# Room kept in a reply for the message's own framing beside its items.
_REPLY_MARGIN_BYTES = 64 * 1024


class GameServicer(game_pb2_grpc.GameServiceServicer):
    def __init__(
        self, game: Game, max_message_bytes: int = 8 * 1024 * 1024, open_producer: OpenProducer = connect_collector
    ) -> None:
        self.game = game
        self.open_producer = open_producer  # how a Record call reaches the collector it names
        self.max_reply_bytes = max_message_bytes - _REPLY_MARGIN_BYTES

    def ListTracks(
        self, request: game_pb2.ListTracksRequest, context: grpc.ServicerContext
    ) -> game_pb2.ListTracksResponse:
        return game_pb2.ListTracksResponse(tracks=[convert.track_summary(t) for t in builtin_tracks()])

    def GetTrack(self, request: game_pb2.GetTrackRequest, context: grpc.ServicerContext) -> game_pb2.GetTrackResponse:
        return game_pb2.GetTrackResponse(track=convert.track_to_pb(load_track(request.track)))

    def CreateSession(
        self, request: game_pb2.CreateSessionRequest, context: grpc.ServicerContext
    ) -> game_pb2.CreateSessionResponse:
        w, h = convert.frame_size(request.frame_options)
        spec = FrameSpec(
            width=w,
            height=h,
            randomize=request.frame_options.domain_randomization,
            seed=request.frame_options.randomization_seed,
        )
        session, obs = self.game.create_session(request.track, spec)
        return game_pb2.CreateSessionResponse(
            session_id=session.session_id,
            observation=observation_to_pb(obs),
            idle_timeout_s=int(self.game.config.idle_timeout_s),
        )

    def CloseSession(
        self, request: game_pb2.CloseSessionRequest, context: grpc.ServicerContext
    ) -> game_pb2.CloseSessionResponse:
        self.game.sessions.close(request.session_id)
        return game_pb2.CloseSessionResponse()

    def Reset(self, request: game_pb2.ResetRequest, context: grpc.ServicerContext) -> game_pb2.ResetResponse:
        state = convert.state_from_pb(request.state) if request.HasField("state") else None
        obs = self.game.reset(request.session_id, state, request.with_frame)
        return game_pb2.ResetResponse(observation=observation_to_pb(obs))

    def Step(self, request: game_pb2.StepRequest, context: grpc.ServicerContext) -> game_pb2.StepResponse:
        obs = self.game.step(request.session_id, request.controls.masks, request.with_frame)
        metrics.TICKS.labels("Step").inc(len(request.controls.masks))
        return game_pb2.StepResponse(observation=observation_to_pb(obs))

    def Drive(
        self, request_iterator: Iterator[game_pb2.DriveRequest], context: grpc.ServicerContext
    ) -> Iterator[game_pb2.DriveResponse]:
        first = next(request_iterator, None)
        if first is None:
            return
        if first.WhichOneof("kind") != "start":
            raise FailedPrecondition("the first message of a Drive stream must be a start")
        start = first.start
        commands = _commands(request_iterator)
        if start.mode == game_pb2.DRIVE_MODE_LOCKSTEP:
            events = self.game.drive_lockstep(start.session_id, commands, start.with_frames)
        elif start.mode == game_pb2.DRIVE_MODE_REALTIME:
            events = self.game.drive_realtime(
                start.session_id, commands, start.with_frames, start.max_ticks, is_active=context.is_active
            )
        else:
            raise InvalidArgument("Drive mode must be LOCKSTEP or REALTIME")
        ticks, late, missed = metrics.TICKS.labels("Drive"), 0, 0
        for event in events:
            ticks.inc()
            if event.late_commands != late or event.missed_ticks != missed:  # counts so far: add what is new
                metrics.LATE_COMMANDS.inc(event.late_commands - late)
                metrics.MISSED_TICKS.inc(event.missed_ticks - missed)
                late, missed = event.late_commands, event.missed_ticks
            yield _drive_event_to_pb(event)

    def Race(
        self, request_iterator: Iterator[game_pb2.RaceRequest], context: grpc.ServicerContext
    ) -> Iterator[game_pb2.RaceResponse]:
        first = next(request_iterator, None)
        if first is None:
            return
        if first.WhichOneof("kind") != "start":
            raise FailedPrecondition("the first message of a Race stream must be a start")
        start = first.start
        events = self.game.drive_race(
            list(start.session_ids), _race_batches(request_iterator), start.with_frames, start.max_ticks,
            is_active=context.is_active,
        )  # fmt: skip
        ticks, late, missed = metrics.TICKS.labels("Race"), 0, 0
        for cars in events:
            ticks.inc(len(cars))
            tick_late, tick_missed = sum(e.late_commands for _, e in cars), sum(e.missed_ticks for _, e in cars)
            # Counts so far of the cars still racing; a car that left takes its counts with it (not subtracted).
            metrics.LATE_COMMANDS.inc(max(tick_late - late, 0))
            metrics.MISSED_TICKS.inc(max(tick_missed - missed, 0))
            late, missed = tick_late, tick_missed
            yield game_pb2.RaceResponse(cars=[game_pb2.RaceCar(car=k, drive=_drive_event_to_pb(e)) for k, e in cars])

    def EvaluateBatch(
        self, request: game_pb2.EvaluateBatchRequest, context: grpc.ServicerContext
    ) -> game_pb2.EvaluateBatchResponse:
        if not 1 <= len(request.tasks) <= MAX_BATCH:
            raise InvalidArgument(f"a batch holds 1..{MAX_BATCH} tasks, got {len(request.tasks)}")
        with self.game.evaluation_slot():
            response = evaluate_batch(request.tasks, self.max_reply_bytes, _left(context))
        ticks = sum(item.response.result.ticks for item in response.items if item.HasField("response"))
        metrics.TICKS.labels("EvaluateBatch").inc(ticks)
        return response

    def GetServerInfo(
        self, request: game_pb2.GetServerInfoRequest, context: grpc.ServicerContext
    ) -> game_pb2.GetServerInfoResponse:
        return game_pb2.GetServerInfoResponse(
            evaluate_slots=self.game.config.evaluate_slots,
            evaluate_running=self.game.evaluate_running,
            max_sessions=self.game.config.max_sessions,
            open_sessions=len(self.game.sessions),
            version=__version__,
        )

    def Evaluate(self, request: game_pb2.EvaluateRequest, context: grpc.ServicerContext) -> game_pb2.EvaluateResponse:
        track, start, policy, gate = evaluation_args(request)
        result = self.game.evaluate(
            track, start, policy, gate, request.max_ticks, request.return_trajectory, _left(context)
        )
        metrics.TICKS.labels("Evaluate").inc(result.ticks)
        return evaluation_response(result, request.return_trajectory)

    def Record(self, request: game_pb2.RecordRequest, context: grpc.ServicerContext) -> game_pb2.RecordResponse:
        spec = spec_from_pb(request)
        with self.game.evaluation_slot():
            # The renderer is looked up at the first frame, so that a request refused by validation never
            # starts one.
            def render(track: Track, state: SimState, frame: FrameSpec) -> np.ndarray:
                return self.game.renderer().render(track, state, frame)

            outcome = record_episode(spec, render, self.open_producer, stop=_left(context))
        metrics.TICKS.labels("Record").inc(outcome.result.ticks)
        return outcome_to_pb(outcome)

    def WatchSession(
        self, request: game_pb2.WatchSessionRequest, context: grpc.ServicerContext
    ) -> Iterator[game_pb2.WatchSessionResponse]:
        for event in self.game.watch(request.session_id, request.max_rate_hz, is_active=context.is_active):
            yield game_pb2.WatchSessionResponse(
                session_id=event.session_id,
                track=event.track,
                state=convert.state_to_pb(event.state),
                progress_fraction=event.progress_fraction,
                skipped_states=event.skipped_states,
            )

    def VerifyLap(
        self, request: game_pb2.VerifyLapRequest, context: grpc.ServicerContext
    ) -> game_pb2.VerifyLapResponse:
        with self.game.evaluation_slot():
            verdict = verify_record_pb(request.record, _left(context))
        metrics.TICKS.labels("VerifyLap").inc(verdict.replayed.ticks)
        return game_pb2.VerifyLapResponse(verdict=verdict)
