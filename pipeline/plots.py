"""The figures of autopilot runs, drawn for reports: kept out of the serving modules that race the cars."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from game_server.core.state import TICK_S
from serving.autopilot import AutopilotResult


def plot_latency(result: AutopilotResult, path: Path) -> None:
    """Per-hop latency of a real-time run: frame (tick due -> frame received), inference, and slack left."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = [v for r in result.laps for v in r.frame_ms]
    infer = [v for r in result.laps for v in r.inference_ms]
    slack = [v for r in result.laps for v in r.slack_ms]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    bins = np.linspace(0, 45, 46)
    for values, label in ((frame, "frame: tick due -> observation"), (infer, "inference round trip")):
        if values:
            a.hist(np.clip(values, 0, 45), bins=bins, alpha=0.6, label=label)
    if slack:
        a.hist(np.clip(slack, 0, 45), bins=bins, alpha=0.6, label="slack: command sent -> tick due")
    a.axvline(TICK_S * 1e3, color="k", linestyle="--", linewidth=1, label="40 ms tick")
    a.set_xlabel("ms")
    a.set_ylabel("ticks")
    a.legend(fontsize=8)
    a.set_title("latency per hop")
    if result.laps:
        r = result.laps[0]
        b.plot(r.inference_ms, linewidth=0.6, label="inference")
        b.plot(r.slack_ms, linewidth=0.6, label="slack")
        b.set_xlabel("tick (car 0, lap 0)")
        b.set_ylabel("ms")
        b.legend(fontsize=8)
    t = result.totals()
    fig.suptitle(
        f"{t['track']}, {t['cars']} car(s), {t['mode']}: {t['missed_ticks']} missed, {t['late_commands']} late, "
        f"{t['fallbacks']} fallbacks in {t['ticks']} ticks"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
