"""The wire format between the autopilot and the model server: raw frame bytes and speed in, logits and keys out.

Pure code (no grpc, no torch): the handler inside TorchServe and the client both use it, so the two sides
cannot disagree on a byte. A request is a map of named byte strings, as TorchServe's `Predictions` takes it:

- `frame`: the camera frame's raw RGB bytes, row 0 at the top, exactly `height * width * 3` of them;
- `speed`: the dashboard speed in m/s, one little-endian float32 (4 bytes);
- `shape` (optional): `b"<height>x<width>"`, checked against the model's input so a frame of another size
  fails with a message that says which size was expected.

A response is either `rrp-error:<message>` for a malformed request, or the 6 logits as little-endian
float32 (24 bytes) followed by the keys, one byte (the control mask: bit 0 forward, 1 back, 2 left, 3 right).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from plumbing.errors import InvalidArgument, quote

N_LOGITS = 6
ERROR_PREFIX = b"rrp-error:"  # TorchServe's gRPC frontend answers OK whatever status a handler sets per item
RESPONSE_BYTES = 4 * N_LOGITS + 1
MAX_SPEED_M_PER_S = 1_000.0  # far above the car's 50 m/s: a value beyond it is a client bug, not a speed


@dataclass(frozen=True)
class Decision:
    """What the model decided for one frame."""

    logits: tuple[float, ...]
    keys: int


def encode_request(frame: np.ndarray, speed_m_per_s: float) -> dict[str, bytes]:
    """The request map for one frame; refuses anything that is not an (H, W, 3) uint8 array."""
    check_frame_array(frame)
    h, w = frame.shape[:2]
    return {
        "frame": np.ascontiguousarray(frame).tobytes(),
        "speed": encode_speed(speed_m_per_s),
        "shape": f"{h}x{w}".encode(),
    }


def encode_speed(speed_m_per_s: float) -> bytes:
    if not np.isfinite(speed_m_per_s) or abs(speed_m_per_s) > MAX_SPEED_M_PER_S:
        raise InvalidArgument(f"speed must be finite and within +-{MAX_SPEED_M_PER_S:g} m/s, got {speed_m_per_s!r}")
    return struct.pack("<f", speed_m_per_s)


def check_frame_array(frame: object) -> None:
    if not isinstance(frame, np.ndarray):
        raise InvalidArgument(f"a frame must be a numpy array, got {type(frame).__name__}")
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise InvalidArgument(f"a frame must be (height, width, 3) uint8 RGB, got {frame.shape} {frame.dtype}")


def decode_request(item: dict[str, bytes | bytearray], height: int, width: int) -> tuple[np.ndarray, float]:
    """One request map -> (frame (H, W, 3) uint8, speed m/s); every malformed input is an InvalidArgument."""
    frame_bytes, speed_bytes = item.get("frame"), item.get("speed")
    if frame_bytes is None or speed_bytes is None:
        raise InvalidArgument(f"a request needs 'frame' and 'speed' inputs, got {sorted(item)}")
    shape = item.get("shape")
    if shape is not None and bytes(shape) != f"{height}x{width}".encode():
        raise InvalidArgument(
            f"frame shape {quote(bytes(shape).decode(errors='replace'))}: the model takes {height}x{width}"
        )
    expected = height * width * 3
    if len(frame_bytes) != expected:
        raise InvalidArgument(
            f"frame has {len(frame_bytes)} bytes: the model takes {height}x{width} RGB uint8 = {expected} bytes"
        )
    if len(speed_bytes) != 4:
        raise InvalidArgument(f"speed must be one little-endian float32 (4 bytes), got {len(speed_bytes)} bytes")
    (speed,) = struct.unpack("<f", bytes(speed_bytes))
    if not np.isfinite(speed) or abs(speed) > MAX_SPEED_M_PER_S:
        raise InvalidArgument(f"speed must be finite and within +-{MAX_SPEED_M_PER_S:g} m/s, got {speed!r}")
    frame = np.frombuffer(bytes(frame_bytes), dtype=np.uint8).reshape(height, width, 3)
    return frame, float(speed)


def encode_response(logits: np.ndarray, keys: int) -> bytes:
    return np.asarray(logits, dtype="<f4").reshape(N_LOGITS).tobytes() + bytes([keys & 0x0F])


def encode_error(message: str) -> bytes:
    return ERROR_PREFIX + message.encode()


def decode_response(payload: bytes) -> Decision:
    if payload.startswith(ERROR_PREFIX):
        raise InvalidArgument(f"the model refused the input: {payload[len(ERROR_PREFIX) :].decode(errors='replace')}")
    if len(payload) != RESPONSE_BYTES:
        raise InvalidArgument(f"a model response has {RESPONSE_BYTES} bytes, got {len(payload)}: {quote(payload)}")
    logits = np.frombuffer(payload[: 4 * N_LOGITS], dtype="<f4")
    return Decision(tuple(float(v) for v in logits), payload[-1])


# -- Open Inference Protocol (KServe v2) -----------------------------------------------------------------------
# TorchServe turns a ModelInferRequest into a JSON body {"inputs": [{"name", "datatype", "shape", "data"}]}
# (raw_input_contents are dropped), and the handler's answer {"outputs": [...]} back into a ModelInferResponse.


def decode_oip_request(body: dict[str, Any], height: int, width: int) -> tuple[np.ndarray, float]:
    """An OIP JSON body -> (frame, speed): inputs `frame` (UINT8, shape [H, W, 3]) and `speed` (FP32, [1])."""
    inputs = {str(t.get("name")): t for t in body.get("inputs", []) if isinstance(t, dict)}
    frame_t, speed_t = inputs.get("frame"), inputs.get("speed")
    if frame_t is None or speed_t is None:
        raise InvalidArgument(f"a request needs 'frame' and 'speed' tensors, got {sorted(inputs)}")
    if list(frame_t.get("shape", [])) != [height, width, 3]:
        raise InvalidArgument(
            f"frame tensor shape {quote(frame_t.get('shape'))}: the model takes [{height}, {width}, 3]"
        )
    data = frame_t.get("data") or []
    if len(data) != height * width * 3:
        raise InvalidArgument(f"frame tensor has {len(data)} values, its shape says {height * width * 3}")
    frame = np.asarray(data, dtype=np.int64)
    if frame.min() < 0 or frame.max() > 255:
        raise InvalidArgument("frame values must be 0..255 (UINT8)")
    speeds = speed_t.get("data") or []
    if len(speeds) != 1:
        raise InvalidArgument(f"speed tensor must hold one value, got {len(speeds)}")
    speed = float(np.float32(speeds[0]))
    if not np.isfinite(speed) or abs(speed) > MAX_SPEED_M_PER_S:
        raise InvalidArgument(f"speed must be finite and within +-{MAX_SPEED_M_PER_S:g} m/s")
    return frame.astype(np.uint8).reshape(height, width, 3), speed


def encode_oip_response(logits: np.ndarray, keys: int, meta: dict[str, str]) -> dict[str, Any]:
    """`meta`: id, model_name and model_version, which TorchServe's frontend requires in every answer."""
    return {
        **meta,
        "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": [N_LOGITS], "data": [float(v) for v in logits]},
            {"name": "keys", "datatype": "INT32", "shape": [1], "data": [int(keys)]},
        ],
    }


def encode_oip_error(message: str, meta: dict[str, str]) -> dict[str, Any]:
    return {**meta, "outputs": [{"name": "error", "datatype": "BYTES", "shape": [1], "data": [message]}]}
