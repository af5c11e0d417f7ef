"""A map-style PyTorch dataset of recorded frames, and the run/track split that keeps validation honest."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch.nn import functional
from torch.utils.data import Dataset

from trainer.data.records import LABEL_KEYS, DataError, FrameSource, RunInfo

SPEED_SCALE_M_PER_S = 50.0  # top speed: the speed input is speed / 50, within [-0.3, 1]
_BITS = torch.arange(len(LABEL_KEYS), dtype=torch.int64)


@dataclass(frozen=True)
class RunSplit:
    """Whole runs on each side: frames of one run are near-duplicates, so splitting frames would leak."""

    train: tuple[RunInfo, ...]
    val: tuple[RunInfo, ...]


def split_runs(
    runs: Sequence[RunInfo], val_fraction: float, seed: int, by: Literal["run", "track"] = "run"
) -> RunSplit:
    """Holds out about `val_fraction` of the runs (by="run") or of the tracks (by="track"), the same for a seed.

    Holding out tracks measures generalisation to circuits never seen; holding out runs measures it to new
    laps of known circuits. Either way no run is on both sides, and with by="track" no track is either.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError("val_fraction must be within [0, 1)")
    if by not in ("run", "track"):
        raise ValueError(f"by must be 'run' or 'track', got {by!r}")
    groups = sorted({r.run_id if by == "run" else r.track for r in runs})
    if val_fraction == 0.0:
        return RunSplit(train=tuple(runs), val=())
    if len(groups) < 2:
        raise ValueError(f"a validation split by {by} needs at least 2 {by}s, got {len(groups)}")
    random.Random(seed).shuffle(groups)
    n_val = min(max(round(val_fraction * len(groups)), 1), len(groups) - 1)
    held_out = set(groups[:n_val])
    val = tuple(r for r in runs if (r.run_id if by == "run" else r.track) in held_out)
    train = tuple(r for r in runs if (r.run_id if by == "run" else r.track) not in held_out)
    return RunSplit(train=train, val=val)


def resize_images(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, 3, H, W) float images to (N, 3, *size): area averaging when shrinking (no aliasing), else bilinear."""
    h, w = images.shape[-2:]
    if (h, w) == size:
        return images
    if size[0] <= h and size[1] <= w:
        return functional.interpolate(images, size=size, mode="area")
    return functional.interpolate(images, size=size, mode="bilinear", align_corners=False)


class FrameDataset(Dataset[dict[str, torch.Tensor]]):
    """All frames of some runs, decoded once and held as uint8; tensors are made per item.

    Items: `image` float32 (3, H, W) in [0, 1], `speed` float32 () = speed / 50, `targets` float32 (4,)
    the label keys (forward, back, left, right) as 0/1, `mask` int64 () the label mask itself.
    """

    def __init__(
        self,
        source: FrameSource,
        runs: Sequence[RunInfo] | None = None,
        image_size: tuple[int, int] | None = None,
    ) -> None:
        self.runs = tuple(source.runs() if runs is None else runs)
        self.image_size = image_size
        self._images: list[np.ndarray] = []  # per run (n, H, W, 3) uint8
        self._speeds: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []
        self._ticks: list[np.ndarray] = []
        self._run_ids: list[str] = []  # runs with at least one frame, parallel to the arrays above
        for run in self.runs:
            samples = list(source.samples(run.run_id))
            if not samples:
                continue
            self._images.append(np.stack([s.image for s in samples]))
            self._speeds.append(np.array([s.speed_m_per_s for s in samples], dtype=np.float32))
            self._masks.append(np.array([s.label_mask for s in samples], dtype=np.uint8))
            self._ticks.append(np.array([s.tick for s in samples], dtype=np.int64))
            self._run_ids.append(run.run_id)
        shapes = {images.shape[1:3] for images in self._images}
        if image_size is None and len(shapes) > 1:
            raise DataError(f"runs have different image sizes {sorted(shapes)}; pass image_size to resize them")
        self._starts = np.cumsum([0] + [len(m) for m in self._masks])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _locate(self, index: int) -> tuple[int, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} frames")
        index %= len(self)
        run = int(np.searchsorted(self._starts, index, side="right")) - 1
        return run, index - int(self._starts[run])

    def frame_key(self, index: int) -> tuple[str, int]:
        """(run_id, tick) of an item, to trace a prediction back to its recording."""
        run, row = self._locate(index)
        return self._run_ids[run], int(self._ticks[run][row])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        run, row = self._locate(index)
        image = torch.from_numpy(self._images[run][row]).permute(2, 0, 1).to(torch.float32).div_(255.0)
        if self.image_size is not None:
            image = resize_images(image.unsqueeze(0), self.image_size).squeeze(0)
        mask = int(self._masks[run][row])
        return {
            "image": image,
            "speed": torch.tensor(self._speeds[run][row] / SPEED_SCALE_M_PER_S, dtype=torch.float32),
            "targets": ((mask >> _BITS) & 1).to(torch.float32),
            "mask": torch.tensor(mask, dtype=torch.int64),
        }
