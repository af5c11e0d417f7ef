"""Benchmark: vision model inference per frame in process (eager and TorchScript), beside the 40 ms tick of 25 Hz."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from trainer.vision.model import DrivingNet, VisionConfig, build_model, decide
from trainer.vision.train import export_torchscript, load_model

TICK_BUDGET_MS = 1000.0 / 25
TARGET_MS = 2.0


def latencies_ms(model: torch.nn.Module | torch.jit.ScriptModule, config: VisionConfig, frames: int) -> np.ndarray:
    """Per-frame time of one batch-1 call plus the key decision, as a control loop pays it."""
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (frames, 1, config.height, config.width, 3), dtype=np.uint8))
    speed = torch.tensor([20.0])
    out = np.empty(frames)
    with torch.inference_mode():
        for i in range(min(50, frames)):  # warm-up: first calls allocate and (TorchScript) optimise
            decide(model(images[i], speed))
        for i in range(frames):
            start = time.perf_counter()
            decide(model(images[i], speed))
            out[i] = (time.perf_counter() - start) * 1e3
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer frames")
    parser.add_argument("--model", type=Path, default=None, help="trained weights (default: a fresh 128x96 net)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the game loop runs beside servers on a 2-core machine: one core for the model
    model: DrivingNet = load_model(args.model) if args.model else build_model(VisionConfig()).eval()
    config = model.config
    frames = 300 if args.quick else 3000
    with tempfile.TemporaryDirectory() as tmp:
        scripted = export_torchscript(model, Path(tmp) / "model.ts")
    print(f"vision model {config.width}x{config.height}, batch 1, 1 thread, {frames} frames")
    print(f"{'variant':<12} {'p50 ms':>8} {'p99 ms':>8} {'target':>10} {'25 Hz tick':>11}")
    for name, m in (("eager", model), ("torchscript", scripted)):
        t = latencies_ms(m, config, frames)
        p50, p99 = np.percentile(t, 50), np.percentile(t, 99)
        ok = "ok" if p50 <= TARGET_MS else "MISSED"
        print(f"{name:<12} {p50:8.3f} {p99:8.3f} {'<= 2 ms ' + ok:>10} {TICK_BUDGET_MS:8.0f} ms")


if __name__ == "__main__":
    main()
