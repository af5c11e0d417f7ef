"""The model exported with torch.export, and from there to ONNX; onnxruntime runs the ONNX file.

The exported graph is the whole `DrivingNet.forward`: raw uint8 frames (N, H, W, 3) and speeds (N,) in,
logits (N, 6) out, normalisation and the `decision_offset` buffer inside, the batch dimension dynamic. So
any ONNX runtime (an edge device, another model server) decides as PyTorch does without this project's code.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from trainer.vision.model import DrivingNet

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
INPUT_NAMES = ("frames", "speed")
OUTPUT_NAME = "logits"
MAX_EXPORT_BATCH = 1024
# The ONNX opset: 18 is what torch 2.13's exporter writes natively and onnxruntime >= 1.14 runs.
OPSET = 18


def export_program(model: DrivingNet) -> torch.export.ExportedProgram:
    """`model.forward` as a torch.export program with a dynamic batch dimension (1..MAX_EXPORT_BATCH)."""
    model.eval()
    c = model.config
    example = (torch.zeros(2, c.height, c.width, 3, dtype=torch.uint8), torch.zeros(2))
    batch = torch.export.Dim("batch", min=1, max=MAX_EXPORT_BATCH)
    return torch.export.export(model, example, dynamic_shapes=({0: batch}, {0: batch}))


def export_onnx(model: DrivingNet, path: Path) -> Path:
    """Writes the torch.export program of `model` as an ONNX file (atomically); returns its path."""
    program = export_program(model)
    tmp = path.with_name(path.name + ".tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter warns about optional operator libraries it skips
        torch.onnx.export(
            program,
            f=str(tmp),
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            opset_version=OPSET,
            external_data=False,  # one self-contained file (weights inside), safe to rename and to archive
            verbose=False,
        )
    os.replace(tmp, path)
    log.info("ONNX model %s (%d KB)", path, path.stat().st_size // 1024)
    return path


class OnnxModel:
    """An ONNX file of the model in onnxruntime on the CPU: numpy frames and speeds in, numpy logits out."""

    def __init__(self, path: Path, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        shape = self.session.get_inputs()[0].shape  # [batch, H, W, 3]
        self.height, self.width = int(shape[1]), int(shape[2])

    def __call__(self, frames: np.ndarray, speeds: np.ndarray) -> np.ndarray:
        feeds = {
            INPUT_NAMES[0]: np.ascontiguousarray(frames, dtype=np.uint8),
            INPUT_NAMES[1]: np.ascontiguousarray(speeds, dtype=np.float32),
        }
        logits: np.ndarray = self.session.run([OUTPUT_NAME], feeds)[0]
        return logits


class OnnxPolicyModel:
    """An `OnnxModel` behind the torch interface a `VisionPilot` calls: tensors in, logits tensor out. One
    onnxruntime thread answers a single frame in ~0.5 ms where eager PyTorch takes ~1.4 ms, with logits
    within ~1e-5 of it (tests/test_export.py), and it leaves the interpreter while it computes."""

    def __init__(self, path: Path) -> None:
        self.onnx = OnnxModel(path, threads=1)

    def __call__(self, frames: torch.Tensor, speed: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.onnx(frames.numpy(), speed.numpy()))
