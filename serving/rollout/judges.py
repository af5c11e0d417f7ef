"""The pure judges of a rollout: a candidate's gate laps and live window against the default's, and the window
itself (counters between two snapshots). No I/O: each answer is a list of reasons, empty when the candidate held up.
"""

from __future__ import annotations

from dataclasses import asdict, fields

from serving.rollout.config import CanaryConfig, GateConfig
from serving.rollout.records import Counters, GateLap, LiveWindow

Snapshot = dict[str, Counters]  # model version -> its counters at one moment


def judge_lap(cand: GateLap, base: GateLap, g: GateConfig) -> list[str]:
    """Why a candidate's gate lap is worse than the default's on the same track; [] when it is not."""
    track, failures = cand.track, []
    if base.finished and not cand.finished:
        failures.append(f"{track}: did not finish ({cand.progress:.0%}, {cand.stop_reason}); the default did")
    elif base.finished and cand.lap_ticks > base.lap_ticks * g.lap_time_ratio:
        failures.append(f"{track}: lap {cand.lap_s:.2f} s vs the default's {base.lap_s:.2f} s")
    elif not base.finished and not cand.finished and cand.progress < base.progress - g.progress_tolerance:
        failures.append(f"{track}: reached {cand.progress:.0%} of the lap vs the default's {base.progress:.0%}")
    if cand.wall_contacts > base.wall_contacts * g.wall_ratio + g.wall_allowance:
        failures.append(f"{track}: {cand.wall_contacts} wall-contact ticks vs the default's {base.wall_contacts}")
    return failures


def judge_latency(p99_ms: float, default_p99_ms: float, g: GateConfig) -> list[str]:
    """Why the candidate answers too slowly: over the budget and over the allowed multiple of the default's."""
    if p99_ms <= max(g.max_p99_ms, g.latency_ratio * default_p99_ms):
        return []
    return [f"inference p99 {p99_ms:.1f} ms over the {g.max_p99_ms} ms budget and over {g.latency_ratio}x the "
            f"default's {default_p99_ms:.1f} ms"]  # fmt: skip


def window(before: Snapshot, after: Snapshot, version: str) -> LiveWindow:
    """One version's counters between two snapshots, with the rates the canary judges."""
    a, b = after.get(version, Counters()), before.get(version, Counters())
    d = {f.name: max(0.0, getattr(a, f.name) - getattr(b, f.name)) for f in fields(Counters)}
    ticks = d["ticks"] or 1.0
    d["completion"] = d["finished"] / d["laps"] if d["laps"] else 0.0
    d["mean_lap_s"] = d["lap_s_sum"] / d["finished"] if d["finished"] else 0.0
    d["fallback_rate"] = d["fallbacks"] / ticks
    d["missed_rate"] = d["missed_ticks"] / ticks
    d["error_rate"] = d["inference_errors"] / ticks
    return LiveWindow(**{k: round(v, 4) for k, v in d.items()})


def judge_canary(candidate: LiveWindow, default: LiveWindow, c: CanaryConfig) -> list[str]:
    """Why the canary failed; [] when it held up."""
    if candidate.laps < 1:
        return ["no candidate lap was driven during the canary"]
    failures = []
    if default.laps >= 1 and candidate.completion < default.completion - c.completion_tolerance:
        failures.append(f"completion {candidate.completion:.2f} vs the default's {default.completion:.2f}")
    if candidate.finished and default.finished and candidate.mean_lap_s > default.mean_lap_s * c.lap_time_ratio:
        failures.append(f"mean lap {candidate.mean_lap_s:.2f} s vs the default's {default.mean_lap_s:.2f} s")
    rates = asdict(candidate)
    for rate, limit in (("fallback_rate", c.max_fallback_rate), ("missed_rate", c.max_missed_rate),
                        ("error_rate", c.max_error_rate)):  # fmt: skip
        if rates[rate] > limit:
            failures.append(f"{rate.replace('_', ' ')} {rates[rate]:.4f} over {limit}")
    return failures
