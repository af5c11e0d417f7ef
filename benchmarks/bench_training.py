"""Benchmark: vision model training, seconds per epoch on the CPU and on a GPU when there is one.

Augmentation included; `--prefetch 0` prepares each batch in turn (augmentation on the critical path), the
default prepares batches on a background thread while the device trains.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from trainer.data.records import RunInfo
from trainer.vision.data import AugmentConfig, FrameSet, augment
from trainer.vision.model import VisionConfig, build_model
from trainer.vision.train import TrainConfig, head_losses, train


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


def augmentation_share(vision: VisionConfig, batch: int, threads: int, rounds: int = 15) -> tuple[float, float]:
    """Median ms of augmenting one batch on one thread (as the background thread does) and of one training
    step (forward, backward, optimiser) on `threads`: the CPU the augmentation takes beside each step."""
    frames = synthetic_frames(batch, vision)
    images, masks = torch.from_numpy(frames.images), torch.from_numpy(frames.labels.astype(np.int64))
    speeds = torch.from_numpy(frames.speeds)
    model = build_model(vision)
    optimiser = torch.optim.AdamW(model.parameters())
    generator = torch.Generator().manual_seed(0)
    aug, step = [], []
    for _ in range(rounds):
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        augment(images, masks, AugmentConfig(), generator)
        aug.append(time.perf_counter() - t0)
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        loss = head_losses(model.raw_logits(images, speeds), masks, None)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        step.append(time.perf_counter() - t0)
    return statistics.median(aug) * 1e3, statistics.median(step) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer frames")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefetch", type=int, default=TrainConfig.prefetch_batches, help="batches prepared ahead")
    parser.add_argument("--resolutions", default="128x96,64x48", help="comma-separated WIDTHxHEIGHT")
    args = parser.parse_args()
    n = 1500 if args.quick else 6000
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"{'device':<8} {'resolution':<11} {'frames/epoch':>12} {'frames/s':>9} {'s/epoch':>8}", end="")
    print(f"  (threads {args.threads}, prefetch {args.prefetch})")
    per_epoch: dict[tuple[str, str], float] = {}
    for resolution in args.resolutions.split(","):
        width, height = (int(v) for v in resolution.split("x"))
        vision = VisionConfig(width=width, height=height)
        frames = synthetic_frames(n, vision)
        for device in devices:
            config = TrainConfig(
                vision=vision,
                epochs=2,
                threads=args.threads,
                progress=False,
                patience=10,
                device=device,  # type: ignore[arg-type]
                prefetch_batches=args.prefetch,
            )
            result = train(config, frames)
            seconds = result.seconds / len(result.history)
            per_epoch[device, resolution] = seconds
            print(f"{device:<8} {resolution:<11} {result.train_frames:>12} {result.frames_per_s:>9.0f} {seconds:>8.1f}")
    if "cuda" in devices:
        name = torch.cuda.get_device_name()
        for resolution in args.resolutions.split(","):
            speedup = per_epoch["cpu", resolution] / per_epoch["cuda", resolution]
            print(f"{resolution}: GPU ({name}) {speedup:.1f}x faster per epoch than the CPU ({args.threads} threads)")
    else:
        print("GPU: none present on this machine (torch.cuda.is_available() is False); CPU figures only")
    for resolution in args.resolutions.split(","):
        width, height = (int(v) for v in resolution.split("x"))
        aug_ms, step_ms = augmentation_share(VisionConfig(width=width, height=height), 128, args.threads)
        print(
            f"{resolution}: augmenting a batch of 128 takes {aug_ms:.1f} ms on one thread, beside a training step of"
            f" {step_ms:.1f} ms on {args.threads} threads (CPU: {aug_ms / (aug_ms + args.threads * step_ms):.0%} of"
            " the pair)"
        )
    print("default `rrp train`: ~16,000 training frames x <= 12 epochs at 128x96")


if __name__ == "__main__":
    main()
