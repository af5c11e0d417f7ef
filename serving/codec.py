"""The wire format between the autopilot and the model server: raw frame bytes and speed in, logits and keys out.

Pure code (no grpc, no torch): the handler inside TorchServe and the client both use it, so the two sides
cannot disagree on a byte. A request is a map of named byte strings, as TorchServe's `Predictions` takes it:

- `frame`: the camera frame's raw RGB bytes, row 0 at the top, exactly `height * width * 3` of them;
- `speed`: the dashboard speed in m/s, one little-endian float32 (4 bytes);
- `shape` (optional): `b"<height>x<width>"`, checked against the model's input so a frame of another size
  fails with a message that says which size was expected.

A response is either `rrp-error:<message>` for a malformed request, or the 6 logits as little-endian
float32 (24 bytes) followed by the keys, one byte (the control mask: bit 0 forward, 1 back, 2 left, 3 right).

A batched request carries the frames of several cars in one call (one request per tick of an autopilot
process instead of one per car): `frames` is N frames' raw bytes concatenated, `speeds` N little-endian
float32, `count` `b"<N>"` and `shape` as above (required here: it is how the frames are cut apart). Its answer is
`rrp-batch:` followed by N items, each a little-endian uint16 length and a single-frame answer (decision or
`rrp-error:`), so one bad item (a speed out of range) fails alone; a malformed whole (sizes that do not add up)
is one `rrp-error:`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from plumbing.errors import InvalidArgument, quote

N_LOGITS = 6
ERROR_PREFIX = b"rrp-error:"  # TorchServe's gRPC frontend answers OK whatever status a handler sets per item
RESPONSE_BYTES = 4 * N_LOGITS + 1
MAX_SPEED_M_PER_S = 1_000.0  # far above the car's 50 m/s: a value beyond it is a client bug, not a speed
BATCH_PREFIX = b"rrp-batch:"
MAX_BATCH = 256  # frames in one batched request: 256 frames of 128x96 are 9.4 MB, near the 8 MiB message cap


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


def encode_batch_request(frames: Sequence[np.ndarray], speeds: Sequence[float]) -> dict[str, bytes]:
    """The request map of N frames of one size: their bytes joined once (the one copy a request needs)."""
    if not 1 <= len(frames) <= MAX_BATCH or len(speeds) != len(frames):
        raise InvalidArgument(f"a batch holds 1..{MAX_BATCH} frames with one speed each, got {len(frames)} frames "
                              f"and {len(speeds)} speeds")  # fmt: skip
    for frame in frames:
        check_frame_array(frame)
        if frame.shape != frames[0].shape:
            raise InvalidArgument(f"the frames of a batch share one size: {frames[0].shape} and {frame.shape}")
    h, w = frames[0].shape[:2]
    return {
        "frames": b"".join(f.data if f.flags.c_contiguous else f.tobytes() for f in frames),
        "speeds": b"".join(encode_speed(s) for s in speeds),
        "count": str(len(frames)).encode(),
        "shape": f"{h}x{w}".encode(),
    }


def is_batch(item: dict[str, bytes | bytearray]) -> bool:
    return "frames" in item


def decode_batch_request(
    item: dict[str, bytes | bytearray], height: int, width: int
) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """A batched request map -> (frames (N, H, W, 3) uint8, speeds (N,) float32, each item's error or None).

    A whole that does not add up is an InvalidArgument; a speed out of range is that item's error alone."""
    frames_bytes, speeds_bytes, count_bytes = item.get("frames"), item.get("speeds"), item.get("count")
    if frames_bytes is None or speeds_bytes is None or count_bytes is None or item.get("shape") is None:
        raise InvalidArgument(f"a batched request needs 'frames', 'speeds', 'count' and 'shape', got {sorted(item)}")
    shape = bytes(item["shape"])
    if shape != f"{height}x{width}".encode():
        raise InvalidArgument(f"frame shape {quote(shape.decode(errors='replace'))}: the model takes {height}x{width}")
    try:
        count = int(bytes(count_bytes))
    except ValueError:
        raise InvalidArgument(f"count must be a decimal number, got {quote(bytes(count_bytes))}") from None
    if not 1 <= count <= MAX_BATCH:
        raise InvalidArgument(f"count must be 1..{MAX_BATCH}, got {count}")
    each = height * width * 3
    if len(frames_bytes) != count * each:
        raise InvalidArgument(
            f"frames hold {len(frames_bytes)} bytes: {count} frames of {height}x{width} RGB uint8 are {count * each}"
        )
    if len(speeds_bytes) != 4 * count:
        raise InvalidArgument(f"speeds must be {count} little-endian float32 ({4 * count} bytes), "
                              f"got {len(speeds_bytes)} bytes")  # fmt: skip
    frames = np.frombuffer(frames_bytes, dtype=np.uint8).reshape(count, height, width, 3)
    speeds = np.frombuffer(speeds_bytes, dtype="<f4").astype(np.float32)
    errors: list[str | None] = [
        None if np.isfinite(s) and abs(s) <= MAX_SPEED_M_PER_S
        else f"speed must be finite and within +-{MAX_SPEED_M_PER_S:g} m/s, got {float(s)!r}"
        for s in speeds
    ]  # fmt: skip
    return frames, speeds, errors


def encode_batch_response(items: Sequence[bytes]) -> bytes:
    """Single-frame answers (decisions or errors) as one batched answer."""
    return BATCH_PREFIX + b"".join(struct.pack("<H", len(p)) + p for p in items)


def decode_batch_response(payload: bytes, count: int) -> list[Decision | InvalidArgument]:
    """A batched answer -> each item's decision, or its refusal; a malformed answer is an InvalidArgument."""
    if payload.startswith(ERROR_PREFIX):
        raise InvalidArgument(f"the model refused the batch: {payload[len(ERROR_PREFIX) :].decode(errors='replace')}")
    if not payload.startswith(BATCH_PREFIX):
        raise InvalidArgument(f"a batched answer starts with {BATCH_PREFIX!r}, got {quote(payload[:40])}")
    out: list[Decision | InvalidArgument] = []
    at = len(BATCH_PREFIX)
    while at < len(payload):
        if at + 2 > len(payload):
            raise InvalidArgument("a batched answer ends inside an item's length")
        (size,) = struct.unpack_from("<H", payload, at)
        item = payload[at + 2 : at + 2 + size]
        if len(item) != size:
            raise InvalidArgument(f"a batched answer's item {len(out)} is cut short")
        try:
            out.append(decode_response(item))
        except InvalidArgument as exc:
            if not item.startswith(ERROR_PREFIX):
                raise
            out.append(exc)
        at += 2 + size
    if len(out) != count:
        raise InvalidArgument(f"a batched answer of {len(out)} items to a request of {count}")
    return out


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
