"""Property test: arbitrary requests to every RPC of every service never answer INTERNAL or UNKNOWN.

Requests are built from the protos' descriptors alone, as a client in another language would: extreme
integers, NaN and infinities, unknown enum values, long strings, oversized repeated fields, nested
messages, and bytes that do not decode at all. After each call the server must still report SERVING.
The budget is small (a few examples per RPC, derandomised) so that it runs in CI on every change.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.server import CollectorConfig, CollectorServer, create_collector_server
from collector.store import RedisConfig
from game_server.game import GameConfig
from game_server.server import GameServer, GameServerConfig, create_game_server
from plumbing.bootstrap import ServerConfig
from plumbing.redis_local import LocalRedis
from rallyrobopilot.v1 import collector_pb2, game_pb2, game_pb2_grpc, scheduler_pb2
from scheduler.executor import PoolConfig
from scheduler.server import SchedulerConfig, SchedulerServer, create_scheduler_server

EXAMPLES_PER_RPC = int(os.environ.get("RRP_FUZZ_EXAMPLES", "30"))
CALL_TIMEOUT_S = 3.0
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
FD = FieldDescriptor
# Streams that last as long as what they watch: a call reads their first message, then cancels.
ENDLESS_STREAMS = {"WatchSession"}

INT_RANGES = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
    FD.TYPE_FIXED64: (0, 2**64 - 1),
}
EXTREME_FLOATS = [math.nan, math.inf, -math.inf, 1e300, -1e300, 0.0, -0.0, 5e-324, 1.0, 100.0]


class Targets:
    """Values a real client would send for some fields, mixed in so that calls get past the first checks."""

    session_id = ""
    collector = ""


def _ints(field: FieldDescriptor) -> st.SearchStrategy[int]:
    low, high = INT_RANGES[field.type]
    edges = [low, high, 0, 1, high - 1, min(high, 100_000), min(high, 100_001)]
    return st.sampled_from(edges) | st.integers(low, high) | st.integers(0, 200)


def _strings(field: FieldDescriptor) -> st.SearchStrategy[str]:
    name = field.name
    plausible = {
        "track": ["oval", "kidney", "gen-7", "gen-", "gen-99999999999999999999"],
        "session_id": ["__session__"],
        "run_id": ["fuzz-run", "r" * 65, "bad id!"],
        "collector_address": ["__collector__", "127.0.0.1:1", "nohost:99999"],
        "kind": ["rays-v1", "rays-v2"],
        "service": ["", "rallyrobopilot.v1.GameService"],
    }.get(name, [])
    base = st.text(max_size=40) | st.sampled_from(["", "x" * 70_000, "\x00\ud7ff\U0010ffff"])
    return st.sampled_from(plausible) | base if plausible else base


def _bytes(field: FieldDescriptor) -> st.SearchStrategy[bytes]:
    masks = st.lists(st.integers(0, 15), max_size=300).map(bytes)
    return masks | st.binary(max_size=64) | st.sampled_from([b"", b"\xff" * 1000, b"\x01" * 100_001])


def _scalar(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    t = field.type
    if t in INT_RANGES:
        return _ints(field)
    if t == FD.TYPE_DOUBLE:
        return st.sampled_from(EXTREME_FLOATS) | st.floats(allow_nan=True, allow_infinity=True)
    if t == FD.TYPE_FLOAT:
        return st.sampled_from(EXTREME_FLOATS[:-1]) | st.floats(width=32)
    if t == FD.TYPE_BOOL:
        return st.booleans()
    if t == FD.TYPE_STRING:
        return _strings(field)
    if t == FD.TYPE_BYTES:
        return _bytes(field)
    if t == FD.TYPE_ENUM:
        values = [v.number for v in field.enum_type.values]
        return st.sampled_from(values) | st.integers(-3, 40)
    assert t == FD.TYPE_MESSAGE
    return messages(field.message_type, depth + 1)


def messages(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Any message of this type: each field left unset or given an arbitrary (often hostile) value."""
    cls = message_factory.GetMessageClass(descriptor)
    if depth > 3:
        return st.just(cls())
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        if field.type == FD.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
            key = _scalar(field.message_type.fields_by_name["key"], depth)
            value = _scalar(field.message_type.fields_by_name["value"], depth)
            fields[field.name] = st.dictionaries(key, value, max_size=40)
            continue
        item = _scalar(field, depth)
        if field.is_repeated:
            small = st.lists(item, max_size=4 if field.type == FD.TYPE_MESSAGE else 20)
            huge = st.builds(lambda n, v: [v] * n, st.sampled_from([1_025, 10_001]), item)
            fields[field.name] = small | huge if depth == 0 else small
        else:
            fields[field.name] = item
    optional = {name: st.none() | strategy for name, strategy in fields.items()}

    def build(values: dict[str, Any]) -> Message:
        msg = cls()
        for name, value in values.items():
            if value is None:
                continue
            field = descriptor.fields_by_name[name]
            if isinstance(value, str):
                value = value.replace("__session__", Targets.session_id).replace("__collector__", Targets.collector)
            if field.type == FD.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
                getattr(msg, name).update(value)
            elif field.is_repeated:
                getattr(msg, name).extend(value)
            elif field.type == FD.TYPE_MESSAGE:
                getattr(msg, name).CopyFrom(value)
            else:
                setattr(msg, name, value)
        return msg

    return st.fixed_dictionaries({}, optional=optional).map(build)


# -- servers ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    with LocalRedis(tmp_path_factory.mktemp("fuzz-redis")) as server:
        yield server


@pytest.fixture(scope="module")
def collector(redis: LocalRedis) -> Iterator[CollectorServer]:
    server = create_collector_server(
        CollectorConfig(redis=RedisConfig(url=redis.url), server=ServerConfig(port=0, service_name="fuzz-collector"))
    )
    yield server
    server.stop(0.2)


@pytest.fixture(scope="module")
def game(collector: CollectorServer) -> Iterator[GameServer]:
    server = create_game_server(
        GameServerConfig(
            server=ServerConfig(port=0, service_name="fuzz-game", stream_idle_timeout_s=5.0),
            game=GameConfig(max_sessions=64),
        )
    )
    with grpc.insecure_channel(server.address) as channel:
        stub = game_pb2_grpc.GameServiceStub(channel)
        Targets.session_id = stub.CreateSession(game_pb2.CreateSessionRequest(track="oval"), timeout=5).session_id
    Targets.collector = collector.address
    yield server
    server.stop(0.2)


@pytest.fixture(scope="module")
def scheduler(game: GameServer) -> Iterator[SchedulerServer]:
    server = create_scheduler_server(
        SchedulerConfig(pool=PoolConfig(servers=(game.address,)), server=ServerConfig(port=0))
    )
    server.pool.wait_ready()
    yield server
    server.stop(0.2)


SERVICES = {
    "game": game_pb2.DESCRIPTOR.services_by_name["GameService"],
    "collector": collector_pb2.DESCRIPTOR.services_by_name["CollectorService"],
    "scheduler": scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"],
}
RPCS = [(service, method.name) for service, d in SERVICES.items() for method in d.methods]


def call(channel: grpc.Channel, method: MethodDescriptor, requests: list[bytes]) -> grpc.StatusCode:
    """Sends raw request bytes; returns the call's status code (OK when it succeeded)."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    try:
        if method.client_streaming and method.server_streaming:
            for _ in channel.stream_stream(path)(iter(requests), timeout=CALL_TIMEOUT_S):
                pass
        elif method.client_streaming:
            channel.stream_unary(path)(iter(requests), timeout=CALL_TIMEOUT_S)
        elif method.server_streaming:
            stream = channel.unary_stream(path)(requests[0], timeout=CALL_TIMEOUT_S)
            for _ in stream:
                if method.name in ENDLESS_STREAMS:
                    stream.cancel()  # its first message proves the request was accepted
                    break
        else:
            channel.unary_unary(path)(requests[0], timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def request_lists(method: MethodDescriptor) -> st.SearchStrategy[list[bytes]]:
    one = messages(method.input_type).map(lambda m: m.SerializeToString())
    garbage = st.sampled_from([b"\xff", b"\x0a\xff\xff\xff", b"\x08" + b"\xff" * 11, b"\x12\x05ab"]) | st.binary(
        min_size=1, max_size=32
    )
    item = one | garbage
    size = 4 if method.client_streaming else 1
    return st.lists(item, min_size=1, max_size=size)


@pytest.mark.parametrize(("service", "rpc"), RPCS)
def test_no_request_answers_internal_or_unknown(
    service: str, rpc: str, game: GameServer, collector: CollectorServer, scheduler: SchedulerServer
) -> None:
    address = {"game": game.address, "collector": collector.address, "scheduler": scheduler.address}[service]
    method = SERVICES[service].methods_by_name[rpc]
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024), ("grpc.max_send_message_length", -1)]
    with grpc.insecure_channel(address, options=options) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        @settings(
            max_examples=EXAMPLES_PER_RPC,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(requests=request_lists(method))
        def check(requests: list[bytes]) -> None:
            code = call(channel, method, requests)
            assert code not in FORBIDDEN, f"{rpc} answered {code.name}"
            reply = health.Check(health_pb2.HealthCheckRequest(), timeout=2)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

        check()
