"""CollectorService end to end: real redis-server and collector processes, the RunProducer client, grpcurl."""

from __future__ import annotations

import io
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from collector.client import ProducerStats, RunProducer
from collector.server import CollectorConfig, CollectorServer, create_collector_server
from collector.store import FrameStore, RedisConfig
from plumbing import errors
from plumbing.bootstrap import ServerConfig
from plumbing.procs import ServiceProcess, start_service
from plumbing.redis_local import LocalRedis
from rallyrobopilot.v1 import collector_pb2, collector_pb2_grpc
from rallyrobopilot.v1.collector_pb2 import FrameRecord, ImageEncoding, IngestRequest, RunEnd, RunSource, RunStart

GRPCURL = str(Path(__file__).resolve().parent.parent / ".venv" / "bin" / "grpcurl")
W, H = 128, 96


def run_start(encoding: ImageEncoding = ImageEncoding.IMAGE_ENCODING_RAW_RGB, run_id: str | None = None) -> RunStart:
    return RunStart(
        run_id=run_id or f"test-{uuid.uuid4().hex[:12]}",
        track="oval",
        source=RunSource.RUN_SOURCE_DRIVER,
        driver_id="d0",
        width_px=W,
        height_px=H,
        encoding=encoding,
        labels={"purpose": "test"},
    )


def image(tick: int, encoding: int) -> bytes:
    """A frame with content that changes with the tick (so PNG sizes vary as real frames do)."""
    y, x = np.mgrid[0:H, 0:W]
    rgb = np.stack([(x + tick) % 256, (y * 2 + tick) % 256, ((x ^ y) + 3 * tick) % 256], axis=-1).astype(np.uint8)
    if encoding == ImageEncoding.IMAGE_ENCODING_RAW_RGB:
        return rgb.tobytes()
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def record(start: RunStart, tick: int, img: bytes) -> FrameRecord:
    return FrameRecord(
        run_id=start.run_id, tick=tick, image=img, applied_mask=tick % 16, label_mask=1, rays_m=[1.0] * 15
    )


def produce(
    address: str,
    start: RunStart,
    frames: int,
    *,
    pace_s: float = 0.0,
    window: int = 256,
    reconnect_attempts: int = 8,
    on_tick: Callable[[int], None] | None = None,
) -> ProducerStats:
    images = [image(t, start.encoding) for t in range(min(frames, 16))]
    with RunProducer(address, start, window=window, timeout_s=20.0, reconnect_attempts=reconnect_attempts) as p:
        for tick in range(frames):
            p.send(record(start, tick, images[tick % len(images)]))
            if on_tick is not None:
                on_tick(tick)
            if pace_s:
                time.sleep(pace_s)
        return p.finish(RunEnd(finished=True, lap_ticks=frames))


def assert_exactly_once(store: FrameStore, run_id: str, frames: int) -> None:
    ticks = [r.tick for r in store.iter_frames(run_id, batch=100)]
    assert ticks == list(range(frames))
    assert store.frame_count(run_id) == frames
    info = store.get_run(run_id)
    assert info.end is not None and info.end.frames == frames


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    with LocalRedis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def store(redis_server: LocalRedis) -> FrameStore:
    return FrameStore.connect(RedisConfig(url=redis_server.url))


@pytest.fixture(scope="module")
def collector(redis_server: LocalRedis) -> Iterator[ServiceProcess]:
    proc = start_service(["collector", "--port", "0", "--redis", redis_server.url])
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def stub(collector: ServiceProcess) -> Iterator[collector_pb2_grpc.CollectorServiceStub]:
    with grpc.insecure_channel(collector.address) as channel:
        yield collector_pb2_grpc.CollectorServiceStub(channel)


@pytest.fixture()
def own_redis(tmp_path: Path) -> Iterator[LocalRedis]:
    """A Redis of the test's own, for tests that stop it or fill it."""
    server = LocalRedis(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture()
def own_collector(own_redis: LocalRedis) -> Iterator[CollectorServer]:
    server = create_collector_server(
        CollectorConfig(
            redis=RedisConfig(url=own_redis.url, connect_timeout_s=0.5),
            server=ServerConfig(port=0, service_name="collector-test", max_message_bytes=4 * 1024 * 1024),
        )
    )
    yield server
    server.stop(0.5)


def test_four_concurrent_producers_store_every_frame_exactly_once(collector: ServiceProcess, store: FrameStore) -> None:
    encodings = [ImageEncoding.IMAGE_ENCODING_RAW_RGB, ImageEncoding.IMAGE_ENCODING_PNG] * 2
    starts = [run_start(e) for e in encodings]
    stats: dict[str, ProducerStats] = {}

    def go(start: RunStart) -> None:
        stats[start.run_id] = produce(collector.address, start, 300)

    threads = [threading.Thread(target=go, args=(s,)) for s in starts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for start in starts:
        s = stats[start.run_id]
        assert (s.frames, s.acked, s.duplicates, s.stored_frames) == (300, 300, 0, 300)
        assert_exactly_once(store, start.run_id, 300)
    png = next(store.iter_frames(starts[1].run_id))
    assert png.image.startswith(b"\x89PNG") and png.applied_mask == 0 and len(png.rays_m) == 15


def test_producer_survives_a_collector_killed_mid_stream(redis_server: LocalRedis, store: FrameStore) -> None:
    proc = start_service(["collector", "--port", "0", "--redis", redis_server.url])
    port = proc.port
    start = run_start()
    killed = threading.Event()
    restarted: list[ServiceProcess] = []

    def kill_then_restart(tick: int) -> None:
        if tick == 150 and not killed.is_set():
            proc.kill()  # SIGKILL: no goodbye, acknowledgements in flight are lost
            killed.set()
            restarted.append(start_service(["collector", "--port", str(port), "--redis", redis_server.url]))

    try:
        stats = produce(proc.address, start, 400, pace_s=0.002, window=64, on_tick=kill_then_restart)
    finally:
        for p in [proc, *restarted]:
            p.stop()
    assert killed.is_set() and stats.reconnects >= 1
    assert stats.frames == stats.acked == 400
    assert_exactly_once(store, start.run_id, 400)


def test_acknowledged_frames_survive_a_redis_restart(own_redis: LocalRedis, own_collector: CollectorServer) -> None:
    start = run_start()
    stats = produce(own_collector.address, start, 200)
    assert stats.acked == 200
    own_redis.client().shutdown()  # SHUTDOWN; the append-only file is fsynced on every write
    own_redis.proc.wait(10)  # type: ignore[union-attr]
    own_redis.start()
    with grpc.insecure_channel(own_collector.address) as channel:
        got = collector_pb2_grpc.CollectorServiceStub(channel).GetRun(
            collector_pb2.GetRunRequest(run_id=start.run_id), timeout=10
        )
    assert got.run.stored_frames == 200 and got.run.end.frames == 200
    assert_exactly_once(FrameStore.connect(RedisConfig(url=own_redis.url)), start.run_id, 200)


def test_redis_down_is_unavailable_and_the_collector_recovers_by_itself(
    own_redis: LocalRedis, own_collector: CollectorServer
) -> None:
    own_redis.stop()
    with pytest.raises(errors.Unavailable, match="unreachable"):
        produce(own_collector.address, run_start(), 20, reconnect_attempts=1)
    with grpc.insecure_channel(own_collector.address) as channel:
        stub = collector_pb2_grpc.CollectorServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.ListRuns(collector_pb2.ListRunsRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "unreachable" in (err.value.details() or "")
    own_redis.start()
    start = run_start()
    assert produce(own_collector.address, start, 50).acked == 50
    assert_exactly_once(FrameStore.connect(RedisConfig(url=own_redis.url)), start.run_id, 50)


def test_a_full_redis_is_resource_exhausted(own_redis: LocalRedis, own_collector: CollectorServer) -> None:
    r = own_redis.client()
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", "1mb")
    with pytest.raises(errors.ResourceExhausted, match="Redis is full"):
        produce(own_collector.address, run_start(), 10)  # refused at its start
    used = int(r.info("memory")["used_memory"])
    r.config_set("maxmemory", str(used + 512 * 1024))
    start = run_start()
    with pytest.raises(errors.ResourceExhausted, match=r"Redis is full.*append"):
        produce(own_collector.address, start, 100)  # refused in the middle: 100 raw frames are 3.7 MB
    # A batch is one MULTI/EXEC transaction: the refused batch stores nothing, so Redis holds a gap-free prefix.
    stored = [r.tick for r in FrameStore.connect(RedisConfig(url=own_redis.url)).iter_frames(start.run_id)]
    assert stored == list(range(len(stored))) and len(stored) < 100
    r.config_set("maxmemory", "0")
    assert produce(own_collector.address, run_start(), 10).acked == 10


def _ingest_code(stub: collector_pb2_grpc.CollectorServiceStub, messages: list[IngestRequest]) -> grpc.StatusCode:
    try:
        list(stub.Ingest(iter(messages), timeout=10))
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        return code
    return grpc.StatusCode.OK


def _bad_streams() -> dict[str, tuple[list[IngestRequest], grpc.StatusCode]]:
    ok = run_start()
    raw = image(0, ImageEncoding.IMAGE_ENCODING_RAW_RGB)

    def frame(tick: int, img: bytes = raw, applied_mask: int = 0) -> IngestRequest:
        return IngestRequest(frame=FrameRecord(run_id=ok.run_id, tick=tick, image=img, applied_mask=applied_mask))

    def with_start(start: RunStart, *frames: IngestRequest) -> list[IngestRequest]:
        return [IngestRequest(start=start), *frames]

    png_start = run_start(ImageEncoding.IMAGE_ENCODING_PNG, run_id=ok.run_id + "p")
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    return {
        "frame first": ([frame(0)], grpc.StatusCode.FAILED_PRECONDITION),
        "bad run_id": (with_start(run_start(run_id="bad id!")), invalid),
        "unspecified encoding": (with_start(run_start(ImageEncoding.IMAGE_ENCODING_UNSPECIFIED)), invalid),
        "too large frame size": (with_start(replaced(ok, width_px=4096)), invalid),
        "wrong raw size": (with_start(ok, frame(0, raw[:-1])), invalid),
        "non-increasing tick": (with_start(ok, frame(5), frame(5)), invalid),
        "mask 16": (with_start(ok, frame(0, applied_mask=16)), invalid),
        "png without magic": (
            [IngestRequest(start=png_start), IngestRequest(frame=FrameRecord(run_id=png_start.run_id, image=raw))],
            invalid,
        ),
        "5 MB image": (with_start(ok, frame(0, b"\0" * (5 * 1024 * 1024))), grpc.StatusCode.RESOURCE_EXHAUSTED),
        "second start": (with_start(ok, IngestRequest(start=ok)), grpc.StatusCode.FAILED_PRECONDITION),
    }


def replaced(start: RunStart, **changes: object) -> RunStart:
    copy = RunStart()
    copy.CopyFrom(start)
    for name, value in changes.items():
        setattr(copy, name, value)
    return copy


@pytest.mark.parametrize("case", list(_bad_streams()))
def test_malformed_streams_get_their_status_code(stub: collector_pb2_grpc.CollectorServiceStub, case: str) -> None:
    messages, code = _bad_streams()[case]
    assert _ingest_code(stub, messages) == code
    good = run_start()
    ok = [IngestRequest(start=good), IngestRequest(frame=record(good, 0, image(0, good.encoding)))]
    assert _ingest_code(stub, ok) == grpc.StatusCode.OK  # and the collector keeps serving


def test_producer_raises_the_collectors_refusal(collector: ServiceProcess, store: FrameStore) -> None:
    start = run_start()
    raw = image(0, start.encoding)
    with RunProducer(collector.address, start, timeout_s=10.0) as p:
        for tick in range(10):
            p.send(record(start, tick, raw))
        p.send(FrameRecord(run_id=start.run_id, tick=10, image=raw, label_mask=16))
        with pytest.raises(errors.InvalidArgument, match=r"control masks are 0\.\.15"):
            p.finish()
    assert store.frame_count(start.run_id) == 10  # the valid records before the bad one were stored


def test_a_reconnecting_producer_resends_without_duplicates(collector: ServiceProcess, store: FrameStore) -> None:
    start = run_start()
    raw = image(0, start.encoding)
    with grpc.insecure_channel(collector.address) as channel:  # a first stream that stored ticks 0..59
        stub = collector_pb2_grpc.CollectorServiceStub(channel)
        msgs = [IngestRequest(start=start)] + [IngestRequest(frame=record(start, t, raw)) for t in range(60)]
        assert _ingest_code(stub, msgs) == grpc.StatusCode.OK
    stats = produce(collector.address, start, 100)  # then everything again, as after a lost acknowledgement
    assert stats.duplicates == 60 and stats.stored_frames == 100
    assert_exactly_once(store, start.run_id, 100)


def test_a_run_id_cannot_be_reused_with_other_metadata(stub: collector_pb2_grpc.CollectorServiceStub) -> None:
    start = run_start()
    assert _ingest_code(stub, [IngestRequest(start=start)]) == grpc.StatusCode.OK
    other = replaced(start, track="kidney")
    assert _ingest_code(stub, [IngestRequest(start=other)]) == grpc.StatusCode.FAILED_PRECONDITION


def test_list_runs_and_get_run(collector: ServiceProcess, stub: collector_pb2_grpc.CollectorServiceStub) -> None:
    track = f"track-{uuid.uuid4().hex[:6]}"
    starts = []
    for _ in range(3):
        start = replaced(run_start(), track=track)
        produce(collector.address, start, 5)
        starts.append(start)
    runs = stub.ListRuns(collector_pb2.ListRunsRequest(track=track), timeout=10).runs
    assert [r.start.run_id for r in runs] == [s.run_id for s in reversed(starts)]
    assert all(r.stored_frames == 5 and r.end.finished for r in runs)
    assert len(stub.ListRuns(collector_pb2.ListRunsRequest(track=track, limit=2), timeout=10).runs) == 2
    assert len(stub.ListRuns(collector_pb2.ListRunsRequest(limit=2), timeout=10).runs) == 2
    got = stub.GetRun(collector_pb2.GetRunRequest(run_id=starts[0].run_id), timeout=10).run
    assert got.start == starts[0] and got.stored_frames == 5 and got.started_unix_s > 0
    with pytest.raises(grpc.RpcError) as err:
        stub.GetRun(collector_pb2.GetRunRequest(run_id="no-such-run"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_password_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "redis-password"
    secret.write_text("s3cret-" + uuid.uuid4().hex + "\n")
    wrong = tmp_path / "wrong-password"
    wrong.write_text("nope\n")
    with LocalRedis(tmp_path / "redis", password=secret.read_text().strip()) as server:
        good = start_service(["collector", "--port", "0", "--redis", server.url, "--redis-password-file", str(secret)])
        bad = start_service(["collector", "--port", "0", "--redis", server.url], env={"RRP_REDIS_PASSWORD": "nope"})
        try:
            start = run_start()
            assert produce(good.address, start, 20).stored_frames == 20
            with grpc.insecure_channel(bad.address) as channel, pytest.raises(grpc.RpcError) as err:
                collector_pb2_grpc.CollectorServiceStub(channel).GetRun(
                    collector_pb2.GetRunRequest(run_id=start.run_id), timeout=10
                )
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "credentials" in (err.value.details() or "")
        finally:
            good.stop()
            bad.stop()


def test_cli_starts_a_private_redis_when_none_is_given(tmp_path: Path) -> None:
    proc = start_service(["collector", "--port", "0", "--redis-dir", str(tmp_path / "private")])
    try:
        start = run_start()
        assert produce(proc.address, start, 10).stored_frames == 10
        assert any("private redis-server at redis://127.0.0.1:" in line for line in proc.lines)
    finally:
        assert proc.stop() == 0
    assert any((tmp_path / "private").glob("appendonlydir/*.aof"))


def test_grpcurl_lists_the_collector_service(collector: ServiceProcess) -> None:
    out = subprocess.run(
        [GRPCURL, "-plaintext", collector.address, "list"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    assert "rallyrobopilot.v1.CollectorService" in out.split()
    assert "grpc.health.v1.Health" in out.split()
