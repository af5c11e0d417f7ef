"""The ONNX packaging option: an archive whose handler runs onnxruntime, served by a real TorchServe."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from serving.archive import ArchiveConfig, build_archive
from serving.client import ModelRef, TorchServeClient
from serving.inprocess import InProcessClient
from serving.torchserve import LocalTorchServe, TorchServeConfig
from trainer.vision.model import build_model
from trainer.vision.train import save_weights

from .tiny_models import SMALL, TINY_OFFSET

NAME = "rrp-vision-onnx"


@pytest.mark.slow
def test_torchserve_serves_the_onnx_archive_with_pytorchs_decisions(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"  # untrained: the runtime, not the driving, is under test
    model_dir.mkdir()
    model = build_model(SMALL)
    with torch.no_grad():
        model.decision_offset.copy_(TINY_OFFSET)
    save_weights(model.eval(), model_dir / "model.safetensors")
    archive = build_archive(model_dir, "1", tmp_path / "store", ArchiveConfig(name=NAME, format="onnx"))
    with zipfile.ZipFile(archive) as z:
        names = set(z.namelist())
        assert json.loads(z.read("serving.json"))["format"] == "onnx"
    assert {"model.onnx", "handler_onnx.py", "model.safetensors"} <= names
    local = InProcessClient.load(model_dir / "model.safetensors")
    server = LocalTorchServe(TorchServeConfig()).start()
    try:
        server.register(archive)
        assert server.keys is not None
        client = TorchServeClient(server.inference_address, ModelRef(NAME), server.keys.inference)
        try:
            for seed in range(8):
                frame = np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)
                served, expected = client.infer(frame, 4.0 * seed, 10.0), local.infer(frame, 4.0 * seed, 10.0)
                assert served.keys == expected.keys
                assert np.abs(np.array(served.logits) - np.array(expected.logits)).max() <= 1e-5
        finally:
            client.close()
    finally:
        server.stop()
