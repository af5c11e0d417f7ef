"""The canary: a share of the cars drive the candidate while the deployer reads both versions' live figures."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

from plumbing.channels import ClientTLS
from plumbing.errors import FailedPrecondition
from serving.archive import archive_info
from serving.client import InferenceClient
from serving.registry import ModelVersion, Registry, Router
from serving.rollout.config import CanaryConfig
from serving.rollout.judges import judge_canary, window
from serving.rollout.live import LiveFigures
from serving.rollout.records import CanaryFigures, LiveOutcome, StepResult

log = logging.getLogger(__name__)


class Canary:
    """One canary run: the routing sends the candidate a share of the cars until enough of its laps are in."""

    def __init__(
        self, config: CanaryConfig, registry: Registry, connect: Callable[[str, str], InferenceClient],
        games: Callable[[], tuple[str, ...]], stop: threading.Event, leaderboard: str = "",
        game_tls: ClientTLS | None = None,
    ) -> None:  # fmt: skip
        self.config, self.registry, self.connect, self.games, self.stop = config, registry, connect, games, stop
        self.game_tls = game_tls
        self.leaderboard = leaderboard  # a Redis URL: the own cars' finished laps go there, verified

    def run(self, candidate: ModelVersion) -> StepResult:
        """The candidate's live window against the default's, judged and kept on its version."""
        c = self.config
        routing = self.registry.routing()
        if routing is None:
            raise FailedPrecondition("no routing: the model store has no default version")
        live = LiveFigures(c.live, c.prometheus, own=c.cars > 0)
        before = live.snapshot()
        staged = tuple(v for v in routing.staged if v != candidate.version)
        self.registry.set_routing(replace(routing, canary=candidate.version, canary_share=c.share, staged=staged))
        t0 = time.monotonic()
        with self._own_cars():
            while True:
                now = live.snapshot()
                cand = window(before, now, candidate.version)
                if cand.laps >= c.laps or time.monotonic() - t0 > c.max_s or self.stop.is_set():
                    break
                self.stop.wait(1.0)
        if self.stop.is_set():
            raise FailedPrecondition("stopped during the canary: it starts again when the deployer does")
        base = window(before, now, routing.default)
        failures = judge_canary(cand, base, c)
        self.registry.update(candidate.id, live=LiveOutcome(cand, base, passed=not failures))
        figures = CanaryFigures(cand, base, round(time.monotonic() - t0, 1), failures)
        reason = "canary: " + "; ".join(failures) if failures else "canary: live figures held up"
        return StepResult(not failures, reason, figures)

    @contextlib.contextmanager
    def _own_cars(self) -> Iterator[None]:
        """The deployer's own cars on the routing, for a canary without autopilots (tests, one machine)."""
        c = self.config
        if c.cars <= 0:
            yield
            return
        from serving.autopilot import AutopilotConfig, run_autopilot

        routing = self.registry.routing()
        assert routing is not None
        size = archive_info(self.registry.model_store / self.registry.by_version(routing.default).archive)["input"]
        pilot = AutopilotConfig(
            track=c.track,
            cars=c.cars,
            laps=10_000,
            max_ticks=c.max_ticks,
            width=size["width"],
            height=size["height"],
            leaderboard=self.leaderboard,
        )
        stop = threading.Event()
        router = Router(self.registry.routing_path)
        errors: list[BaseException] = []

        def race() -> None:
            try:
                run_autopilot(pilot, self.games(), stop=stop, router=router,
                              connect_version=lambda version: self.connect(routing.name, version),
                              game_tls=self.game_tls)  # fmt: skip
            except BaseException as exc:  # reported after the canary
                errors.append(exc)

        thread = threading.Thread(target=race, name="canary-cars", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=150.0)
        if errors:
            log.warning("the deployer's canary cars stopped: %s", errors[0])
