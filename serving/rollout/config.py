"""The gate's and the canary's thresholds: what a candidate must show against the default before it is promoted."""

from __future__ import annotations

from dataclasses import dataclass

from game_server.core.tracks import TRAINING_TRACKS, UNSEEN_TRACKS
from plumbing.errors import InvalidArgument
from plumbing.settings import setting


@dataclass(frozen=True)
class GateConfig:
    """What a candidate must show before any car drives it: thresholds against the default on held-out tracks."""

    tracks: tuple[str, ...] = setting(UNSEEN_TRACKS[:2], "held-out tracks lapped in lockstep (never trained on)")
    max_ticks: int = setting(3000, "tick budget of a gate lap")
    max_p99_ms: float = setting(
        25.0,
        "the candidate's inference p99 must stay under this, ms, or (on a loaded machine) within "
        "--gate-latency-ratio of the default's measured alongside it",
    )
    latency_ratio: float = setting(1.25, "the candidate's p99 allowed, as a multiple of the default's")
    latency_samples: int = setting(200, "inferences per version in the latency probe, interleaved")
    rate_hz: float = setting(
        50.0,
        "gate laps and the latency probe ask the model server at most this often a second, so that the "
        "live cars sharing it keep their real time (0: no limit)",
    )
    lap_time_ratio: float = setting(1.02, "a finished lap may take at most this times the default's")
    progress_tolerance: float = setting(0.02, "on a lap the default does not finish either, the share of it the "
                                        "candidate may fall short of the default's progress")  # fmt: skip
    wall_ratio: float = setting(1.5, "wall-contact ticks allowed, as a multiple of the default's ...")
    wall_allowance: int = setting(25, "... plus this many ticks")

    def __post_init__(self) -> None:
        if not self.tracks:
            raise InvalidArgument("the gate needs at least one held-out track")
        trained = sorted(set(self.tracks) & set(TRAINING_TRACKS))
        if trained:
            raise InvalidArgument(f"gate tracks {', '.join(trained)} are training tracks: the gate needs held-out ones")


@dataclass(frozen=True)
class CanaryConfig:
    """The live trial: a share of the cars drive the candidate until enough of its laps are in."""

    share: float = setting(0.5, "share of the autopilots' cars that drive the candidate (at least one car)")
    laps: int = setting(2, "candidate laps to wait for before deciding")
    max_s: float = setting(300.0, "decide after this long even with fewer laps (none: roll back)")
    live: tuple[str, ...] = setting(
        (), "metrics URLs of the autopilots (http://HOST:PORT/metrics), read for live figures", metavar="URL[,URL]"
    )
    prometheus: str = setting("", "a Prometheus (http://HOST:PORT) to read the autopilots' figures from instead")
    cars: int = setting(0, "cars the deployer races itself on the routing during the canary (0: the autopilots')")
    track: str = setting("kidney", "track of the deployer's own canary cars")
    max_ticks: int = setting(3000, "tick budget of a lap of the deployer's own canary cars")
    completion_tolerance: float = setting(0.25, "candidate laps finished may fall this far below the default's share")
    lap_time_ratio: float = setting(1.05, "mean finished lap time allowed, as a multiple of the default's")
    max_fallback_rate: float = setting(0.10, "ticks on the fallback command, as a share of the candidate's ticks")
    max_missed_rate: float = setting(0.002, "missed ticks, as a share of the candidate's ticks")
    max_error_rate: float = setting(0.01, "failed inferences, as a share of the candidate's ticks")
    drain_s: float = setting(1.0, "after a rollback, how long the candidate stays registered for laps to move off it")

    def __post_init__(self) -> None:
        if not 0.0 < self.share <= 1.0:
            raise InvalidArgument("the canary share must be in (0, 1]")
        if self.laps < 1 or self.max_s <= 0:
            raise InvalidArgument("the canary needs at least one lap and a positive time limit")
