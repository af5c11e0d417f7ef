"""The gate: before any car drives it, the candidate laps held-out tracks in lockstep against the default, and both
versions' inference p99 is measured over the same frames."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from game_server.core.state import TICK_S
from game_server.leaderboard import Leaderboard, drive_lap_record, submit_lap
from plumbing.channels import ClientTLS
from serving.archive import archive_info
from serving.client import InferenceClient
from serving.registry import ModelVersion, Registry
from serving.rollout.config import GateConfig
from serving.rollout.judges import judge_lap, judge_latency
from serving.rollout.records import GateFigures, GateLap, GateOutcome, GatePair, StepResult

WARMUP_INFERENCES = 10  # a fresh worker's first answers are slow: the budget is for the steady state
Spans = Callable[..., contextlib.AbstractContextManager[Any]]  # span(name, **attributes)


def _percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


def lap_data_source(version: ModelVersion) -> str:
    """Where a version's training data came from, as its leaderboard laps say it."""
    source = version.data.get("source") if isinstance(version.data, dict) else None
    return f"version {version.version}: {source}" if source else f"version {version.version}"


class Gate:
    """One gate run: the candidate's laps and latency against the default's, its outcome kept on both versions."""

    def __init__(
        self, config: GateConfig, registry: Registry, connect: Callable[[ModelVersion], InferenceClient],
        game: Callable[[], str], span: Spans, board: Leaderboard | None = None, game_tls: ClientTLS | None = None,
    ) -> None:  # fmt: skip
        self.config, self.registry, self.connect, self.game, self.span = config, registry, connect, game, span
        self.game_tls = game_tls
        self.board = board  # every finished gate lap goes to it, verified before it is stored

    def run(self, candidate: ModelVersion, default: ModelVersion) -> StepResult:
        """Both versions registered; the candidate's gate, judged and kept on its version."""
        g = self.config
        failures: list[str] = []
        laps = []
        for track in g.tracks:
            base = self._baseline(default, track)
            cand = self.lap(candidate, track)
            failures += judge_lap(cand, base, g)
            laps.append(GatePair(track, cand, base))
        p99, base_p99 = self._latency(candidate, default)
        failures += judge_latency(p99, base_p99, g)
        outcome = GateOutcome(passed=not failures, failures=failures, inference_ms_p99=round(p99, 2),
                              laps={self._key(lap.track): lap.candidate for lap in laps})  # fmt: skip
        self.registry.update(candidate.id, gate=outcome)
        figures = GateFigures(laps, round(p99, 2), round(base_p99, 2), failures)
        reason = "gate: " + "; ".join(failures) if failures else "gate: at least as good as the default"
        return StepResult(not failures, reason, figures)

    def _key(self, track: str) -> str:
        return f"{track}@{self.config.max_ticks}"

    def lap(self, version: ModelVersion, track: str) -> GateLap:
        """One lockstep lap of `track` driven by `version`, left out of the live metrics."""
        from game_server.client import GameClient
        from serving.autopilot import AutopilotConfig, CarLap, drive_lap

        info = archive_info(self.registry.model_store / version.archive)
        g = self.config
        pilot = AutopilotConfig(track=track, mode="lockstep", max_ticks=g.max_ticks, width=info["input"]["width"],
                                height=info["input"]["height"], lockstep_hz=g.rate_hz)  # fmt: skip
        client = self.connect(version)
        address = self.game()
        try:
            with self.span("gate.lap", **{"rrp.track": track, "rrp.version": version.version}), \
                    GameClient(address, tls=self.game_tls) as game:  # fmt: skip
                r = drive_lap(game, client, pilot, CarLap(0, 0, address, version=version.version), counted=False)
        finally:
            client.close()
        if r.finished:  # a lockstep lap: every key sent was the key applied
            record = drive_lap_record(track, r.keys, r.lap_ticks, r.wall_contacts, model_version=version.id,
                                      data_source=lap_data_source(version))  # fmt: skip
            submit_lap(self.board, record)
        return GateLap(
            track=track, version=version.version, finished=r.finished, lap_ticks=r.lap_ticks,
            lap_s=round(r.lap_ticks * TICK_S, 2), progress=round(r.progress_fraction, 4),
            wall_contacts=r.wall_contacts, ticks=r.ticks, stop_reason=r.stop_reason,
            inference_ms_p50=_percentile(r.inference_ms, 50), inference_ms_p99=_percentile(r.inference_ms, 99),
        )  # fmt: skip

    def _baseline(self, default: ModelVersion, track: str) -> GateLap:
        """The default's gate lap: lockstep laps are deterministic, so one kept from its own gate serves again."""
        kept = default.gate.laps.get(self._key(track)) if default.gate is not None else None
        if kept is not None:
            return kept
        lap = self.lap(default, track)
        gate = default.gate or GateOutcome(passed=None)
        self.registry.update(default.id, gate=GateOutcome(gate.passed, gate.failures, gate.inference_ms_p99,
                                                          {**gate.laps, self._key(track): lap}))  # fmt: skip
        return lap

    def _latency(self, candidate: ModelVersion, default: ModelVersion) -> tuple[float, float]:
        """Both versions' p99 over the same frames, calls interleaved, so that both see the same load."""
        info = archive_info(self.registry.model_store / candidate.archive)
        w, h = info["input"]["width"], info["input"]["height"]
        frames = np.random.default_rng(0).integers(0, 256, (8, h, w, 3), dtype=np.uint8)
        clients = [self.connect(v) for v in (candidate, default)]
        times: list[list[float]] = [[], []]
        try:
            with self.span("gate.latency"):
                period = 1.0 / self.config.rate_hz if self.config.rate_hz > 0 else 0.0
                for i in range(WARMUP_INFERENCES + self.config.latency_samples):
                    time.sleep(period * len(clients))
                    for k, client in enumerate(clients):
                        t0 = time.perf_counter()
                        client.infer(frames[i % len(frames)], 10.0, timeout_s=10.0)
                        if i >= WARMUP_INFERENCES:
                            times[k].append((time.perf_counter() - t0) * 1e3)
        finally:
            for client in clients:
                client.close()
        return float(np.percentile(times[0], 99)), float(np.percentile(times[1], 99))
