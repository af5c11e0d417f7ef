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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc
import numpy as np
from google.protobuf import empty_pb2

from plumbing import telemetry
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
from serving import metrics
from serving.codec import Decision, check_frame_array, decode_response, encode_request, encode_speed
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


def _channel(address: str) -> grpc.Channel:
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        *RECONNECT_BACKOFF_MS,
    ]
    return telemetry.instrument_channel(grpc.insecure_channel(address, options=options), "rrp-autopilot")


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

    def call(self, method: Any, request: Any, wait_s: float, metadata: tuple[tuple[str, str], ...]) -> Any:
        if self._pending is not None and not self._pending.done():
            raise DeadlineExceeded(f"the previous inference on {self.address} is still unanswered")
        future = method.future(request, timeout=max(wait_s, RPC_TIMEOUT_S), metadata=metadata)
        self._pending = future
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

    def __init__(self, address: str, model: ModelRef, token: str | None = None) -> None:
        self.address, self.model_ref, self.token = address, model, token
        self.model, self.version = model.name, model.version
        self.channel = _channel(address)
        self.stub = inference_pb2_grpc.InferenceAPIsServiceStub(self.channel)
        self._metadata = _metadata(token)
        self._calls = _Calls(address, model, token is not None)

    def infer(self, frame: np.ndarray, speed_m_per_s: float, timeout_s: float) -> Decision:
        request = inference_pb2.PredictionsRequest(
            model_name=self.model, model_version=self.version, input=encode_request(frame, speed_m_per_s)
        )
        response = self._calls.call(self.stub.Predictions, request, timeout_s, self._metadata)
        return decode_response(response.prediction)

    def close(self) -> None:
        self._calls.settle()
        self.channel.close()


class OpenInferenceClient:
    """The Open Inference Protocol (KServe v2) `ModelInfer`, which Triton, KServe and MLServer speak too.

    TorchServe drops `raw_input_contents` and turns typed tensors into a JSON body for the handler, so the
    frame travels as a list of integers: it works, but costs far more than the raw bytes of `Predictions`
    (see docs/serving.md). TorchServe serves it instead of its own API when started with `open_inference`.
    """

    def __init__(self, address: str, model: ModelRef, token: str | None = None) -> None:
        self.address, self.model_ref, self.token = address, model, token
        self.model, self.version = model.name, model.version
        self.channel = _channel(address)
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

    def close(self) -> None:
        self._calls.settle()
        self.channel.close()


REFRESH_EVERY_S = 1.0  # a replica whose token is refused is reconnected at most this often


class FailoverClient:
    """One model over replicas of the model server: the current replica serves; one that is UNAVAILABLE
    (down, refusing connections) hands the call to the next within the same call's budget, so a replica's
    death costs no tick.

    Only UNAVAILABLE fails over: a missing model, a refused input or token would be refused by every replica
    alike. A refused token, though, is what a restarted TorchServe answers (it generates new keys on every
    start): that replica is connected again (at most once a second), which re-reads its token, and asked again.
    The replica that answered stays current (no failing back), so replicas do not flap.
    """

    def __init__(self, addresses: tuple[str, ...], model: ModelRef, connect_one: Callable[[str], InferenceClient]):
        if not addresses:
            raise InvalidArgument("give at least one model server address")
        self.addresses, self.model_ref, self._connect_one = addresses, model, connect_one
        self.model, self.version = model.name, model.version
        self._clients: list[InferenceClient | None] = [None] * len(addresses)
        self._refreshed = [0.0] * len(addresses)
        self.current = 0

    def _client(self, index: int) -> InferenceClient:
        client = self._clients[index]
        if client is None:
            client = self._clients[index] = self._connect_one(self.addresses[index])
        return client

    def _refresh(self, index: int) -> bool:
        """Connects the replica again (its token re-read); False when it was done within the last second."""
        now = time.monotonic()
        if now - self._refreshed[index] < REFRESH_EVERY_S:
            return False
        self._refreshed[index] = now
        try:
            fresh = self._connect_one(self.addresses[index])
        except DomainError as exc:  # e.g. the key file not written yet by a TorchServe starting again
            log.debug("model server %s: cannot connect again yet: %s", self.addresses[index], exc)
            return False
        old, self._clients[index] = self._clients[index], fresh
        if old is not None:
            old.close()
        return True

    def _ask(self, index: int, frame: np.ndarray, speed_m_per_s: float, deadline: float) -> Decision:
        try:
            return self._client(index).infer(frame, speed_m_per_s, max(deadline - time.monotonic(), 0.0))
        except (PermissionDenied, Unauthenticated):
            if not self._refresh(index):
                raise
            return self._client(index).infer(frame, speed_m_per_s, max(deadline - time.monotonic(), 0.0))

    def infer(self, frame: np.ndarray, speed_m_per_s: float, timeout_s: float) -> Decision:
        deadline = time.monotonic() + timeout_s
        first, unavailable = self.current, None
        for step in range(len(self.addresses)):
            if step and deadline - time.monotonic() <= 0.001:
                break
            index = (first + step) % len(self.addresses)
            try:
                decision = self._ask(index, frame, speed_m_per_s, deadline)
            except DomainError as exc:
                if exc.code == "UNAVAILABLE":
                    self._mark(index, up=False)
                    unavailable = exc
                    continue
                if exc.code != "DEADLINE_EXCEEDED":
                    self._mark(index, up=True)  # it answered, if with an error
                self._move_to(index)  # not known dead: the next call starts here rather than at a dead one
                raise
            self._mark(index, up=True)
            self._move_to(index)
            return decision
        assert unavailable is not None  # the loop returns, raises, or saw the first replica unavailable
        raise unavailable

    def _mark(self, index: int, up: bool) -> None:
        metrics.MODEL_SERVER_UP.labels(self.addresses[index]).set(1 if up else 0)

    def _move_to(self, index: int) -> None:
        if index != self.current:
            down, up = self.addresses[self.current], self.addresses[index]
            self.current = index
            metrics.FAILOVERS.labels(down, up).inc()
            log.warning("model server %s unavailable: failed over to %s", down, up)

    def close(self) -> None:
        for client in self._clients:
            if client is not None:
                client.close()


PROTOCOLS = ("torchserve", "oip")


def connect(protocol: str, address: str, model: ModelRef, token: str | None) -> InferenceClient:
    if protocol == "torchserve":
        return TorchServeClient(address, model, token)
    if protocol == "oip":
        return OpenInferenceClient(address, model, token)
    raise InvalidArgument(f"protocol {quote(protocol)}: one of {', '.join(PROTOCOLS)}")


def connect_replicas(
    protocol: str, addresses: tuple[str, ...], model: ModelRef, token_of: Callable[[str], str | None]
) -> FailoverClient:
    """A client over the model server's replicas; `token_of(address)` is asked again when a token is refused."""
    return FailoverClient(addresses, model, lambda address: connect(protocol, address, model, token_of(address)))


def ping(address: str, token: str | None = None, timeout_s: float = 2.0) -> bool:
    """TorchServe's health: True when it answers Healthy."""
    with grpc.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        try:
            response = stub.Ping(empty_pb2.Empty(), timeout=timeout_s, metadata=_metadata(token))
        except grpc.RpcError as exc:
            raise map_rpc_error(exc, address, ModelRef("-"), token is not None) from None
    return "healthy" in response.health.lower()
