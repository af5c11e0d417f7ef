"""The TorchServe handler: raw uint8 frames and speeds in, logits and keys out; nothing else.

TorchServe copies this file into the model archive and imports it in each worker, with the Python that
started TorchServe (where this project is installed). It loads `model.safetensors` from the archive (no
pickle), validates every request of a batch on its own, and answers a malformed one with an error payload for
that request alone (TorchServe's gRPC frontend answers OK whatever per-request status a handler sets, and
a raised exception would fail the whole batch as INTERNAL); the client turns it into INVALID_ARGUMENT.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch

from plumbing.errors import DomainError
from serving.codec import (
    decode_batch_request,
    decode_oip_request,
    decode_request,
    encode_batch_response,
    encode_error,
    encode_oip_error,
    encode_oip_response,
    encode_response,
    is_batch,
)
from trainer.vision.model import decide
from trainer.vision.train import load_model

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
THREADS_ENV = "RRP_SERVING_THREADS"  # torch threads per worker; 1 keeps workers from fighting over cores


class VisionHandler:
    """One worker's model; `handle` takes TorchServe's batch (a list of request maps) and answers each."""

    def __init__(self) -> None:
        self.model: Any = None
        self.width = self.height = 0

    def initialize(self, context: Any) -> None:
        model_dir = context.system_properties.get("model_dir")
        torch.set_num_threads(int(os.environ.get(THREADS_ENV, "1")))
        self.model = load_model(_weights_path(model_dir))
        self.width, self.height = self.model.config.width, self.model.config.height
        log.info("vision model loaded: %dx%d input, %d threads", self.width, self.height, torch.get_num_threads())

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[bytes | dict[str, Any]]:
        """Every frame of the batch (single requests and batched ones alike) goes through one forward pass."""
        answers: list[bytes | dict[str, Any]] = [b"" for _ in data]
        oip = [_oip_body(item) for item in data]
        frames: list[np.ndarray] = []  # (n, H, W, 3) blocks, in order
        speeds: list[np.ndarray] = []
        # Each request's rows in the stacked batch: (request, first row, row count, per-row errors or None).
        spans: list[tuple[int, int, int, list[str | None] | None]] = []
        rows = 0
        for i, item in enumerate(data):
            body = oip[i]
            try:
                errors: list[str | None] | None = None
                if body is not None:
                    frame, speed = decode_oip_request(body, self.height, self.width)
                    block, block_speeds = frame[None], np.array([speed], dtype=np.float32)
                elif is_batch(inputs := _inputs(item)):
                    block, block_speeds, errors = decode_batch_request(inputs, self.height, self.width)
                else:
                    frame, speed = decode_request(inputs, self.height, self.width)
                    block, block_speeds = frame[None], np.array([speed], dtype=np.float32)
            except DomainError as exc:
                answers[i] = (
                    encode_oip_error(str(exc), _meta(body, context)) if body is not None else encode_error(str(exc))
                )
                continue
            frames.append(block)
            speeds.append(block_speeds)
            spans.append((i, rows, len(block), errors))
            rows += len(block)
        if not spans:
            return answers
        batch = np.concatenate(frames)  # one writable (N, H, W, 3) block: the request bytes stay read-only
        all_speeds = np.concatenate(speeds)
        # A bad item of a batched request is answered alone; its row still runs (with a harmless speed of 0).
        all_speeds = np.where(np.isfinite(all_speeds), all_speeds, 0.0).astype(np.float32)
        logits = self.logits(batch, all_speeds)
        keys = decide(logits)
        values = logits.numpy()
        for i, first, count, errors in spans:
            body = oip[i]
            if body is not None:
                answers[i] = encode_oip_response(values[first], int(keys[first]), _meta(body, context))
            elif errors is None:
                answers[i] = encode_response(values[first], int(keys[first]))
            else:
                answers[i] = encode_batch_response(
                    [_answer(values[first + k], int(keys[first + k]), errors[k]) for k in range(count)]
                )
        return answers

    def logits(self, frames: np.ndarray, speeds: np.ndarray) -> torch.Tensor:
        """The model's (N, 6) logits of a batch: the one step another runtime replaces (serving/handler_onnx.py)."""
        with torch.inference_mode():
            out: torch.Tensor = self.model(torch.from_numpy(frames), torch.from_numpy(speeds))
            return out


def _answer(logits: np.ndarray, keys: int, error: str | None) -> bytes:
    return encode_error(error) if error is not None else encode_response(logits, keys)


def _weights_path(model_dir: str) -> Any:
    from pathlib import Path

    return Path(model_dir) / WEIGHTS


def _inputs(item: Any) -> dict[str, bytes | bytearray]:
    """TorchServe hands each request's inputs as a dict of name -> bytes (gRPC) or bytearray (HTTP)."""
    if not isinstance(item, dict):
        return {}
    return {str(k): v for k, v in item.items() if isinstance(v, bytes | bytearray)}


def _oip_body(item: Any) -> dict[str, Any] | None:
    """The JSON body TorchServe makes of an Open Inference Protocol request, or None for a Predictions one."""
    body = item.get("body") if isinstance(item, dict) else None
    return body if isinstance(body, dict) and "inputs" in body else None


def _meta(body: dict[str, Any], context: Any) -> dict[str, str]:
    model = (getattr(context, "manifest", None) or {}).get("model", {})
    return {
        "id": str(body.get("id", "")),
        "model_name": str(model.get("modelName", "")),
        "model_version": str(model.get("modelVersion", "")),
    }
