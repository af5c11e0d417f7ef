"""RecordTask: one recording episode as a scheduler task, so that EvaluationPool spreads them over game servers."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from game_server import convert
from game_server.core.state import SimState
from plumbing.errors import DomainError, status_name
from rallyrobopilot.v1 import collector_pb2, game_pb2, sim_pb2
from scheduler.tasks import EvaluationError
from trainer.driver_file import SavedDriver

if TYPE_CHECKING:
    from game_server.servicer import GameServicer

# Deadline of a Record call: rendering and streaming take about 2 ms a tick on one core; leave room for a
# busy machine and for reconnections to the collector.
RECORD_BASE_TIMEOUT_S = 30.0
RECORD_TIMEOUT_PER_TICK_S = 0.05


@dataclass(frozen=True)
class Episode:
    """What varies from one recorded episode to the next."""

    run_id: str
    track: str
    driver: SavedDriver
    perturbation_seed: int
    randomization_seed: int
    # None: the track's base state (a whole lap); otherwise a recovery episode from this state.
    start: SimState | None = None
    max_ticks: int = 0  # 0: the settings' max_ticks


@dataclass(frozen=True)
class RecordSettings:
    """What every episode of a collection shares."""

    collector_address: str
    max_ticks: int = 3000
    encoding: int = collector_pb2.IMAGE_ENCODING_PNG
    jpeg_quality: int = 0
    width_px: int = 128
    height_px: int = 96
    domain_randomization: bool = True
    perturb_probability: float = 0.0
    perturb_max_ticks: int = 12
    labels: tuple[tuple[str, str], ...] = ()


@functools.cache
def _local_servicer() -> GameServicer:
    # The game server's own Record handler with this process's renderer, so that running a task in process
    # records exactly what a server would; imported late because the scheduler never records itself.
    from game_server.game import Game, GameConfig
    from game_server.render import shared_renderer
    from game_server.servicer import GameServicer

    return GameServicer(Game(GameConfig(), shared_renderer))


class RecordTask:
    """Records one Episode through GameService.Record; its result is the RecordResponse."""

    method = "Record"

    def __init__(self, settings: RecordSettings) -> None:
        self.settings = settings
        self.timeout_s = RECORD_BASE_TIMEOUT_S + settings.max_ticks * RECORD_TIMEOUT_PER_TICK_S

    def request(self, episode: Episode) -> game_pb2.RecordRequest:
        s, d = self.settings, episode.driver
        request = game_pb2.RecordRequest(
            run_id=episode.run_id,
            track=episode.track,
            max_ticks=episode.max_ticks or s.max_ticks,
            frame_options=sim_pb2.FrameOptions(
                width_px=s.width_px,
                height_px=s.height_px,
                domain_randomization=s.domain_randomization,
                randomization_seed=episode.randomization_seed,
            ),
            encoding=s.encoding,  # type: ignore[arg-type]
            jpeg_quality=s.jpeg_quality,
            collector_address=s.collector_address,
            driver_id=d.driver_id,
            labels={**dict(s.labels), "driver_kind": d.kind, "driver_track": d.track},
        )
        if episode.start is not None:
            request.start_state.CopyFrom(convert.state_to_pb(episode.start))
        if d.kind == "program":
            # Open loop: its labels only fit the states of its own unperturbed lap.
            if episode.track != d.track:
                raise ValueError(f"program {d.driver_id} was evolved on {d.track}, not {episode.track}")
            request.program.masks = d.masks
        else:
            request.driver.CopyFrom(sim_pb2.DriverParams(kind=d.kind, params=d.params))
            if s.perturb_probability > 0:
                request.perturbation.CopyFrom(
                    game_pb2.Perturbation(
                        seed=episode.perturbation_seed,
                        start_probability=s.perturb_probability,
                        max_duration_ticks=s.perturb_max_ticks,
                    )
                )
        return request

    def result(self, response: game_pb2.RecordResponse) -> game_pb2.RecordResponse:
        return response

    def __call__(self, episode: Episode) -> game_pb2.RecordResponse:
        """Records in this process, as a server would; a task's error raises EvaluationError, as remotely."""
        try:
            # GameServicer.Record reads nothing from its context.
            response: game_pb2.RecordResponse = _local_servicer().Record(self.request(episode), None)
        except DomainError as exc:
            raise EvaluationError(grpc.StatusCode[status_name(exc)], str(exc)) from exc
        return self.result(response)

    def __repr__(self) -> str:
        return f"RecordTask(collector={self.settings.collector_address!r}, max_ticks={self.settings.max_ticks})"
