"""The vision model as a policy: a camera frame and the dashboard speed in, the keys out."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from trainer.vision.data import resize_frames
from trainer.vision.model import decide


class Model(Protocol):
    """An eager DrivingNet or its TorchScript export: frames + speeds -> logits."""

    def __call__(self, frames: torch.Tensor, speed: torch.Tensor) -> torch.Tensor: ...


class VisionPilot:
    """The policy: a camera frame and the dashboard speed in, the keys out. Nothing else is read."""

    def __init__(self, model: Model, width: int, height: int) -> None:
        self.model = model
        self.width = width
        self.height = height

    def act(self, frame: np.ndarray, speed_m_per_s: float) -> int:
        if frame.shape[:2] != (self.height, self.width):
            frame = resize_frames(frame[None], self.width, self.height)[0]
        with torch.inference_mode():
            logits = self.model(torch.from_numpy(np.array(frame))[None], torch.tensor([speed_m_per_s]))
        return int(decide(logits)[0])
