"""After training: package the model, start TorchServe, race the training track in real time through it."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from game_server.core.state import TICK_S
from pipeline.plots import plot_latency
from plumbing.settings import setting
from serving.archive import FORMATS, ArchiveConfig, build_archive
from serving.autopilot import AutopilotConfig, AutopilotResult, result_json, run_autopilot
from serving.batching import Batchers
from serving.client import ModelRef, TorchServeClient
from serving.torchserve import LocalTorchServe, TorchServeConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingJobConfig:
    """What the main job's serving step does: one real-time race of the training track through TorchServe."""

    track: str = setting("kidney", "track raced through TorchServe (the training track)", cli=False)
    laps: int = setting(1, "laps raced in real time")
    cars: int = setting(8, "cars racing at once through the one TorchServe, their frames batched per round")
    max_ticks: int = setting(3000, "tick budget of a lap")
    deadline_ms: float = setting(28.0, "inference deadline per tick before the fallback command, ms")
    batch_size: int = setting(1, "TorchServe batch size of the served model")
    # ONNX: the same keys as the eager model (tests/test_serving_onnx.py) at about half the worker's CPU a frame.
    format: str = setting("onnx", "served archive: eager (PyTorch) or onnx (onnxruntime)", choices=FORMATS)
    race: bool = setting(True, "each game server's cars race on one stream, one request a tick for all of them")
    version: str | None = setting(None, "archive version (default: a hash of the weights)")


def weights_version(model_dir: Path) -> str:
    return hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()[:12]


def run_serving_job(
    model_dir: Path,
    game_servers: tuple[str, ...],
    out_dir: Path,
    config: ServingJobConfig | None = None,
    leaderboard: str = "",
) -> dict[str, Any]:
    """Packages `model_dir`, serves it with a private TorchServe, races `config.track` at 25 Hz through it.

    Writes `out_dir/model-store/<name>-<version>.mar`, `serving.json`, `serving.md` and `latency.png`;
    returns the figures (lap, late and missed ticks, fallbacks, latency per hop, TorchServe's memory) with
    the Markdown section for the report under "markdown". Every finished lap goes to `leaderboard` (a Redis
    URL), verified from the controls the game server applied.
    """
    from trainer.vision.train import load_model

    config = config or ServingJobConfig()
    out_dir.mkdir(parents=True, exist_ok=True)
    vision = load_model(model_dir / "model.safetensors").config
    version = config.version or weights_version(model_dir)
    archive_config = ArchiveConfig(batch_size=config.batch_size, format=config.format)
    archive = build_archive(model_dir, version, out_dir / "model-store", archive_config)
    pilot = AutopilotConfig(
        track=config.track,
        mode="realtime",
        laps=config.laps,
        cars=config.cars,
        max_ticks=config.max_ticks,
        width=vision.width,
        height=vision.height,
        deadline_ms=config.deadline_ms,
        leaderboard=leaderboard,
        race=config.race,
    )
    with LocalTorchServe(TorchServeConfig()) as server:
        server.register(archive)
        assert server.keys is not None
        key = server.keys.inference
        model = ModelRef(archive_config.name, version)
        log.info("TorchServe at %s: racing %s in real time", server.inference_address, config.track)
        batchers = Batchers(
            lambda _version: TorchServeClient(server.inference_address, model, key),
            pilot.batch_window_ms / 1e3,
            pilot.batch_in_flight,
        )
        try:
            result = run_autopilot(pilot, game_servers, batchers.connect, race_model=batchers.race)
        finally:
            batchers.close()
        memory = server.memory_mb()
    sizes = batchers.sizes() or [0]
    plot_latency(result, out_dir / "latency.png")
    report = result_json(result)
    figures: dict[str, Any] = {
        "archive": str(archive),
        "version": version,
        **report["totals"],
        "torchserve_memory_mb": memory,
        "batch_frames_mean": round(sum(sizes) / len(sizes), 2),
        "batch_frames_max": max(sizes),
    }
    (out_dir / "serving.json").write_text(json.dumps({**report, "figures": figures}, indent=2, default=str) + "\n")
    figures["markdown"] = markdown(result, figures, settings=asdict(config))
    (out_dir / "serving.md").write_text(figures["markdown"])
    return figures


def markdown(result: AutopilotResult, figures: dict[str, Any], settings: dict[str, Any]) -> str:
    t = result.totals()
    best = t["best_lap_ticks"]
    lap = f"{best} ticks = {best * TICK_S:.2f} s" if best else "no finished lap"
    rows = "\n".join(
        f"| {r.car} | {r.lap} | {'yes' if r.finished else 'no'} | {r.lap_ticks or '-'} | {r.ticks} | "
        f"{r.late_commands} | {r.missed_ticks} | {r.fallbacks} | {r.inference_errors} |"
        for r in result.laps
    )
    mem = figures["torchserve_memory_mb"]
    requests = (
        "one per race and tick, for every car of a game server's race"
        if settings["race"]
        else "one per round for every car ready (batched)"
    )
    return f"""The trained model, packaged as `{Path(figures["archive"]).name}` (safetensors + handler + model
card), served by TorchServe over gRPC, raced {t["track"]} at 25 Hz of wall clock with {t["cars"]} car(s):
each tick's frame went to TorchServe and its keys came back as the command for that tick.

- Lap: {lap}; {t["laps_finished"]} of {t["laps"]} laps finished
- Ticks: {t["ticks"]}; late commands {t["late_commands"]}, missed ticks {t["missed_ticks"]}, fallbacks
  {t["fallbacks"]} (inference past its {settings["deadline_ms"]} ms deadline or failed), inference errors
  {t["inference_errors"]}, frames skipped {t["skipped_frames"]}
- Latency per hop (p50 / p99): frame (tick due -> observation received) {t["frame_ms_p50"]} / {t["frame_ms_p99"]} ms;
  inference {t["inference_ms_p50"]} / {t["inference_ms_p99"]} ms; slack left before the tick was due
  {t["slack_ms_p50"]} ms (p1 {t["slack_ms_p1"]} ms)
- Requests: {requests}, {figures["batch_frames_mean"]} frames on average,
  {figures["batch_frames_max"]} at most; the {settings["format"]} archive
- TorchServe memory: JVM {mem["jvm_mb"]} MB, workers {mem["workers_mb"]} MB

| car | lap | finished | lap ticks | ticks | late | missed | fallbacks | errors |
| --- | --- | --- | --- | --- | --- | --- | --- | --- |
{rows}

![latency per hop](latency.png)
"""
