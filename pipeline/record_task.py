"""RecordTask: one recording episode as a scheduler task, so that EvaluationPool spreads them over game servers."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from game_server import convert
from game_server.core.driver_file import SavedDriver
from game_server.core.state import SimState
from game_server.recording import COLLECTOR_OUTAGE_BUDGET_S, ENCODINGS, EncodingName, record_in_process
from plumbing.errors import DomainError, status_name
from plumbing.settings import setting
from rallyrobopilot.v1 import game_pb2, sim_pb2
from scheduler.tasks import EvaluationError

# Deadline of a Record call: rendering and streaming take about 2 ms a tick on one core; leave room for a
# busy machine and for a collector or Redis outage the game server's producer rides out.
RECORD_BASE_TIMEOUT_S = 30.0 + COLLECTOR_OUTAGE_BUDGET_S
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
    recovering: bool = False  # the driver races inside the recovering teacher, whatever the settings say


@dataclass(frozen=True)
class RecordSettings:
    """What every episode of a collection shares."""

    collector_address: str = setting("", "collector host:port", cli=False)
    max_ticks: int = setting(3000, "ticks per episode at most (it stops at the finish)")
    encoding: EncodingName = setting("png", "image encoding of the frames")
    jpeg_quality: int = setting(0, "JPEG quality 1..100; 0: the game server's default (90)")
    width_px: int = setting(128, "frame width, pixels", flag="width", env="width")
    height_px: int = setting(96, "frame height, pixels", flag="height", env="height")
    domain_randomization: bool = setting(True, "domain randomisation of the frames", flag="randomize")
    perturb_probability: float = setting(0.04, "per-tick probability that a perturbation of the controls starts")
    perturb_max_ticks: int = setting(12, "longest perturbation, ticks")
    # Off for `rrp collect` (its labels are the driver's own); on in the main job, where with the barriers'
    # colours and the crawl-scale speed the student learns the teacher's reversals (docs/vision.md).
    recovering: bool = setting(
        False, "drivers race inside the recovering teacher, which labels the way out of walls and wrong-way states"
    )
    labels: tuple[tuple[str, str], ...] = setting((), "labels stored with every run", cli=False)


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
            encoding=ENCODINGS[s.encoding],  # type: ignore[arg-type]
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
            request.driver.CopyFrom(
                sim_pb2.DriverParams(kind=d.kind, params=d.params, recovering=s.recovering or episode.recovering)
            )
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
            response = record_in_process(self.request(episode))
        except DomainError as exc:
            raise EvaluationError(grpc.StatusCode[status_name(exc)], str(exc)) from exc
        return self.result(response)

    def __repr__(self) -> str:
        return f"RecordTask(collector={self.settings.collector_address!r}, max_ticks={self.settings.max_ticks})"
