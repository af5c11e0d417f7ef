"""Training frames for the vision model: in-process rollouts, recorded runs, augmentation, balancing and splits."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch.nn import functional
from tqdm import tqdm

from game_server.core import episode
from game_server.core.drivers import RayDriver
from game_server.core.state import LEFT, RIGHT
from game_server.core.track import Track
from game_server.core.tracks import load_track, random_state
from game_server.render.renderer import FrameSpec, shared_renderer
from plumbing.settings import setting
from trainer.data.dataset import split_runs
from trainer.data.records import FrameSource, RunInfo, Sample
from trainer.vision.model import N_CLASSES, mask_targets


@dataclass(frozen=True, eq=False)
class FrameSet:
    """Frames in memory, whatever their source; runs are kept apart so that splits never cut a run in two."""

    images: np.ndarray  # (N, H, W, 3) uint8
    speeds: np.ndarray  # (N,) float32, m/s
    labels: np.ndarray  # (N,) uint8 control masks the expert intended (the targets)
    run_index: np.ndarray  # (N,) int32 index into runs
    runs: tuple[RunInfo, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def tracks(self) -> list[str]:
        return sorted({self.runs[i].track for i in np.unique(self.run_index)})

    def take(self, indices: np.ndarray) -> FrameSet:
        return FrameSet(
            self.images[indices],
            self.speeds[indices],
            self.labels[indices],
            self.run_index[indices],
            self.runs,
        )

    def summary(self) -> dict[str, object]:
        """What a model card records about the data: runs, tracks and frames."""
        runs = np.unique(self.run_index)
        return {
            "frames": len(self),
            "runs": len(runs),
            "tracks": self.tracks,
            "resolution": f"{self.images.shape[2]}x{self.images.shape[1]}" if len(self) else "-",
            "label_counts": {str(m): int(c) for m, c in zip(*np.unique(self.labels, return_counts=True), strict=True)},
        }


def concat(sets: Sequence[FrameSet]) -> FrameSet:
    """One set holding all frames; run indices are renumbered so that runs stay distinct."""
    offsets = np.cumsum([0, *(len(s.runs) for s in sets[:-1])])
    return FrameSet(
        np.concatenate([s.images for s in sets]),
        np.concatenate([s.speeds for s in sets]),
        np.concatenate([s.labels for s in sets]),
        np.concatenate([s.run_index + int(o) for s, o in zip(sets, offsets, strict=True)]).astype(np.int32),
        tuple(r for s in sets for r in s.runs),
    )


class FrameSetBuilder:
    """Accumulates frames run by run (lists, then one array at the end, to avoid quadratic copying)."""

    def __init__(self) -> None:
        self.images: list[np.ndarray] = []
        self.speeds: list[float] = []
        self.labels: list[int] = []
        self.run_index: list[int] = []
        self.runs: list[RunInfo] = []

    def start_run(self, run: RunInfo) -> None:
        self.runs.append(run)

    def add(self, image: np.ndarray, speed: float, label: int) -> None:
        self.images.append(image)
        self.speeds.append(speed)
        self.labels.append(label)
        self.run_index.append(len(self.runs) - 1)

    def build(self, width: int, height: int) -> FrameSet:
        images = np.stack(self.images) if self.images else np.zeros((0, height, width, 3), np.uint8)
        return FrameSet(
            resize_frames(images, width, height),
            np.asarray(self.speeds, dtype=np.float32),
            np.asarray(self.labels, dtype=np.uint8),
            np.asarray(self.run_index, dtype=np.int32),
            tuple(self.runs),
        )


def resize_frames(images: np.ndarray, width: int, height: int) -> np.ndarray:
    """Frames at the model's resolution (area averaging, so a 2x smaller model sees the same scene)."""
    if images.shape[1:3] == (height, width) or not len(images):
        return images
    out = []
    for start in range(0, len(images), 1024):
        # Read-only arrays (frames decoded from Redis) are copied: torch warns about any it cannot write to.
        x = torch.from_numpy(np.require(images[start : start + 1024], requirements="W")).permute(0, 3, 1, 2).float()
        y = functional.interpolate(x, size=(height, width), mode="area")
        out.append(y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def expert_label(driver: RayDriver, rays: Sequence[float], speed: float) -> int:
    """The keys the expert means on a state the learner visited: the driver's own choice on its sensors."""
    return driver.act_on(rays, speed)


def generate_samples(
    tracks: Sequence[str],
    episodes: int,
    ticks: int,
    driver: RayDriver,
    perturb_prob: float,
    seed: int,
    size: tuple[int, int] = (128, 96),
    randomize: bool = True,
    progress: bool = False,
    perturb_max_ticks: int = 12,
) -> FrameSet:
    """Rolls out `driver` in process and renders what the camera sees: the fallback and test data source.

    The same episode loop and perturbation model as a game server's Record: each tick is labelled with the
    driver's intended keys on the state the car is in, while a seeded perturbation sometimes applies other
    keys, so the data holds recoveries. Episode 0 of a track starts on the start line, later ones at random
    places. Everything is a function of `seed`.
    """
    width, height = size
    renderer = shared_renderer()
    builder = FrameSetBuilder()
    rng = np.random.default_rng(seed)
    total = len(tracks) * episodes
    policy = episode.SensorPolicy(driver.act_on)
    for name, index in tqdm(
        [(t, e) for t in tracks for e in range(episodes)], desc="generate", total=total, disable=not progress
    ):
        track = load_track(name)
        state = track.base_state if index == 0 else random_state(track, rng)
        frame = FrameSpec(width, height, randomize, int(rng.integers(2**62)))
        perturbation = episode.Perturbation(int(rng.integers(2**62)), perturb_prob, perturb_max_ticks)
        builder.start_run(in_process_run(f"generated-{name}-{seed}-{index}", name, "driver", width, height))

        def add(tick: episode.Tick, track: Track = track, frame: FrameSpec = frame) -> None:
            builder.add(renderer.render(track, tick.state, frame), tick.state.car.speed, tick.intended)

        episode.run_episode(track, state, policy, max_ticks=ticks, perturbation=perturbation, on_tick=add)
    return builder.build(width, height)


def in_process_run(run_id: str, track: str, source: str, width: int, height: int) -> RunInfo:
    """The metadata of a run made in this process, shaped like a recorded one so that splits treat both alike."""
    return RunInfo(run_id, track, source, "", width, height, "raw_rgb", 0, time.time())


def frames_from_samples(runs: Iterable[tuple[RunInfo, Iterable[Sample]]], size: tuple[int, int]) -> FrameSet:
    """A FrameSet from recorded runs given as (run, samples), resized to the model's resolution."""
    builder = FrameSetBuilder()
    width, height = size
    for run, samples in runs:
        builder.start_run(run)
        # A run's frames are resized together: one interpolation per frame cost minutes on 18k frames.
        rows = [(s.image, s.speed_m_per_s, s.label_mask) for s in samples]
        if not rows:
            continue
        if len({image.shape for image, _, _ in rows}) == 1:
            images = resize_frames(np.stack([image for image, _, _ in rows]), width, height)
        else:  # mixed sizes within a run: frame by frame
            images = np.stack([resize_frames(image[None], width, height)[0] for image, _, _ in rows])
        for image, (_, speed, label) in zip(images, rows, strict=True):
            builder.add(image, speed, label)
    return builder.build(width, height)


def frames_from_source(
    source: FrameSource, size: tuple[int, int], tracks: Sequence[str] = (), progress: bool = False
) -> FrameSet:
    """All runs of a trainer.data source (Redis or shards), optionally only those on `tracks`.

    Runs are taken in run-id order, not the source's start-time order: episodes recorded in parallel start
    in whatever order the pool ran them, and a seeded training run must depend on the data alone."""
    runs = sorted((r for r in source.runs() if not tracks or r.track in tracks), key=lambda r: r.run_id)
    return frames_from_samples(
        ((r, source.samples(r.run_id)) for r in tqdm(runs, desc="load runs", disable=not progress)),
        size,
    )


def split_frames(
    frames: FrameSet, val_fraction: float, seed: int, by: Literal["run", "track"] = "run"
) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) frame indices from trainer.data.split_runs: whole runs (or tracks) on one side, so
    near-identical neighbouring frames never leak from training into validation."""
    split = split_runs(frames.runs, val_fraction, seed, by)
    val_ids = {r.run_id for r in split.val}
    is_val = np.array([r.run_id in val_ids for r in frames.runs], dtype=bool)[frames.run_index]
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def class_weights(labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss weights per class of each head, (n / (k n_c)) ** 0.5: rare keys (braking, a steering side)
    count more without letting a handful of frames dominate; unseen classes get weight 1."""
    throttle, steer = mask_targets(torch.from_numpy(labels.astype(np.int64)))
    out = []
    for target in (throttle, steer):
        counts = torch.bincount(target, minlength=N_CLASSES).double()
        weights = torch.where(counts > 0, (counts.sum() / (N_CLASSES * counts.clamp(min=1))).sqrt(), 1.0)
        out.append(weights.float())
    return out[0], out[1]


@dataclass(frozen=True)
class AugmentConfig:
    """Photometric and geometric jitter applied to training batches."""

    brightness: float = setting(0.3, "brightness jitter, a share of the mean")
    contrast: float = setting(0.3, "contrast jitter, a share")
    colour: float = setting(0.1, "per-channel colour jitter, a share")
    shift_px: int = setting(4, "largest horizontal and vertical shift, pixels")
    flip_prob: float = setting(0.5, "probability of a mirrored frame (left and right keys, red and blue swapped)")


def augment(
    images: torch.Tensor, masks: torch.Tensor, config: AugmentConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A jittered copy of a uint8 (N, H, W, 3) batch and its masks; a horizontal flip swaps left and right
    (keys, and red and blue: see below).

    Randomness comes only from `generator`, so a seeded run augments identically every time, on any thread.
    It runs beside every training step on the same cores, so it is written for few passes over the batch: the
    shift (edges replicated) and the flip move whole pixels, one 3-byte copy each, and the photometric jitter
    is one affine map per frame and channel.
    """
    n, h, w = images.shape[0], images.shape[1], images.shape[2]

    def uniform(spread: float, *shape: int) -> torch.Tensor:
        return 1.0 + spread * (2.0 * torch.rand(n, *shape, generator=generator) - 1.0)

    contrast = uniform(config.contrast, 1, 1, 1).reshape(n, 1)
    brightness = uniform(config.brightness, 1, 1, 1).reshape(n, 1)
    colour = uniform(config.colour, 1, 1, 3).reshape(n, 3)
    rows, cols = torch.arange(h).expand(n, h), torch.arange(w).expand(n, w)
    if config.shift_px:
        s = config.shift_px
        dx = torch.randint(0, 2 * s + 1, (n,), generator=generator)
        dy = torch.randint(0, 2 * s + 1, (n,), generator=generator)
        # Shifted by dy - s rows and dx - s columns, the frame's edge rows and columns repeated beyond it.
        rows = (rows + (dy - s)[:, None]).clamp(0, h - 1)
        cols = (cols + (dx - s)[:, None]).clamp(0, w - 1)
    flip = torch.rand(n, generator=generator) < config.flip_prob
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    # Each output pixel's source, as a row of the (N*H*W, 3) frame memory.
    source = ((torch.arange(n) * (h * w))[:, None] + rows * w)[:, :, None] + cols[:, None, :]
    pixels = images.reshape(-1, 3).index_select(0, source.reshape(-1)).reshape(n, h * w, 3).float()
    # The mean of the whole frame, before the shift; its float32 sum is exact up to 2**24 / 255 bytes a frame.
    mean = images.reshape(n, -1).float().sum(dim=1, keepdim=True) / (h * w * 3)
    # ((x - mean) * contrast + mean) * brightness * colour, as x * gain + offset.
    gain = contrast * brightness * colour
    offset = mean * (1.0 - contrast) * brightness * colour
    x = torch.addcmul(offset[:, None, :], pixels, gain[:, None, :]).round_().clamp_(0, 255).to(torch.uint8)
    # A mirrored frame swaps red and blue too: the barriers' colours say which way the lap goes (red on the
    # left, blue on the right), and a mirror alone would show a car driving the right way with red on its right,
    # the very view of a car facing the wrong way. Swapped in bytes and only where mirrored: over the whole float
    # batch, this one line cost as much as the gather.
    x[flip] = x[flip].flip(2)
    m = masks.long()
    swapped = (m & ~(LEFT | RIGHT)) | ((m & LEFT) << 1) | ((m & RIGHT) >> 1)
    return x.reshape(n, h, w, 3), torch.where(flip, swapped, m)
