"""Benchmark: the ONNX export in onnxruntime (CPU) against the PyTorch model in process, batch 1 and 16.

Both on one thread (the game loop shares a 2-core machine with the servers), on the same random frames;
per call, p50 and p99, and the largest logit difference and whether every decision agrees.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from trainer.vision.export import OnnxModel, export_onnx
from trainer.vision.model import DrivingNet, VisionConfig, build_model, decide
from trainer.vision.train import load_model

BATCHES = (1, 16)


def latencies_ms(call: Callable[[np.ndarray, np.ndarray], np.ndarray], images: np.ndarray, speeds: np.ndarray,
                 batch: int, calls: int) -> np.ndarray:  # fmt: skip
    """Per-call time of `calls` calls of `batch` frames each, after a warm-up."""
    out = np.empty(calls)
    n = images.shape[0] - batch
    for i in range(min(20, calls)):
        call(images[i % n : i % n + batch], speeds[i % n : i % n + batch])
    for i in range(calls):
        j = i % n
        start = time.perf_counter()
        call(images[j : j + batch], speeds[j : j + batch])
        out[i] = (time.perf_counter() - start) * 1e3
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer calls")
    parser.add_argument("--model", type=Path, default=None, help="trained weights (default: a fresh 128x96 net)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model: DrivingNet = load_model(args.model) if args.model else build_model(VisionConfig()).eval()
    c = model.config
    with tempfile.TemporaryDirectory() as tmp:
        onnx = OnnxModel(export_onnx(model, Path(tmp) / "model.onnx"), threads=1)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, c.height, c.width, 3), dtype=np.uint8)
    speeds = rng.uniform(0, 50, 64).astype(np.float32)

    def pytorch(x: np.ndarray, v: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            logits = model(torch.from_numpy(x), torch.from_numpy(v))
            decide(logits)
        return logits.numpy()

    def onnxruntime(x: np.ndarray, v: np.ndarray) -> np.ndarray:
        logits = onnx(x, v)
        decide(torch.from_numpy(logits))
        return logits

    diff = float(np.abs(pytorch(images, speeds) - onnxruntime(images, speeds)).max())
    agree = torch.equal(
        decide(torch.from_numpy(pytorch(images, speeds))), decide(torch.from_numpy(onnx(images, speeds)))
    )
    calls = 100 if args.quick else 1000
    print(f"vision model {c.width}x{c.height}, 1 thread, {calls} calls per row (logits and keys)")
    print(f"{'batch':>5} {'runtime':<12} {'p50 ms':>8} {'p99 ms':>8} {'per frame p50':>14} {'vs pytorch p50':>15}")
    for batch in BATCHES:
        base = 0.0
        for name, call in (("pytorch", pytorch), ("onnxruntime", onnxruntime)):
            t = latencies_ms(call, images, speeds, batch, calls)
            p50, p99 = np.percentile(t, 50), np.percentile(t, 99)
            base = base or p50
            print(f"{batch:>5} {name:<12} {p50:8.3f} {p99:8.3f} {p50 / batch:11.3f} ms {base / p50:14.2f}x")
    print(f"largest logit difference {diff:.2e}; decisions identical: {agree}")


if __name__ == "__main__":
    main()
