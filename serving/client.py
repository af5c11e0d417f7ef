"""Inference clients behind one small interface, so that another server (KServe, Triton, MLServer) could
replace TorchServe: `infer(frame, speed, timeout_s) -> Decision`.

Two implementations over gRPC: TorchServe's own inference API (`Predictions`, the default) and the Open
Inference Protocol (KServe v2 `ModelInfer`). Neither ever calls `StreamPredictions`, which kills a
stateless handler's worker. Every failure a user can act on becomes a distinct domain error.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

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

    def call(self, method: Any, request: Any, wait_s: float, metadata: tuple[tuple[str, str], ...]) -> Any:
        if self._pending is not None and not self._pending.done():
            raise Busy(f"the previous inference on {self.address} is still unanswered")
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
RESOLVE_EVERY_S = 1.0  # a name's addresses are looked up again this often: a new replica serves within ~1 s
RETRY_DOWN_S = 1.0  # a replica found unavailable is left out of the rotation this long, then tried again


def _host_name(address: str) -> tuple[str, str] | None:
    """(host name, port) of `name:port`; None for an IP literal or what is not `host:port`."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return None
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        return host, port


def resolve_address(address: str) -> list[str]:
    """`host:port` -> every `ip:port` the host name resolves to (an IP literal: itself)."""
    named = _host_name(address)
    if named is None:
        return [address]
    host, port = named
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except OSError as exc:
        raise Unavailable(f"model server name {quote(host)} does not resolve: {exc}") from None
    found: list[str] = []
    for family, *_, sockaddr in infos:
        ip = str(sockaddr[0])
        target = f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}"
        if target not in found:
            found.append(target)
    return found


class Replicas:
    """The model server's replicas: the given addresses, each name expanded to every address it resolves to,
    looked up again every `every_s` in a background thread (a call never waits on DNS), as a headless Service's
    name lists its pods. `origin(target)` is the given address a resolved one came from (whose token it uses)."""

    def __init__(
        self,
        addresses: tuple[str, ...],
        resolve: Callable[[str], list[str]] = resolve_address,
        every_s: float = RESOLVE_EVERY_S,
    ) -> None:
        if not addresses:
            raise InvalidArgument("give at least one model server address")
        self.addresses, self._resolve, self.every_s = addresses, resolve, every_s
        self._origin: dict[str, str] = {}
        self.targets: tuple[str, ...] = ()
        self.refresh()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if resolve is not resolve_address or any(_host_name(a) is not None for a in addresses):
            self._thread = threading.Thread(target=self._follow, name="model-server-resolver", daemon=True)
            self._thread.start()

    def refresh(self) -> None:
        """Looks every name up again; a name that fails to resolve keeps its last addresses."""
        targets: list[str] = []
        origin = dict(self._origin)
        for address in self.addresses:
            try:
                found = self._resolve(address)
            except DomainError as exc:
                found = [t for t, o in self._origin.items() if o == address] or [address]
                log.warning("%s", exc)
            for target in found:
                origin[target] = address
                if target not in targets:
                    targets.append(target)
        if tuple(targets) != self.targets:
            if self.targets:
                log.info("model server replicas now %s", ", ".join(targets))
            self._origin, self.targets = origin, tuple(targets)

    def origin(self, target: str) -> str:
        return self._origin.get(target, target)

    def _follow(self) -> None:
        while not self._stop.wait(self.every_s):
            self.refresh()

    def close(self) -> None:
        self._stop.set()


class FailoverClient:
    """One model over replicas of the model server, round robin: each call goes to the next replica, so that
    replicas share the load; one that is UNAVAILABLE (down, refusing connections) hands the call to the next
    within the same call's budget, so a replica's death costs no tick, and it is left out of the rotation for
    `RETRY_DOWN_S` before it is tried again. A replica that joins (a name resolving to one more address) takes
    calls from the next lookup on.

    Only UNAVAILABLE fails over: a missing model, a refused input or token would be refused by every replica
    alike. A refused token, though, is what a restarted TorchServe answers (it generates new keys on every
    start): that replica is connected again (at most once a second), which re-reads its token, and asked again.
    Calls come from one thread (a car, or the batcher's sender).
    """

    def __init__(
        self,
        addresses: tuple[str, ...] | Replicas,
        model: ModelRef,
        connect_one: Callable[[str], InferenceClient],
    ):
        self._owns_replicas = not isinstance(addresses, Replicas)
        self.replicas = addresses if isinstance(addresses, Replicas) else Replicas(addresses)
        self.model_ref, self._connect_one = model, connect_one
        self.model, self.version = model.name, model.version
        self._clients: dict[str, InferenceClient] = {}
        self._refreshed: dict[str, float] = {}
        self._down: dict[str, float] = {}  # replica -> when it was found unavailable
        self._next = 0
        self.calls: dict[str, int] = {}  # answered calls per replica: how the load was shared
        self.first_answer: dict[str, float] = {}  # each replica's first answer, wall clock (when it joined)

    @property
    def addresses(self) -> tuple[str, ...]:
        return self.replicas.targets

    def _client(self, target: str) -> InferenceClient:
        client = self._clients.get(target)
        if client is None:
            client = self._clients[target] = self._connect_one(target)
        return client

    def _refresh(self, target: str) -> bool:
        """Connects the replica again (its token re-read); False when it was done within the last second."""
        now = time.monotonic()
        if now - self._refreshed.get(target, 0.0) < REFRESH_EVERY_S:
            return False
        self._refreshed[target] = now
        try:
            fresh = self._connect_one(target)
        except DomainError as exc:  # e.g. the key file not written yet by a TorchServe starting again
            log.debug("model server %s: cannot connect again yet: %s", target, exc)
            return False
        old, self._clients[target] = self._clients.get(target), fresh
        if old is not None:
            old.close()
        return True

    def _ask(self, target: str, call: Callable[[InferenceClient, float], T], deadline: float) -> T:
        try:
            return call(self._client(target), max(deadline - time.monotonic(), 0.0))
        except (PermissionDenied, Unauthenticated):
            if not self._refresh(target):
                raise
            return call(self._client(target), max(deadline - time.monotonic(), 0.0))

    def _order(self) -> list[str]:
        """This call's replicas: the rotation from the next one, those found down lately at the end."""
        now = time.monotonic()
        targets = self.replicas.targets
        up = [t for t in targets if now - self._down.get(t, -RETRY_DOWN_S) >= RETRY_DOWN_S]
        down = [t for t in targets if t not in up]
        start, self._next = self._next, self._next + 1
        return [up[(start + k) % len(up)] for k in range(len(up))] + down

    def infer(self, frame: np.ndarray, speed_m_per_s: float, timeout_s: float) -> Decision:
        return self.call(lambda client, left: client.infer(frame, speed_m_per_s, left), timeout_s)

    def infer_batch(
        self, frames: list[np.ndarray], speeds: list[float], timeout_s: float
    ) -> list[Decision | InvalidArgument]:
        def one(client: InferenceClient, left: float) -> list[Decision | InvalidArgument]:
            if not isinstance(client, BatchInferenceClient):
                raise InvalidArgument(f"{type(client).__name__} takes no batches")
            return client.infer_batch(frames, speeds, left)

        return self.call(one, timeout_s)

    def call(self, call: Callable[[InferenceClient, float], T], timeout_s: float) -> T:
        """`call(replica's client, seconds left)` on the next replica, failing over on UNAVAILABLE."""
        deadline = time.monotonic() + timeout_s
        unavailable: DomainError | None = None
        busy: DomainError | None = None  # a replica alive but on its last call: this call is late, not failed
        for step, target in enumerate(self._order()):
            if step and deadline - time.monotonic() <= 0.001:
                # Replicas not asked may be up: out of time, the call is late rather than unavailable.
                raise busy or DeadlineExceeded(f"no time left to ask another model server replica after {unavailable}")
            try:
                answer = self._ask(target, call, deadline)
            except Busy as exc:  # still on its last call: the next replica, if any, is asked instead
                busy = exc
                continue
            except DomainError as exc:
                if exc.code == "UNAVAILABLE":
                    self._mark_down(target, exc)
                    unavailable = exc
                    continue
                if exc.code != "DEADLINE_EXCEEDED":
                    self._mark_up(target)  # it answered, if with an error
                raise
            self._mark_up(target)
            self.calls[target] = self.calls.get(target, 0) + 1
            self.first_answer.setdefault(target, time.time())
            return answer
        if busy is not None:
            raise busy
        assert unavailable is not None  # every replica was asked: each busy or unavailable
        raise unavailable

    def settle(self, timeout_s: float) -> None:
        """Waits until every replica's last call is answered (or `timeout_s` in all)."""
        deadline = time.monotonic() + timeout_s
        for client in list(self._clients.values()):
            settle = getattr(client, "settle", None)
            if settle is not None:
                settle(max(deadline - time.monotonic(), 0.0))

    def _mark_down(self, target: str, exc: DomainError) -> None:
        metrics.MODEL_SERVER_UP.labels(target).set(0)
        if target not in self._down:
            others = [t for t in self.replicas.targets if t != target and t not in self._down]
            metrics.FAILOVERS.labels(target, others[0] if others else "-").inc()
            log.warning("model server %s unavailable: failed over to %s (%s)", target,
                        others[0] if others else "none left", exc)  # fmt: skip
        self._down[target] = time.monotonic()

    def _mark_up(self, target: str) -> None:
        metrics.MODEL_SERVER_UP.labels(target).set(1)
        self._down.pop(target, None)

    def close(self) -> None:
        if self._owns_replicas:
            self.replicas.close()
        for client in self._clients.values():
            client.close()


PROTOCOLS = ("torchserve", "oip")


def connect(protocol: str, address: str, model: ModelRef, token: str | None) -> InferenceClient:
    if protocol == "torchserve":
        return TorchServeClient(address, model, token)
    if protocol == "oip":
        return OpenInferenceClient(address, model, token)
    raise InvalidArgument(f"protocol {quote(protocol)}: one of {', '.join(PROTOCOLS)}")


def connect_replicas(
    protocol: str,
    addresses: tuple[str, ...] | Replicas,
    model: ModelRef,
    token_of: Callable[[str], str | None],
) -> FailoverClient:
    """A client over the model server's replicas (each name re-resolved, see `Replicas`); `token_of(address)`,
    of the address as given, is asked again when a token is refused."""

    def connect_one(target: str) -> InferenceClient:
        return connect(protocol, target, model, token_of(client.replicas.origin(target)))

    client = FailoverClient(addresses, model, connect_one)
    return client


def ping(address: str, token: str | None = None, timeout_s: float = 2.0) -> bool:
    """TorchServe's health: True when it answers Healthy."""
    with grpc.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        try:
            response = stub.Ping(empty_pb2.Empty(), timeout=timeout_s, metadata=_metadata(token))
        except grpc.RpcError as exc:
            raise map_rpc_error(exc, address, ModelRef("-"), token is not None) from None
    return "healthy" in response.health.lower()
