"""The autopilot's Prometheus metrics (`rrp_autopilot_*`), one series per model version; `--metrics-port`."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from plumbing.metrics import LATENCY_BUCKETS_S

# Lap times of a built-in track lie between ~20 s and the 120 s tick budget.
LAP_BUCKETS_S = (10.0, 15.0, 20.0, 22.5, 25.0, 27.5, 30.0, 32.5, 35.0, 40.0, 45.0, 50.0, 60.0, 75.0, 90.0, 120.0)

LAPS = Counter("rrp_autopilot_laps_total", "laps driven, finished or not", ["version", "finished"])
LAP_SECONDS = Histogram(
    "rrp_autopilot_lap_seconds", "lap time of finished laps, simulated seconds", ["version"], buckets=LAP_BUCKETS_S
)
WALL_CONTACTS = Counter("rrp_autopilot_wall_contacts_total", "ticks spent touching a wall", ["version"])
INFERENCE = Histogram(
    "rrp_autopilot_inference_seconds", "one inference, request to answer (answered ones)", ["version"],
    buckets=LATENCY_BUCKETS_S,
)  # fmt: skip
INFERENCE_ERRORS = Counter(
    "rrp_autopilot_inference_errors_total", "inferences that failed (not counting late ones)", ["version"]
)
FALLBACKS = Counter(
    "rrp_autopilot_fallbacks_total", "ticks driven on the fallback command (inference late or failed)", ["version"]
)
MISSED_TICKS = Counter(
    "rrp_autopilot_missed_ticks_total", "ticks the game server simulated without a command of their own", ["version"]
)
TICKS = Counter("rrp_autopilot_ticks_total", "ticks driven", ["version"])
SAFE_TICKS = Counter(
    "rrp_autopilot_safe_ticks_total", "ticks driven coasting because no model server answered", ["version"]
)
FAILOVERS = Counter(
    "rrp_autopilot_failovers_total", "calls handed to another model-server replica", ["from_server", "to_server"]
)
STUCK_CALLS = Counter(
    "rrp_autopilot_stuck_calls_total",
    "replica clients connected again after a call went unanswered for seconds",
    ["server"],
)
MODEL_SERVER_UP = Gauge(
    "rrp_autopilot_model_server_up", "1 when the replica answered the autopilot's last call to it, 0 when unavailable",
    ["server"],
)  # fmt: skip


class VersionMeter:
    """The series of one model version, and a lap's counts so far (the game server reports running totals)."""

    def __init__(self, version: str) -> None:
        self.version = version or "default"
        self.inference = INFERENCE.labels(self.version)
        self.fallbacks = FALLBACKS.labels(self.version)
        self.inference_errors = INFERENCE_ERRORS.labels(self.version)
        self.safe_ticks = SAFE_TICKS.labels(self.version)
        self._ticks = TICKS.labels(self.version)
        self._missed = MISSED_TICKS.labels(self.version)
        self._tick = 0
        self._missed_so_far = 0

    def tick(self, tick: int, missed_so_far: int = 0) -> None:
        """The lap reached `tick`, with `missed_so_far` missed ticks in all."""
        if tick > self._tick:
            self._ticks.inc(tick - self._tick)
            self._tick = tick
        if missed_so_far > self._missed_so_far:
            self._missed.inc(missed_so_far - self._missed_so_far)
            self._missed_so_far = missed_so_far

    def lap(self, finished: bool, lap_s: float, wall_contacts: int) -> None:
        LAPS.labels(self.version, "true" if finished else "false").inc()
        if finished:
            LAP_SECONDS.labels(self.version).observe(lap_s)
        WALL_CONTACTS.labels(self.version).inc(wall_contacts)


class _Nothing:
    def inc(self, amount: float = 1.0) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass


class UncountedMeter(VersionMeter):
    """A meter that counts nothing: the deployer's gate laps are not live traffic, and must not look like it."""

    def __init__(self, version: str) -> None:
        self.version = version or "default"
        self.inference = self.fallbacks = self.inference_errors = _Nothing()  # type: ignore[assignment]
        self._ticks = self._missed = _Nothing()  # type: ignore[assignment]
        self._tick = self._missed_so_far = 0

    def lap(self, finished: bool, lap_s: float, wall_contacts: int) -> None:
        pass


REROUTES = Counter(
    "rrp_autopilot_reroutes_total", "laps moved mid-lap off a version the routing dropped", ["from_version", "to"]
)

# The deployer's series: where a rollout stands and what it decided.
DEPLOY_STAGES = ("idle", "register", "gate", "canary", "promote", "rollback")
DEPLOY_STAGE = Gauge("rrp_deployer_stage", "1 for the stage the current rollout is in", ["stage"])
DEPLOY_DECISIONS = Counter("rrp_deployer_decisions_total", "rollouts decided", ["decision"])
DEPLOY_SECONDS = Histogram(
    "rrp_deployer_stage_seconds", "time spent in each stage of a rollout", ["stage"],
    buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
)  # fmt: skip


def set_stage(stage: str) -> None:
    for s in DEPLOY_STAGES:
        DEPLOY_STAGE.labels(s).set(1.0 if s == stage else 0.0)
