"""Benchmark: vision model training throughput (frames/s, augmentation included) on this machine's cores."""

from __future__ import annotations

import argparse

import numpy as np

from trainer.data.records import RunInfo
from trainer.vision.data import FrameSet
from trainer.vision.model import VisionConfig
from trainer.vision.train import TrainConfig, train


def synthetic_frames(n: int, config: VisionConfig, runs: int = 4) -> FrameSet:
    """Random frames and keys: throughput does not depend on what the pixels show."""
    rng = np.random.default_rng(0)
    return FrameSet(
        images=rng.integers(0, 256, (n, config.height, config.width, 3), dtype=np.uint8),
        speeds=rng.uniform(0, 50, n).astype(np.float32),
        labels=rng.choice(np.array([1, 5, 9, 0, 2], dtype=np.uint8), n),
        run_index=(np.arange(n) % runs).astype(np.int32),
        runs=tuple(
            RunInfo(f"bench-{i}", "oval", "driver", "", config.width, config.height, "raw_rgb", 0, 0.0)
            for i in range(runs)
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer frames")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    n = 1500 if args.quick else 6000
    print(f"{'resolution':<11} {'frames/epoch':>12} {'frames/s':>9} {'s/epoch':>8}  (threads {args.threads})")
    for width, height in ((128, 96), (64, 48)):
        vision = VisionConfig(width=width, height=height)
        config = TrainConfig(vision=vision, epochs=2, threads=args.threads, progress=False, patience=10)
        result = train(config, synthetic_frames(n, vision))
        per_epoch = result.train_frames / result.frames_per_s
        print(f"{width}x{height:<7} {result.train_frames:>12} {result.frames_per_s:>9.0f} {per_epoch:>8.1f}")
    print("default `rrp train`: ~14,000 training frames x <= 12 epochs at 128x96")


if __name__ == "__main__":
    main()
