"""CollectorService under hostile clients and faults: idle streams, acks that mean stored, edge values, restarts."""

from __future__ import annotations

import math
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from collector.client import RunProducer
from collector.server import CollectorConfig, CollectorServer, create_collector_server
from collector.store import FrameStore, RedisConfig
from plumbing.bootstrap import ServerConfig
from plumbing.redis_local import LocalRedis
from rallyrobopilot.v1 import collector_pb2_grpc, sim_pb2
from rallyrobopilot.v1.collector_pb2 import (
    FrameRecord,
    GetRunRequest,
    ImageEncoding,
    IngestRequest,
    ListRunsRequest,
    RunEnd,
    RunSource,
    RunStart,
)
from tests.latency import assert_not_starved, call_times_ms

W, H = 16, 12
IMAGE = bytes(W * H * 3)


def run_start(run_id: str | None = None) -> RunStart:
    return RunStart(
        run_id=run_id or f"rel-{uuid.uuid4().hex[:12]}",
        track="oval",
        source=RunSource.RUN_SOURCE_DRIVER,
        width_px=W,
        height_px=H,
        encoding=ImageEncoding.IMAGE_ENCODING_RAW_RGB,
    )


def frame(start: RunStart, tick: int, **fields: object) -> FrameRecord:
    record = FrameRecord(run_id=start.run_id, tick=tick, image=IMAGE, rays_m=[1.0] * 15)
    for name, value in fields.items():
        setattr(record, name, value)
    return record


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    with LocalRedis(tmp_path_factory.mktemp("redis")) as server:
        yield server


def make_collector(redis: LocalRedis, port: int = 0, **server: object) -> CollectorServer:
    return create_collector_server(
        CollectorConfig(
            redis=RedisConfig(url=redis.url, connect_timeout_s=0.5),
            server=ServerConfig(port=port, service_name="collector-reliability", **server),  # type: ignore[arg-type]
        )
    )


@pytest.fixture(scope="module")
def collector(redis_server: LocalRedis) -> Iterator[CollectorServer]:
    server = make_collector(redis_server, max_streams=230)
    yield server
    server.stop(0.5)


@pytest.fixture(scope="module")
def channel(collector: CollectorServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(collector.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> collector_pb2_grpc.CollectorServiceStub:
    return collector_pb2_grpc.CollectorServiceStub(channel)


@pytest.fixture(scope="module")
def store(redis_server: LocalRedis) -> FrameStore:
    return FrameStore.connect(RedisConfig(url=redis_server.url))


def ingest(stub: collector_pb2_grpc.CollectorServiceStub, messages: list[IngestRequest]) -> list[object]:
    return list(stub.Ingest(iter(messages), timeout=10))


def test_200_idle_ingest_streams_leave_list_runs_and_health_fast(
    channel: grpc.Channel, stub: collector_pb2_grpc.CollectorServiceStub
) -> None:
    health = health_pb2_grpc.HealthStub(channel)

    def poll() -> None:
        health.Check(health_pb2.HealthCheckRequest(), timeout=2)
        stub.ListRuns(ListRunsRequest(limit=5), timeout=2)

    idle = call_times_ms(poll)
    inboxes: list[queue.Queue[IngestRequest | None]] = []
    calls = []
    for _ in range(200):
        inbox: queue.Queue[IngestRequest | None] = queue.Queue()
        inbox.put(IngestRequest(start=run_start()))

        def requests(inbox: queue.Queue[IngestRequest | None] = inbox) -> Iterator[IngestRequest]:
            while (item := inbox.get()) is not None:
                yield item

        inboxes.append(inbox)
        calls.append(stub.Ingest(requests()))
    try:
        time.sleep(1.0)
        assert_not_starved(call_times_ms(poll), idle)
    finally:
        for inbox in inboxes:
            inbox.put(None)
        for call in calls:
            call.cancel()


def test_an_ack_means_stored_even_when_a_stream_rewinds_into_a_skipped_tick(
    stub: collector_pb2_grpc.CollectorServiceStub, store: FrameStore
) -> None:
    start = run_start()
    first = ingest(
        stub,
        [IngestRequest(start=start)] + [IngestRequest(frame=frame(start, t)) for t in (0, 1, 2, 10)],
    )
    assert first[-1].acked_through_tick == 10  # type: ignore[attr-defined]
    acks = []
    with pytest.raises(grpc.RpcError) as err:
        for ack in stub.Ingest(
            iter([IngestRequest(start=start)] + [IngestRequest(frame=frame(start, t)) for t in (5, 6)]), timeout=10
        ):
            acks.append(ack)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "tick 5" in (err.value.details() or "")
    assert all(a.acked_through_tick < 5 or a.acked_through_tick == 0 for a in acks)
    assert [r.tick for r in store.iter_frames(start.run_id)] == [0, 1, 2, 10]
    # A true resend of stored ticks is still a duplicate, acknowledged.
    again = ingest(stub, [IngestRequest(start=start)] + [IngestRequest(frame=frame(start, t)) for t in (2, 10)])
    assert again[-1].acked_through_tick == 10 and again[-1].duplicates == 2  # type: ignore[attr-defined]


BAD_FRAMES = {
    "tick 2**64-1": {"tick": 2**64 - 1},
    "tick 2**60": {"tick": 2**60},
    "NaN ray": {"rays_m": [math.nan] * 15},
    "infinite ray": {"rays_m": [math.inf] * 15},
    "negative ray": {"rays_m": [-1.0] * 15},
    "NaN progress": {"progress_fraction": math.nan},
    "progress above 1": {"progress_fraction": 1.5},
    "infinite state": {"state": sim_pb2.SimState(car=sim_pb2.CarState(x_m=math.inf))},
    "NaN state arc": {"state": sim_pb2.SimState(lap=sim_pb2.LapState(arc_m=math.nan))},
}


@pytest.mark.parametrize("case", sorted(BAD_FRAMES))
def test_edge_values_in_frames_are_invalid_argument(
    stub: collector_pb2_grpc.CollectorServiceStub, store: FrameStore, case: str
) -> None:
    start = run_start()
    changes = dict(BAD_FRAMES[case])
    tick = int(changes.pop("tick", 0))  # type: ignore[call-overload]
    bad = frame(start, tick)
    for name, value in changes.items():
        if isinstance(value, sim_pb2.SimState):
            bad.state.CopyFrom(value)
        elif name == "rays_m":
            del bad.rays_m[:]
            bad.rays_m.extend(value)  # type: ignore[arg-type]
        else:
            setattr(bad, name, value)
    with pytest.raises(grpc.RpcError) as err:
        ingest(stub, [IngestRequest(start=start), IngestRequest(frame=bad)])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert store.frame_count(start.run_id) == 0


def test_get_run_with_a_huge_id_is_not_found_with_a_short_message(
    stub: collector_pb2_grpc.CollectorServiceStub,
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.GetRun(GetRunRequest(run_id="r" * 3_000_000), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert len(err.value.details() or "") < 300
    assert list(stub.ListRuns(ListRunsRequest(track="t" * 1_000_000), timeout=10).runs) == []


def test_undecodable_ingest_bytes_are_invalid_argument(channel: grpc.Channel) -> None:
    call = channel.stream_stream("/rallyrobopilot.v1.CollectorService/Ingest", None, None)
    with pytest.raises(grpc.RpcError) as err:
        list(call(iter([b"\x0a\xff\xff"]), timeout=5))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.slow
def test_a_producer_rides_out_a_collector_restart(redis_server: LocalRedis, store: FrameStore) -> None:
    """A collector down for ~3 s costs time only: every frame stored once, the producer never fails."""
    first = make_collector(redis_server)
    port = first.port
    start = run_start()
    restarted = threading.Event()
    servers = [first]

    def restart() -> None:
        time.sleep(0.3)
        first.stop(0)
        time.sleep(3.0)
        servers.append(make_collector(redis_server, port=port))
        restarted.set()

    threading.Thread(target=restart, daemon=True).start()
    try:
        with RunProducer(
            f"127.0.0.1:{port}", start, window=64, timeout_s=5.0, reconnect_attempts=3, outage_budget_s=30.0
        ) as producer:
            for tick in range(300):
                producer.send(frame(start, tick))
                time.sleep(0.005)
            stats = producer.finish(RunEnd(finished=False))
        assert restarted.is_set()
        assert stats.acked == 300 and stats.reconnects >= 1
        assert [r.tick for r in store.iter_frames(start.run_id)] == list(range(300))
    finally:
        for server in servers:
            server.stop(0)


def test_a_dead_collector_still_fails_once_the_outage_budget_is_spent(tmp_path: Path) -> None:
    start = run_start()
    t0 = time.monotonic()
    with RunProducer("127.0.0.1:1", start, timeout_s=1.0, reconnect_attempts=1, outage_budget_s=1.5) as producer:
        producer.send(frame(start, 0))
        with pytest.raises(Exception, match="unreachable"):
            producer.finish(RunEnd())
    assert 1.5 <= time.monotonic() - t0 < 10


def test_an_abandoned_record_frees_its_slot(collector: CollectorServer) -> None:
    from game_server.game import GameConfig
    from game_server.server import GameServerConfig, create_game_server
    from rallyrobopilot.v1 import game_pb2, game_pb2_grpc

    game = create_game_server(
        GameServerConfig(server=ServerConfig(port=0, service_name="game-record"), game=GameConfig(max_sessions=2))
    )
    try:
        with grpc.insecure_channel(game.address) as channel:
            stub = game_pb2_grpc.GameServiceStub(channel)

            def record(run_id: str, ticks: int, timeout: float) -> game_pb2.RecordResponse:
                request = game_pb2.RecordRequest(
                    run_id=run_id,
                    track="oval",
                    driver=sim_pb2.DriverParams(
                        kind="rays-v1", params=[0.3, 0.5, 0.8, 1.2, 1.6, 2.0, 2.5, 0.05, 8.0, 0.45, 3.0]
                    ),
                    max_ticks=ticks,
                    encoding=ImageEncoding.IMAGE_ENCODING_RAW_RGB,
                    collector_address=collector.address,
                )
                return stub.Record(request, timeout=timeout)  # type: ignore[no-any-return]

            assert record(f"warm-{uuid.uuid4().hex[:8]}", 3, 60).frames == 3  # the renderer starts here
            with pytest.raises(grpc.RpcError) as err:
                record(f"cut-{uuid.uuid4().hex[:8]}", 100_000, 1.0)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            t0 = time.monotonic()
            while stub.GetServerInfo(game_pb2.GetServerInfoRequest(), timeout=2).evaluate_running:
                assert time.monotonic() - t0 < 2.0, "the recording went on after its caller left"
                time.sleep(0.01)
    finally:
        game.stop(0.2)


def test_list_runs_never_answers_more_than_fits_in_a_reply(redis_server: LocalRedis) -> None:
    server = make_collector(redis_server, max_message_bytes=256 * 1024)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = collector_pb2_grpc.CollectorServiceStub(channel)
            labels = {f"k{i:02d}": "v" * 200 for i in range(30)}  # ~7 KB a run
            for _ in range(60):
                start = run_start()
                start.labels.update(labels)
                start.track = "fat-labels"
                ingest(stub, [IngestRequest(start=start)])
            reply = stub.ListRuns(ListRunsRequest(track="fat-labels", limit=60), timeout=10)
            assert 0 < len(reply.runs) < 60 and reply.ByteSize() <= 256 * 1024
    finally:
        server.stop(0.2)


def _exact_ticks(store: FrameStore, run_id: str, frames: int) -> None:
    """Redis holds ticks 0..frames-1 of the run, each once."""
    assert [r.tick for r in store.iter_frames(run_id, batch=500)] == list(range(frames))
    assert store.frame_count(run_id) == frames


def test_a_resent_pipelined_batch_after_a_reconnect_stores_only_what_was_missing(
    redis_server: LocalRedis, store: FrameStore
) -> None:
    start = run_start()
    store.start_run(start)
    first = store.append(start.run_id, [frame(start, t) for t in range(64)])
    assert (first.stored, first.duplicates) == (64, 0)
    killed = redis_server.client().client_kill_filter(_type="normal", skipme=True)
    assert killed >= 1  # the store's pooled connection is dead: the next batch goes out on a fresh one
    # A producer that lost its acknowledgement resends from its last acknowledged tick: an overlapping batch.
    resent = store.append(start.run_id, [frame(start, t) for t in range(32, 128)])
    assert (resent.stored, resent.duplicates, resent.stored_frames) == (64, 32, 128)
    again = store.append(start.run_id, [frame(start, t) for t in range(32, 128)])
    assert (again.stored, again.duplicates) == (0, 96)
    _exact_ticks(store, start.run_id, 128)


def test_pipelined_ingest_loses_and_duplicates_nothing_while_redis_connections_are_killed(
    redis_server: LocalRedis, collector: CollectorServer, store: FrameStore
) -> None:
    start, frames = run_start(), 1500
    stop, kills = threading.Event(), [0]
    killer = redis_server.client()

    def kill_loop() -> None:
        # Every few milliseconds, drop the collector's Redis connections, mid-transaction or between them.
        while not stop.wait(0.005):
            kills[0] += int(killer.client_kill_filter(_type="normal", skipme=True))

    thread = threading.Thread(target=kill_loop, daemon=True)
    thread.start()
    try:
        with RunProducer(collector.address, start, window=256, timeout_s=20.0, outage_budget_s=30.0) as producer:
            for tick in range(frames):
                producer.send(frame(start, tick))
            stats = producer.finish(RunEnd(finished=True))
    finally:
        stop.set()
        thread.join()
    assert kills[0] > 0
    assert stats.acked == frames and stats.stored_frames == frames
    _exact_ticks(store, start.run_id, frames)
