"""The same `InferenceClient` interface over the model in this process: the baseline that served must equal."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from plumbing.errors import InvalidArgument
from serving.codec import Decision, check_frame_array, encode_speed
from trainer.vision.model import DrivingNet, decide
from trainer.vision.train import load_model


class InProcessClient:
    """Runs the trained model here, with the inputs as the handler sees them (uint8 frame, float32 speed)."""

    def __init__(self, model: DrivingNet, name: str = "in-process") -> None:
        self.net = model.eval()
        self.model, self.version = name, ""

    @classmethod
    def load(cls, weights: Path) -> InProcessClient:
        return cls(load_model(weights))

    def infer(self, frame: np.ndarray, speed_m_per_s: float, timeout_s: float) -> Decision:
        check_frame_array(frame)
        encode_speed(speed_m_per_s)
        with torch.inference_mode():
            logits = self.net(
                torch.from_numpy(np.array(frame))[None], torch.tensor([speed_m_per_s], dtype=torch.float32)
            )
            keys = int(decide(logits)[0])
        return Decision(tuple(float(v) for v in logits[0]), keys)

    def infer_batch(
        self, frames: Sequence[np.ndarray], speeds: Sequence[float], timeout_s: float
    ) -> list[Decision | InvalidArgument]:
        """The frames as one forward pass: the floor a served batch of the same size is set against."""
        for frame, speed in zip(frames, speeds, strict=True):
            check_frame_array(frame)
            encode_speed(speed)
        with torch.inference_mode():
            logits = self.net(torch.from_numpy(np.stack(frames)), torch.tensor(list(speeds), dtype=torch.float32))
            keys = decide(logits)
        return [Decision(tuple(float(v) for v in row), int(k)) for row, k in zip(logits, keys, strict=True)]

    def close(self) -> None:
        pass
