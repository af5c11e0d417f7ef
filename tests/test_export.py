"""The model's torch.export program and its ONNX file decide as PyTorch does, on frames of the built-in tracks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from game_server.core.drivers import default_driver
from game_server.core.tracks import builtin_tracks
from trainer.vision.data import FrameSet, generate_samples
from trainer.vision.export import OnnxModel, export_onnx, export_program
from trainer.vision.model import DrivingNet, decide
from trainer.vision.train import load_model

SNAPSHOT = Path(__file__).parent / "data" / "main-job-model" / "model.safetensors"
LOGIT_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def model() -> DrivingNet:
    return load_model(SNAPSHOT)


@pytest.fixture(scope="module")
def frames() -> FrameSet:
    """What the camera sees on every built-in track, plain and domain-randomised, at the model's size."""
    names = [t.name for t in builtin_tracks()]
    return generate_samples(names, 2, 30, default_driver(), 0.1, seed=11, size=(128, 96))


@pytest.mark.slow
def test_onnxruntime_decides_as_pytorch_with_the_decision_offset(
    tmp_path: Path, model: DrivingNet, frames: FrameSet
) -> None:
    onnx = OnnxModel(export_onnx(model, tmp_path / "model.onnx"))
    images, speeds = torch.from_numpy(frames.images), torch.from_numpy(frames.speeds)
    with torch.inference_mode():
        reference = model(images, speeds)
        raw = model.raw_logits(images, speeds)
    program = export_program(model).module()
    with torch.inference_mode():
        torch.testing.assert_close(program(images, speeds), reference, rtol=0, atol=LOGIT_TOLERANCE)
    whole = onnx(frames.images, frames.speeds)  # one batch of every frame (~180)
    singles = np.concatenate([onnx(frames.images[i : i + 1], frames.speeds[i : i + 1]) for i in range(16)])
    for logits in (whole, np.concatenate([singles, whole[16:]])):
        assert np.abs(logits - reference.numpy()).max() <= LOGIT_TOLERANCE
        assert torch.equal(decide(torch.from_numpy(logits)), decide(reference))
    # The offset travelled with the file: without it, some decisions of this model change.
    assert np.abs(whole - raw.numpy()).max() > 0.1
    assert not torch.equal(decide(raw), decide(reference))
