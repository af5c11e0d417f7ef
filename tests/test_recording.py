"""GameService.Record and `rrp collect` end to end: game-server processes streaming frames to a collector into Redis."""

from __future__ import annotations

import io
import json
import math
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from collector.server import CollectorConfig, CollectorServer, create_collector_server
from collector.store import FrameStore, RedisConfig
from game_server.client import GameClient
from game_server.core import drivers, physics
from game_server.core.driver_file import SavedDriver, save_driver
from game_server.core.episode import Perturbation, PerturbationSchedule
from game_server.core.tracks import load_track
from game_server.recording import RecordSpec, record_episode
from game_server.render.renderer import FrameSpec
from pipeline.record_task import Episode, RecordSettings, RecordTask
from plumbing.bootstrap import ServerConfig
from plumbing.procs import ServiceProcess, rrp_command, start_service
from plumbing.redis_local import LocalRedis, free_port
from rallyrobopilot.v1 import collector_pb2, game_pb2, game_pb2_grpc, sim_pb2
from scheduler.executor import EvaluationPool, PoolConfig

TICKS = 150


@dataclass
class Stack:
    redis: LocalRedis
    collector: CollectorServer
    store: FrameStore
    servers: list[ServiceProcess]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A private Redis, a collector on it, and four game-server processes (one evaluation slot each)."""
    redis = LocalRedis(tmp_path_factory.mktemp("redis"), die_with_parent=True).start()
    collector = create_collector_server(
        CollectorConfig(redis=RedisConfig(url=redis.url), server=ServerConfig(port=0, service_name="collector-test"))
    )
    servers = [start_service(["game-server", "--port", "0", "--evaluate-slots", "1"]) for _ in range(4)]
    try:
        yield Stack(redis, collector, FrameStore(redis.client()), servers)
    finally:
        for s in servers:
            s.stop()
        collector.stop(0.5)
        redis.stop()


def driver_pb() -> sim_pb2.DriverParams:
    d = drivers.default_driver()
    return sim_pb2.DriverParams(kind=d.kind, params=d.params)


def record_request(run_id: str, stack: Stack, **fields: object) -> game_pb2.RecordRequest:
    request = game_pb2.RecordRequest(
        run_id=run_id,
        track="oval",
        driver=driver_pb(),
        max_ticks=TICKS,
        frame_options=sim_pb2.FrameOptions(width_px=96, height_px=64),
        encoding=collector_pb2.IMAGE_ENCODING_PNG,
        collector_address=stack.collector.address,
        driver_id="default",
        labels={"test": "record"},
    )
    for name, value in fields.items():
        if hasattr(value, "DESCRIPTOR"):
            getattr(request, name).CopyFrom(value)  # a message (setting one field of a oneof clears the other)
        else:
            setattr(request, name, value)
    return request


def stub_of(server: ServiceProcess) -> game_pb2_grpc.GameServiceStub:
    return game_pb2_grpc.GameServiceStub(grpc.insecure_channel(server.address))


def frames_of(stack: Stack, run_id: str) -> list[collector_pb2.FrameRecord]:
    return list(stack.store.iter_frames(run_id))


def test_record_streams_every_tick_with_labels_and_images(stack: Stack) -> None:
    pert = game_pb2.Perturbation(seed=11, start_probability=0.1, max_duration_ticks=8)
    request = record_request("rec-basic", stack, perturbation=pert)
    response = stub_of(stack.servers[0]).Record(request, timeout=60)
    assert response.frames == TICKS and response.run_id == "rec-basic"
    assert 0 < response.perturbed_ticks < TICKS and response.result.ticks == TICKS

    run = stack.store.get_run("rec-basic")
    assert run.stored_frames == TICKS
    assert run.start.track == "oval" and run.start.source == collector_pb2.RUN_SOURCE_DRIVER
    assert (run.start.width_px, run.start.height_px) == (96, 64)
    assert run.start.encoding == collector_pb2.IMAGE_ENCODING_PNG and run.start.perturbation_seed == 11
    assert run.start.driver_id == "default" and run.start.labels["test"] == "record"
    assert run.end is not None and run.end.frames == TICKS

    records = frames_of(stack, "rec-basic")
    assert [r.tick for r in records] == list(range(TICKS))
    track, driver = load_track("oval"), drivers.default_driver()
    schedule = PerturbationSchedule(Perturbation(11, 0.1, 8))
    perturbed = [schedule.next() is not None for _ in range(TICKS)]
    assert sum(perturbed) == response.perturbed_ticks
    state = track.base_state
    for record, was_perturbed in zip(records, perturbed, strict=True):
        image = np.asarray(Image.open(io.BytesIO(record.image)))
        assert image.shape == (64, 96, 3)
        assert record.state.car.x_m == state.car.x and record.state.tick == state.tick
        assert record.label_mask == driver.act(track, state)  # the label is the driver's intention
        if not was_perturbed:
            assert record.applied_mask == record.label_mask
        assert list(record.rays_m) == list(physics.raycast(track, state.car, state.lap.segment))
        state, _ = physics.step(track, state, record.applied_mask)
    assert any(r.applied_mask != r.label_mask for r in records)
    assert len({r.image for r in records}) > TICKS // 2  # the camera follows the car


def test_same_run_id_is_stored_once_and_same_seed_perturbs_alike(stack: Stack) -> None:
    pert = game_pb2.Perturbation(seed=5, start_probability=0.2, max_duration_ticks=5)
    first = stub_of(stack.servers[1]).Record(record_request("rec-twice", stack, perturbation=pert), timeout=60)
    again = stub_of(stack.servers[2]).Record(record_request("rec-twice", stack, perturbation=pert), timeout=60)
    assert first.frames == again.frames == TICKS
    assert stack.store.get_run("rec-twice").stored_frames == TICKS
    other = stub_of(stack.servers[3]).Record(record_request("rec-same-seed", stack, perturbation=pert), timeout=60)
    assert other.perturbed_ticks == first.perturbed_ticks
    a, b = frames_of(stack, "rec-twice"), frames_of(stack, "rec-same-seed")
    assert [r.applied_mask for r in a] == [r.applied_mask for r in b]
    assert [r.image for r in a] == [r.image for r in b]  # the same episode, frame for frame, on another server


def test_unperturbed_record_drives_exactly_as_evaluate(stack: Stack) -> None:
    with GameClient(stack.servers[0].address) as client:
        evaluated = client.stub.Evaluate(
            game_pb2.EvaluateRequest(track="oval", driver=driver_pb(), max_ticks=TICKS), timeout=30
        )
        recorded = client.stub.Record(
            record_request("rec-plain", stack, encoding=collector_pb2.IMAGE_ENCODING_RAW_RGB), timeout=60
        )
    assert recorded.result == evaluated.result
    records = frames_of(stack, "rec-plain")
    assert all(r.applied_mask == r.label_mask for r in records) and len(records[0].image) == 96 * 64 * 3


@pytest.mark.slow
def test_bad_requests_answer_their_codes_and_the_server_keeps_serving(stack: Stack) -> None:
    stub = stub_of(stack.servers[0])
    program = sim_pb2.ControlProgram(masks=bytes([1]) * 10)
    pert = game_pb2.Perturbation(seed=1, start_probability=0.1, max_duration_ticks=5)
    bad: list[tuple[game_pb2.RecordRequest, grpc.StatusCode]] = [
        (record_request("bad id!", stack), grpc.StatusCode.INVALID_ARGUMENT),
        (record_request("x" * 65, stack), grpc.StatusCode.INVALID_ARGUMENT),
        (record_request("r", stack, max_ticks=0), grpc.StatusCode.INVALID_ARGUMENT),
        (record_request("r", stack, max_ticks=100_001), grpc.StatusCode.INVALID_ARGUMENT),
        (record_request("r", stack, encoding=0), grpc.StatusCode.INVALID_ARGUMENT),
        (record_request("r", stack, jpeg_quality=101), grpc.StatusCode.INVALID_ARGUMENT),
        (record_request("r", stack, program=program, perturbation=pert), grpc.StatusCode.INVALID_ARGUMENT),
        (
            record_request("r", stack, perturbation=game_pb2.Perturbation(start_probability=0.6, max_duration_ticks=5)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            record_request("r", stack, perturbation=game_pb2.Perturbation(start_probability=0.1)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (record_request("r", stack, driver=sim_pb2.DriverParams(kind="rays-v1")), grpc.StatusCode.INVALID_ARGUMENT),
        (record_request("r", stack, track="no-such-track"), grpc.StatusCode.NOT_FOUND),
        (record_request("r", stack, collector_address=f"127.0.0.1:{free_port()}"), grpc.StatusCode.UNAVAILABLE),
    ]
    for request, code in bad:
        with pytest.raises(grpc.RpcError) as info:
            stub.Record(request, timeout=60)
        assert info.value.code() == code, (request.run_id, info.value.details())
    assert stub.Record(record_request("rec-after-errors", stack, max_ticks=3), timeout=60).frames == 3


def test_open_loop_program_records_its_own_masks(stack: Stack) -> None:
    masks = bytes([1] * 20 + [5] * 10)
    request = record_request("rec-program", stack, program=sim_pb2.ControlProgram(masks=masks), max_ticks=40)
    response = stub_of(stack.servers[1]).Record(request, timeout=60)
    assert response.frames == 40
    records = frames_of(stack, "rec-program")
    assert bytes(r.label_mask for r in records) == masks + bytes(10)  # past its end a program coasts


def test_record_episode_core_sends_every_tick_once_in_order() -> None:
    """The core with a fake producer: every tick is sent once, in order, before the run's end."""
    sent: list[collector_pb2.FrameRecord] = []

    @dataclass
    class Stats:
        acked: int
        resent: int = 0

    class Sink:
        def send(self, record: collector_pb2.FrameRecord) -> None:
            sent.append(record)

        def finish(self, end: collector_pb2.RunEnd | None) -> Stats:
            assert end is not None and end.frames == len(sent)
            return Stats(len(sent))

        def close(self) -> None:
            pass

    def render(track: object, state: object, spec: FrameSpec) -> np.ndarray:
        return np.zeros((spec.height, spec.width, 3), np.uint8)

    spec = RecordSpec("core", "oval", None, drivers.default_driver(), 20, FrameSpec(), 1, "unused")
    outcome = record_episode(spec, render, lambda address, start: Sink())
    assert outcome.frames == 20 and [r.tick for r in sent] == list(range(20))


def test_rrp_collect_four_servers_deliver_every_frame_once(stack: Stack, tmp_path: Path) -> None:
    driver = drivers.default_driver()
    path = save_driver(
        tmp_path / "driver.json",
        SavedDriver(kind=driver.kind, track="oval", lap_ticks=0, cost=0.0, generation=0, params=driver.params),
    )
    out = tmp_path / "collect"
    t0 = time.perf_counter()
    args = {
        "--episodes": "8",
        "--drivers": str(path),
        "--tracks": "oval,kidney",
        "--servers": ",".join(s.address for s in stack.servers),
        "--collector": stack.collector.address,
        "--encoding": "jpeg",
        "--max-ticks": "120",
        "--perturb-prob": "0.05",
        "--seed": "3",
        "--out": str(out),
    }
    proc = subprocess.run(
        [*rrp_command(), "collect", *(item for pair in args.items() for item in pair)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / "collect_summary.json").read_text())
    assert summary["runs"] == 8 and summary["failed"] == 0 and summary["frames"] == 8 * 120
    assert time.perf_counter() - t0 < 120
    run_ids = [e["run_id"] for e in summary["episodes"]]
    assert run_ids[:2] == ["collect-s3-oval-0000", "collect-s3-kidney-0001"]
    for run_id in run_ids:
        records = frames_of(stack, run_id)
        assert [r.tick for r in records] == list(range(120)), run_id  # every frame, exactly once
        run = stack.store.get_run(run_id)
        assert run.start.encoding == collector_pb2.IMAGE_ENCODING_JPEG and run.start.domain_randomization
    seeds = {stack.store.get_run(r).start.perturbation_seed for r in run_ids}
    assert len(seeds) == 8
    assert "frames/s" in proc.stdout


def test_record_task_in_process_records_what_a_server_records(stack: Stack) -> None:
    """Calling a RecordTask runs the server's own Record handler here, so it stores the same frames."""
    d = drivers.default_driver()
    saved = SavedDriver(kind=d.kind, track="oval", lap_ticks=0, cost=0.0, generation=0, params=d.params)
    task = RecordTask(RecordSettings(stack.collector.address, max_ticks=30, perturb_probability=0.1))
    local = task(Episode("task-local", "oval", saved, 9, 4))
    remote = stub_of(stack.servers[0]).Record(task.request(Episode("task-remote", "oval", saved, 9, 4)), timeout=60)
    assert local.frames == remote.frames == 30 and local.result == remote.result
    assert [r.image for r in frames_of(stack, "task-local")] == [r.image for r in frames_of(stack, "task-remote")]


def test_recovery_episodes_start_from_random_states(stack: Stack) -> None:
    """Later episodes of a pair start drifting, pinned or the wrong way; the server records them from there."""
    from game_server.core import physics
    from game_server.core.tracks import load_track
    from pipeline.collect import plan_episodes

    d = drivers.default_driver()
    saved = SavedDriver(kind=d.kind, track="oval", lap_ticks=0, cost=0.0, generation=0, params=d.params)
    plan = plan_episodes(6, [saved], ["oval", "kidney"], seed=3, prefix="rec", recovery_share=1.0, recovery_ticks=40)
    assert [e.start is None for e in plan] == [True, True, False, False, False, False]
    assert plan == plan_episodes(6, [saved], ["oval", "kidney"], 3, "rec", 1.0, 40)  # a function of the seed
    for e in plan[2:]:
        assert e.start is not None and e.max_ticks == 40 and "-recovery-" in e.run_id
        physics.validate_state(load_track(e.track), e.start)
    mixed = plan_episodes(60, [saved], ["oval"], 3, "k", 1.0, 40, pinned_share=0.5)
    kinds = {e.run_id.rsplit("-recovery-", 1)[1] for e in mixed[1:]}
    assert kinds == {"drift", "pinned"} and not any(e.recovering for e in mixed)  # no wrong-way unless asked
    turned = plan_episodes(60, [saved], ["oval"], 3, "k", 1.0, 40, 0.5, wrong_way_episodes=9, wrong_way_ticks=30)
    assert turned[:60] == mixed  # the wrong-way episodes come after the others, which stay as they were
    wrong = turned[60:]
    assert len(wrong) == 9 and all(e.recovering and e.max_ticks == 30 for e in wrong)
    assert all(e.run_id.endswith("-recovery-wrong-way") for e in wrong) and not any(e.recovering for e in mixed)
    oval = load_track("oval")
    for e in wrong:
        assert e.start is not None and 0.0 <= e.start.car.speed <= 10.0
        physics.validate_state(oval, e.start)
        tangent = oval.tangent[e.start.lap.segment]
        assert math.cos(e.start.car.heading) * tangent[0] + math.sin(e.start.car.heading) * tangent[1] < -0.8
    assert any(e.start is not None and e.start.car.speed == 0.0 for e in wrong)
    request = RecordTask(RecordSettings("x:1")).request(wrong[0])
    assert request.driver.recovering and not RecordTask(RecordSettings("x:1")).request(mixed[1]).driver.recovering
    program = SavedDriver(kind="program", track="oval", lap_ticks=0, cost=0.0, generation=0, masks=b"\x01")
    with pytest.raises(ValueError, match="closed-loop"):
        plan_episodes(2, [program], ["oval"], 3, "p", 1.0, 40, wrong_way_episodes=1)
    task = RecordTask(RecordSettings(stack.collector.address, max_ticks=3000))
    response = stub_of(stack.servers[0]).Record(task.request(plan[2]), timeout=60)
    assert response.frames == 40
    first, start = frames_of(stack, plan[2].run_id)[0], plan[2].start
    assert start is not None
    assert first.state.car.x_m == start.car.x and first.state.car.speed_m_per_s == start.car.speed


@pytest.mark.parametrize("recovering", [True, False])
def test_a_pinned_recording_is_labelled_with_the_teachers_way_out(stack: Stack, recovering: bool) -> None:
    """Against alpine's hairpin wall, the recovering teacher's labels reverse and the car gets free; the bare
    driver only ever presses forward and stays pinned, so its data shows no way out."""
    from game_server.core.recovery import bend_apexes, pinned_state
    from game_server.core.state import BACK
    from game_server.core.tracks import load_track

    track = load_track("alpine")
    d = drivers.default_driver()
    saved = SavedDriver(kind=d.kind, track="alpine", lap_ticks=0, cost=0.0, generation=0, params=d.params)
    start = pinned_state(track, bend_apexes(track)[0], 1.5)
    settings = RecordSettings(
        stack.collector.address, max_ticks=200, width_px=64, height_px=48, perturb_probability=0, recovering=recovering
    )
    run_id = f"pinned-{'teacher' if recovering else 'bare'}"
    response = stub_of(stack.servers[0]).Record(
        RecordTask(settings).request(Episode(run_id, "alpine", saved, 0, 0, start, 200)), timeout=60
    )
    records = frames_of(stack, run_id)
    assert response.frames == len(records) == 200
    reversing = sum(1 for r in records if r.label_mask & BACK)
    moved = abs(records[-1].state.lap.arc_m - records[0].state.lap.arc_m)
    if recovering:
        assert reversing > 0 and moved > 20.0, (reversing, moved)
    else:
        assert reversing == 0 and moved < 5.0, (reversing, moved)


@pytest.mark.slow
def test_record_retried_after_its_server_is_killed_stores_every_tick_once(stack: Stack) -> None:
    """SIGKILL the server in the middle of a pooled Record: the pool retries on the other server, the episode
    replays identically and the collector skips the ticks Redis already holds, so each tick is stored once."""
    servers = [start_service(["game-server", "--port", "0", "--evaluate-slots", "1"]) for _ in range(2)]
    d = drivers.default_driver()
    saved = SavedDriver(kind=d.kind, track="alpine", lap_ticks=0, cost=0.0, generation=0, params=d.params)
    settings = RecordSettings(stack.collector.address, max_ticks=1500, width_px=96, height_px=64, perturb_probability=0)
    task = RecordTask(settings)
    episode = Episode("rec-killed", "alpine", saved, 0, 7)
    pool = EvaluationPool(PoolConfig(servers=tuple(s.address for s in servers), health_interval_s=0.2, max_attempts=3))
    try:
        pool.wait_ready(2, timeout_s=30)
        future = pool.submit(task, episode)
        deadline = time.monotonic() + 30
        while stack.store.frame_count("rec-killed") < 200:  # some frames are in, far from all
            assert time.monotonic() < deadline and not future.done(), "the recording did not start"
            time.sleep(0.005)
        busy = [s.address for s in pool.status().servers if s.in_flight > 0]
        assert len(busy) == 1
        victim = next(s for s in servers if s.address == busy[0])
        victim.kill()
        held = stack.store.frame_count("rec-killed")
        response = future.result(timeout=60)  # retried on the surviving server
        assert 200 <= held < response.frames
        assert pool.status().retried >= 1 and pool.status().failed == 0
        survivor = next(s for s in servers if s is not victim)
        again = stub_of(survivor).Record(task.request(Episode("rec-undisturbed", "alpine", saved, 0, 7)), timeout=60)
    finally:
        pool.shutdown()
        for s in servers:
            s.stop()
    assert response.frames == again.frames and response.result == again.result and response.result.finished
    records = frames_of(stack, "rec-killed")
    assert [r.tick for r in records] == list(range(response.frames))  # every tick, exactly once
    assert stack.store.get_run("rec-killed").stored_frames == response.frames
    reference = frames_of(stack, "rec-undisturbed")
    assert len(reference) == len(records)
    for got, want in zip(records, reference, strict=True):
        assert got.image == want.image and got.state == want.state
        assert (got.label_mask, got.applied_mask) == (want.label_mask, want.applied_mask)


@pytest.mark.slow
def test_rrp_collect_run_again_completes_a_partial_run(stack: Stack, tmp_path: Path) -> None:
    """A run cut off mid-episode (its producer died) is completed, never duplicated, by running collect again."""
    driver = drivers.default_driver()
    path = save_driver(
        tmp_path / "driver.json",
        SavedDriver(kind=driver.kind, track="oval", lap_ticks=0, cost=0.0, generation=0, params=driver.params),
    )

    def collect(prefix: str) -> dict[str, object]:
        args = ["--episodes", "1", "--drivers", str(path), "--tracks", "oval", "--max-ticks", "60", "--seed", "5"]
        args += ["--servers", stack.servers[0].address, "--collector", stack.collector.address]
        args += ["--run-prefix", prefix, "--out", str(tmp_path / prefix)]
        proc = subprocess.run([*rrp_command(), "collect", *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return json.loads((tmp_path / prefix / "collect_summary.json").read_text())  # type: ignore[no-any-return]

    whole = collect("whole")
    reference = frames_of(stack, "whole-oval-0000")
    assert len(reference) == 60 and whole["failed"] == 0
    # The partial run: the same episode's start and first 25 frames under the id a second collection uses.
    start = collector_pb2.RunStart()
    start.CopyFrom(stack.store.get_run("whole-oval-0000").start)
    start.run_id = "again-oval-0000"
    from collector.client import RunProducer

    with RunProducer(stack.collector.address, start) as producer:
        for record in reference[:25]:
            copy = collector_pb2.FrameRecord()
            copy.CopyFrom(record)
            copy.run_id = start.run_id
            producer.send(copy)
        producer.finish(None)  # acknowledged, no RunEnd: what a producer that died mid-episode leaves
    assert stack.store.get_run("again-oval-0000").end is None
    again = collect("again")
    assert again["failed"] == 0
    completed = frames_of(stack, "again-oval-0000")
    assert [r.tick for r in completed] == list(range(60))  # every tick once
    assert [r.image for r in completed] == [r.image for r in reference]
    assert stack.store.get_run("again-oval-0000").end is not None


def test_shares_outside_zero_to_one_are_refused_before_anything_starts(tmp_path: Path) -> None:
    from pipeline.collect import CollectConfig
    from pipeline.main_job import MainJobConfig

    for bad in ({"pinned_share": 2.0}, {"recovery_share": -0.1}):
        with pytest.raises(ValueError, match="between 0 and 1"):
            CollectConfig(episodes=1, driver_paths=(tmp_path / "d.json",), tracks=("oval",), **bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="between 0 and 1"):
            MainJobConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="wrong_way_episodes must be 0 or more"):
        CollectConfig(episodes=1, driver_paths=(tmp_path / "d.json",), tracks=("oval",), wrong_way_episodes=-1)
    with pytest.raises(ValueError, match="wrong_way_episodes must be 0 or more"):
        MainJobConfig(wrong_way_episodes=-1)
    with pytest.raises(ValueError, match="episode lengths must be positive"):
        CollectConfig(episodes=1, driver_paths=(tmp_path / "d.json",), tracks=("oval",), wrong_way_ticks=0)
