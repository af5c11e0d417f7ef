"""Batched inference across cars: the codec's batched request, the handler, the batcher, replicas round robin."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest

from plumbing.errors import DeadlineExceeded, InvalidArgument, Unavailable
from serving import codec
from serving.autopilot import AutopilotConfig
from serving.batching import Batcher
from serving.client import InferenceClient, ModelRef, TorchServeClient
from serving.codec import Decision
from serving.handler import VisionHandler
from serving.inprocess import InProcessClient
from serving.replicas import FailoverClient, Replicas
from serving.torchserve_v1 import inference_pb2, inference_pb2_grpc

from .tiny_models import train_tiny

H, W = 48, 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def handler(model_dir: Path) -> VisionHandler:
    h = VisionHandler()
    h.initialize(SimpleNamespace(system_properties={"model_dir": str(model_dir)}))
    return h


def _frames(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(n)
    return [rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for _ in range(n)]


def _same(a: Decision, b: Decision) -> None:
    """The same decision: batched and single forward passes differ in the last float bits at most."""
    assert a.keys == b.keys and np.allclose(a.logits, b.logits, atol=1e-5)


def test_cars_out_of_range_are_refused_before_anything_starts() -> None:
    for cars in (0, -1, 1_000_000):
        with pytest.raises(InvalidArgument, match=rf"cars must be 1\.\.512, got {cars}"):
            AutopilotConfig(cars=cars)
    with pytest.raises(InvalidArgument, match="batch window"):
        AutopilotConfig(batch_window_ms=-1)


def test_a_batched_request_answers_like_single_ones_and_a_bad_item_fails_alone(handler: VisionHandler) -> None:
    frames, speeds = _frames(5), [0.0, 3.5, 12.0, 30.0, 49.0]
    singles = [codec.decode_response(a) for a in handler.handle(  # type: ignore[arg-type]
        [codec.encode_request(f, s) for f, s in zip(frames, speeds, strict=True)], None)]  # fmt: skip
    mixed = [codec.encode_batch_request(frames, speeds), codec.encode_request(frames[0], speeds[0])]
    batched, single = handler.handle(mixed, None)  # type: ignore[arg-type]
    answers = codec.decode_batch_response(batched, 5)  # type: ignore[arg-type]
    assert codec.decode_response(single) == singles[0]  # type: ignore[arg-type]
    for one, many in zip(singles, answers, strict=True):
        assert isinstance(many, Decision)
        _same(many, one)

    bad = codec.encode_batch_request(frames[:2], speeds[:2])
    bad["speeds"] = bad["speeds"][:4] + np.array([np.nan], "<f4").tobytes()
    first, second = codec.decode_batch_response(handler.handle([bad], None)[0], 2)  # type: ignore[arg-type]
    assert isinstance(first, Decision) and first.keys == singles[0].keys
    assert isinstance(second, InvalidArgument) and "speed must be finite" in str(second)
    for broken, words in [
        ({**bad, "count": b"3"}, "3 frames of 48x64"),
        ({**bad, "count": b"x"}, "decimal"),
        ({**bad, "shape": b"10x10"}, "the model takes 48x64"),
        ({k: v for k, v in bad.items() if k != "shape"}, "needs 'frames'"),
    ]:
        with pytest.raises(InvalidArgument, match=words):
            codec.decode_batch_response(handler.handle([broken], None)[0], 2)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match=r"1\.\.256 frames"):
        codec.encode_batch_request([], [])


def test_the_batcher_sends_one_request_for_every_car_ready(model_dir: Path) -> None:
    local = InProcessClient.load(model_dir / "model.safetensors")
    frames = _frames(6)
    batcher = Batcher(lambda: local, window_s=1.0)  # a long window: only "every live car is in" sends it
    cars = [batcher.car() for _ in frames]
    with futures.ThreadPoolExecutor(len(frames)) as pool:
        answers = list(pool.map(lambda k: cars[k].infer(frames[k], 2.0, 10.0), range(len(frames))))
    assert batcher.sizes == [6]
    for answer, frame in zip(answers, frames, strict=True):
        _same(answer, local.infer(frame, 2.0, 1.0))
    cars[0].close()  # a car that left is not waited for
    t0 = time.monotonic()
    _same(cars[1].infer(frames[1], 2.0, 10.0), answers[1])
    assert time.monotonic() - t0 >= 0.9  # the other 4 live cars were waited for, up to the window
    with pytest.raises(InvalidArgument):
        cars[1].infer(frames[1], float("nan"), 1.0)
    batcher.close()


class _Slow(InProcessClient):
    """Answers after a pause: the car's deadline passes first."""

    def infer_batch(self, frames, speeds, timeout_s):  # type: ignore[no-untyped-def]
        time.sleep(0.3)
        return super().infer_batch(frames, speeds, timeout_s)


def test_a_car_whose_deadline_passes_falls_back_and_the_late_answer_is_dropped(model_dir: Path) -> None:
    local = InProcessClient.load(model_dir / "model.safetensors")
    batcher = Batcher(lambda: _Slow(local.net), window_s=0.0, in_flight=1)
    car = batcher.car()
    frame = _frames(1)[0]
    with pytest.raises(DeadlineExceeded):
        car.infer(frame, 1.0, 0.05)
    _same(car.infer(frame, 1.0, 5.0), local.infer(frame, 1.0, 1.0))
    batcher.close()


class _Replica:
    def __init__(self) -> None:
        self.calls, self.down, self.model, self.version = 0, False, "m", ""

    def infer(self, frame: np.ndarray, speed_m_per_s: float, timeout_s: float) -> Decision:
        if self.down:
            raise Unavailable("down")
        self.calls += 1
        return Decision((0.0,) * 6, 1)

    def close(self) -> None:
        pass


def test_replicas_share_calls_round_robin_and_a_name_that_gains_an_address_spreads_to_it() -> None:
    replicas = {f"10.9.0.{k}:7070": _Replica() for k in (1, 2, 3)}
    name = ["10.9.0.1:7070", "10.9.0.2:7070"]  # what "models:7070" resolves to: a hosts-file-free resolver
    resolved = threading.Event()

    def resolve(address: str) -> list[str]:
        resolved.set()
        return list(name)

    def connect(target: str) -> InferenceClient:
        return replicas[target]

    group = Replicas(("models:7070",), resolve, every_s=0.05)
    client = FailoverClient(group, ModelRef("m"), connect)
    frame = _frames(1)[0]
    for _ in range(100):
        client.infer(frame, 1.0, 1.0)
    assert replicas["10.9.0.1:7070"].calls == replicas["10.9.0.2:7070"].calls == 50
    replicas["10.9.0.1:7070"].down = True  # dies: every call is still answered, by the other
    for _ in range(20):
        assert client.infer(frame, 1.0, 1.0).keys == 1
    name.append("10.9.0.3:7070")  # joins
    deadline = time.monotonic() + 5.0
    while "10.9.0.3:7070" not in group.targets:
        assert time.monotonic() < deadline, "the new replica was not resolved"
        time.sleep(0.01)
    for _ in range(20):
        client.infer(frame, 1.0, 1.0)
    assert replicas["10.9.0.3:7070"].calls >= 7  # the live two share the calls
    client.close()
    group.close()


class _Garbage(inference_pb2_grpc.InferenceAPIsServiceServicer):
    def Predictions(self, request, context):  # type: ignore[no-untyped-def]
        return inference_pb2.PredictionResponse(prediction=b"<html>not a model</html>")


@pytest.fixture()
def garbage_server() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(2))
    inference_pb2_grpc.add_InferenceAPIsServiceServicer_to_server(_Garbage(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


def test_a_model_server_answering_garbage_is_a_clear_error(garbage_server: str) -> None:
    client = TorchServeClient(garbage_server, ModelRef("m"))
    frames = _frames(2)
    with pytest.raises(Unavailable, match="answered garbage"):
        client.infer(frames[0], 1.0, 5.0)
    with pytest.raises(Unavailable, match="answered garbage: a batched answer starts with"):
        client.infer_batch(frames, [1.0, 2.0], 5.0)
    client.close()


class _LosesTheFirstCall(inference_pb2_grpc.InferenceAPIsServiceServicer):
    """Holds its first request unanswered (a request lost on the way), and answers garbage to the rest."""

    def __init__(self) -> None:
        self.calls, self.release = 0, threading.Event()

    def Predictions(self, request, context):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.calls == 1:
            self.release.wait(30.0)
        return inference_pb2.PredictionResponse(prediction=b"<html>not a model</html>")


def test_a_replica_whose_call_is_stuck_is_connected_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A call that goes unanswered holds the replica's client only while it may still be late: once stuck, the
    replica is connected again and asked, rather than the car waiting out the call's 30 s gRPC deadline."""
    from serving import replicas

    servicer = _LosesTheFirstCall()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    inference_pb2_grpc.add_InferenceAPIsServiceServicer_to_server(servicer, server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    monkeypatch.setattr(replicas, "STUCK_CALL_S", 0.5)
    client = FailoverClient((address,), ModelRef("m"), lambda target: TorchServeClient(target, ModelRef("m")))
    frame = _frames(1)[0]
    try:
        with pytest.raises(DeadlineExceeded) as late:
            client.infer(frame, 1.0, 0.2)
        assert "still unanswered" not in str(late.value)
        with pytest.raises(DeadlineExceeded, match="still unanswered"):  # late, not yet stuck: not asked again
            client.infer(frame, 1.0, 0.2)
        assert servicer.calls == 1
        stuck = client._clients[address]
        deadline = time.monotonic() + 10.0
        while stuck.pending_for() < 0.5:  # type: ignore[attr-defined]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(Unavailable, match="answered garbage"):  # the server was reached again, and answered
            client.infer(frame, 1.0, 2.0)
        assert servicer.calls == 2 and client._clients[address] is not stuck
    finally:
        servicer.release.set()
        client.close()
        server.stop(0)
