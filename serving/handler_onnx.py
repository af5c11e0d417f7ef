"""The TorchServe handler of an ONNX archive: the same wire format and checks, onnxruntime instead of PyTorch.

TorchServe imports this file from the archive; it loads `model.onnx` (written from the model's torch.export
program by `rrp package --format onnx`) into an onnxruntime CPU session. Decisions equal the PyTorch handler's
(tests/test_export.py); the input size comes from the ONNX file's own input shape.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from serving.handler import THREADS_ENV, VisionHandler
from trainer.vision.export import ONNX_FILE, OnnxModel

log = logging.getLogger(__name__)


class OnnxVisionHandler(VisionHandler):
    """VisionHandler whose forward pass runs in onnxruntime."""

    def initialize(self, context: Any) -> None:
        model_dir = Path(context.system_properties.get("model_dir"))
        self.model = OnnxModel(model_dir / ONNX_FILE, threads=int(os.environ.get(THREADS_ENV, "1")))
        self.width, self.height = self.model.width, self.model.height
        log.info("ONNX vision model loaded: %dx%d input", self.width, self.height)

    def logits(self, frames: np.ndarray, speeds: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.model(frames, speeds))
