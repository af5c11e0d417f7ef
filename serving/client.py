"""Inference clients behind one small interface, so that another server (KServe, Triton, MLServer) could
replace TorchServe: `infer(frame, speed, timeout_s) -> Decision`.

Two implementations over gRPC: TorchServe's own inference API (`Predictions`, the default) and the Open
Inference Protocol (KServe v2 `ModelInfer`). Neither ever calls `StreamPredictions`, which kills a
stateless handler's worker. Every failure a user can act on becomes a distinct domain error.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import grpc
import numpy as np
from google.protobuf import empty_pb2

from plumbing import telemetry
from plumbing.channels import ClientTLS, open_channel
from plumbing.errors import (
    DeadlineExceeded,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    quote,
)
from serving.codec import (
    ERROR_PREFIX,
    Decision,
    check_frame_array,
    decode_batch_response,
    decode_response,
    encode_batch_request,
    encode_request,
    encode_speed,
)
from serving.torchserve_v1 import (
    inference_pb2,
    inference_pb2_grpc,
    open_inference_grpc_pb2,
    open_inference_grpc_pb2_grpc,
)

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 8 * 1024 * 1024
# grpc's default reconnect back-off grows to 120 s: a model server restarted after a minute's outage would
# wait that long for the next attempt. Capped at 1 s, a restarted server is reached again within ~1 s.
RECONNECT_BACKOFF_MS = (("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 500),
                        ("grpc.max_reconnect_backoff_ms", 1000))  # fmt: skip


class Unauthenticated(DomainError):
    """The model server wants a token and the client has none."""

    code = "UNAUTHENTICATED"


class PermissionDenied(DomainError):
    """The model server refused the client's token."""

    code = "PERMISSION_DENIED"


class InferenceClient(Protocol):
    """What the autopilot needs from a model server."""

    model: str
    version: str

    def infer(self, frame: np.ndarray, speed_m_per_s: float, timeout_s: float) -> Decision: ...

    def close(self) -> None: ...


@runtime_checkable
class BatchInferenceClient(InferenceClient, Protocol):
    """A client that also takes the frames of several cars in one call: each item's decision or refusal."""

    def infer_batch(
        self, frames: Sequence[np.ndarray], speeds: Sequence[float], timeout_s: float
    ) -> list[Decision | InvalidArgument]: ...


T = TypeVar("T")


@dataclass(frozen=True)
class ModelRef:
    """`NAME` or `NAME:VERSION` (no version: the server's default version)."""

    name: str
    version: str = ""

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        name, _, version = text.partition(":")
        if not name:
            raise InvalidArgument(f"model {quote(text)}: expected NAME or NAME:VERSION")
        return cls(name, version)

    def __str__(self) -> str:
        return f"{self.name}:{self.version}" if self.version else self.name


def read_token(path: Path | None) -> str | None:
    """The inference key from TorchServe's key_file.json, or a file holding the bare token; None without a file."""
    if path is None:
        return None
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise FailedPrecondition(f"token file {path}: {exc.strerror}") from None
    if text.startswith("{"):
        try:
            return str(json.loads(text)["inference"]["key"])
        except (ValueError, KeyError, TypeError):
            raise InvalidArgument(f"token file {path}: JSON without an inference key") from None
    return text


def _channel(address: str, tls: ClientTLS | None) -> grpc.Channel:
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        *RECONNECT_BACKOFF_MS,
        # A connection of its own, not one shared by every channel to the same address: a client connected
        # again after a stuck call (serving.replicas) must not inherit the connection that held it.
        ("grpc.use_local_subchannel_pool", 1),
    ]
    # Inference is stateless: a name with several replicas spreads its calls over them.
    return telemetry.instrument_channel(open_channel(address, tls, options), "rrp-autopilot")


def _metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def map_rpc_error(exc: grpc.RpcError, address: str, model: ModelRef, has_token: bool) -> DomainError:
    """TorchServe's statuses (often INTERNAL or an empty UNKNOWN) as errors that say what to do."""
    code = exc.code()
    details = (exc.details() or "").strip()
    low = details.lower()
    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED) or "token" in low:
        if not has_token:
            return Unauthenticated(
                f"the model server at {address} requires a token: pass --token-file (TorchServe's key_file.json)"
            )
        return PermissionDenied(f"the model server at {address} refused the token: is the key file current?")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED or (code == grpc.StatusCode.CANCELLED and "rst_stream" in low):
        # TorchServe's frontend resets a stream whose deadline passed: grpc reports that as CANCELLED.
        return DeadlineExceeded(f"no answer from the model server at {address} within the deadline")
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(f"the model server at {address} is unreachable or restarting: {details or code.name}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED or "queue" in low or "overload" in low or "worker" in low:
        # TorchServe answers a full job queue and a worker being restarted alike ("no worker to serve"), and the
        # request a killed worker held "Worker died.": a fallback, not a reason to fail over.
        return ResourceExhausted(f"the model server at {address} is overloaded or restarting a worker: {details}")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(f"model {model} refused the input: {details}")
    if "version" in low and ("not found" in low or "doesn't exist" in low or "does not exist" in low):
        return NotFound(f"model {model.name} has no version {quote(model.version)} on {address}")
    if code == grpc.StatusCode.NOT_FOUND or "not found" in low:
        if model.version:
            return NotFound(f"model {model} not found on {address} (unknown model or version): {details}")
        return NotFound(f"model {quote(model.name)} not found on {address}")
    if model.version and code == grpc.StatusCode.INTERNAL and not details:
        return NotFound(f"model {model} not found on {address}")
    return Unavailable(f"model server at {address}: {code.name} {quote(details, 200)}")


class Busy(DeadlineExceeded):
    """This client's previous call is still unanswered: another replica may take this one."""


RPC_TIMEOUT_S = 30.0  # the call's own gRPC deadline: far beyond any wait, so TorchServe never sees it expire


class _Calls:
    """Unary calls that are waited for, never cancelled, and at most one at a time.

    TorchServe 0.12 answers a call whose client deadline has passed with an IllegalStateException in the
    worker's thread ("call already closed"), and the worker is then restarted with back-off: seconds without
    a model. So the autopilot's deadline is a wait on the answer, not the call's gRPC deadline: a late answer
    is dropped when it comes, and while it is outstanding this client sends nothing new (the caller falls
    back), which also keeps an overloaded server from queueing more than one request per car.
    """

    def __init__(self, address: str, model: ModelRef, has_token: bool) -> None:
        self.address, self.model, self.has_token = address, model, has_token
        self._pending: grpc.Future | None = None
        self._sent = 0.0

    def pending_for(self) -> float:
        """How long the outstanding call has gone unanswered, seconds (0.0: none outstanding)."""
        if self._pending is None or self._pending.done():
            return 0.0
        return time.monotonic() - self._sent

    def call(self, method: Any, request: Any, wait_s: float, metadata: tuple[tuple[str, str], ...]) -> Any:
        if self._pending is not None and not self._pending.done():
            raise Busy(f"the previous inference on {self.address} is still unanswered")
        future = method.future(request, timeout=max(wait_s, RPC_TIMEOUT_S), metadata=metadata)
        self._pending, self._sent = future, time.monotonic()
        try:
            return future.result(timeout=wait_s)
        except grpc.FutureTimeoutError:
            raise DeadlineExceeded(f"no answer from the model server at {self.address} within the deadline") from None
        except grpc.RpcError as exc:
            raise map_rpc_error(exc, self.address, self.model, self.has_token) from None

    def settle(self, timeout_s: float = 5.0) -> None:
        """Waits for an outstanding call before the channel closes (closing would cancel it)."""
        if self._pending is not None:
            with contextlib.suppress(grpc.FutureTimeoutError, grpc.RpcError):
                self._pending.exception(timeout=timeout_s)


class TorchServeClient:
    """TorchServe's own gRPC inference API: one unary `Predictions` per frame."""

    def __init__(self, address: str, model: ModelRef, token: str | None = None, tls: ClientTLS | None = None) -> None:
        self.address, self.model_ref, self.token = address, model, token
        self.model, self.version = model.name, model.version
        self.channel = _channel(address, tls)
        self.stub = inference_pb2_grpc.InferenceAPIsServiceStub(self.channel)
        self._metadata = _metadata(token)
        self._calls = _Calls(address, model, token is not None)

    def infer(self, frame: np.ndarray, speed_m_per_s: float, timeout_s: float) -> Decision:
        request = inference_pb2.PredictionsRequest(
            model_name=self.model, model_version=self.version, input=encode_request(frame, speed_m_per_s)
        )
        response = self._calls.call(self.stub.Predictions, request, timeout_s, self._metadata)
        return self._decoded(response.prediction, decode_response)

    def infer_batch(
        self, frames: Sequence[np.ndarray], speeds: Sequence[float], timeout_s: float
    ) -> list[Decision | InvalidArgument]:
        """One `Predictions` call for every frame (see serving.codec's batched request)."""
        request = inference_pb2.PredictionsRequest(
            model_name=self.model, model_version=self.version, input=encode_batch_request(frames, speeds)
        )
        response = self._calls.call(self.stub.Predictions, request, timeout_s, self._metadata)
        return self._decoded(response.prediction, lambda payload: decode_batch_response(payload, len(frames)))

    def settle(self, timeout_s: float) -> None:
        """Waits until the last call is answered (or `timeout_s`): a late call keeps this client busy till then."""
        self._calls.settle(timeout_s)

    def pending_for(self) -> float:
        return self._calls.pending_for()

    def _decoded(self, payload: bytes, decode: Callable[[bytes], T]) -> T:
        """The answer decoded: a refusal stays INVALID_ARGUMENT; an answer not in the wire format (another
        model, a proxy's page) is the server's fault, UNAVAILABLE, so that another replica is asked."""
        try:
            return decode(payload)
        except InvalidArgument as exc:
            if payload.startswith(ERROR_PREFIX):
                raise
            raise Unavailable(f"the model server at {self.address} answered garbage: {exc}") from None

    def close(self) -> None:
        self._calls.settle()
        self.channel.close()


class OpenInferenceClient:
    """The Open Inference Protocol (KServe v2) `ModelInfer`, which Triton, KServe and MLServer speak too.

    TorchServe drops `raw_input_contents` and turns typed tensors into a JSON body for the handler, so the
    frame travels as a list of integers: it works, but costs far more than the raw bytes of `Predictions`
    (see docs/serving.md). TorchServe serves it instead of its own API when started with `open_inference`.
    """

    def __init__(self, address: str, model: ModelRef, token: str | None = None, tls: ClientTLS | None = None) -> None:
        self.address, self.model_ref, self.token = address, model, token
        self.model, self.version = model.name, model.version
        self.channel = _channel(address, tls)
        self.stub = open_inference_grpc_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self._metadata = _metadata(token)
        self._calls = _Calls(address, model, token is not None)

    def infer(self, frame: np.ndarray, speed_m_per_s: float, timeout_s: float) -> Decision:
        check_frame_array(frame)
        encode_speed(speed_m_per_s)
        tensor = open_inference_grpc_pb2.ModelInferRequest.InferInputTensor
        contents = open_inference_grpc_pb2.InferTensorContents
        request = open_inference_grpc_pb2.ModelInferRequest(
            model_name=self.model,
            model_version=self.version,
            inputs=[
                tensor(
                    name="frame",
                    datatype="UINT8",
                    shape=list(frame.shape),
                    contents=contents(uint_contents=frame.ravel().tolist()),
                ),
                tensor(name="speed", datatype="FP32", shape=[1], contents=contents(fp32_contents=[speed_m_per_s])),
            ],
        )
        response = self._calls.call(self.stub.ModelInfer, request, timeout_s, self._metadata)
        outputs = {o.name: o for o in response.outputs}
        if "error" in outputs:
            message = b"".join(outputs["error"].contents.bytes_contents).decode(errors="replace")
            raise InvalidArgument(f"the model refused the input: {message}")
        if "logits" not in outputs or "keys" not in outputs:
            raise Unavailable(f"model server at {self.address}: a ModelInfer answer without logits and keys")
        logits = tuple(float(v) for v in outputs["logits"].contents.fp32_contents)
        keys = list(outputs["keys"].contents.int_contents)
        return Decision(logits, int(keys[0]) if keys else 0)

    def pending_for(self) -> float:
        return self._calls.pending_for()

    def close(self) -> None:
        self._calls.settle()
        self.channel.close()


PROTOCOLS = ("torchserve", "oip")


def connect(
    protocol: str, address: str, model: ModelRef, token: str | None, tls: ClientTLS | None = None
) -> InferenceClient:
    """A client of `model` at `address`, over TLS when `tls` has a CA (a TLS front such as `rrp auth-proxy`)."""
    if protocol == "torchserve":
        return TorchServeClient(address, model, token, tls)
    if protocol == "oip":
        return OpenInferenceClient(address, model, token, tls)
    raise InvalidArgument(f"protocol {quote(protocol)}: one of {', '.join(PROTOCOLS)}")


def ping(address: str, token: str | None = None, timeout_s: float = 2.0) -> bool:
    """TorchServe's health: True when it answers Healthy."""
    with grpc.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        try:
            response = stub.Ping(empty_pb2.Empty(), timeout=timeout_s, metadata=_metadata(token))
        except grpc.RpcError as exc:
            raise map_rpc_error(exc, address, ModelRef("-"), token is not None) from None
    return "healthy" in response.health.lower()
