"""The EvaluationPool against real game server processes: the Executor contract, failures, discovery."""

from __future__ import annotations

import os
import random
import signal
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future, as_completed, wait
from typing import Any

import grpc
import numpy as np
import pytest

from game_server import servicer
from game_server.core import drivers
from game_server.core.pilot import drive_lap
from game_server.core.tracks import load_track
from game_server.game import GameConfig
from game_server.server import GameServerConfig, create_game_server
from plumbing.bootstrap import ServerConfig
from plumbing.procs import ServiceProcess, start_service
from rallyrobopilot.v1 import game_pb2, sim_pb2
from scheduler.executor import EvaluationPool, PoolConfig
from scheduler.tasks import EvaluationError, LapTask, RequestTask
from trainer.fitness import DriverLap

TRACK = "oval"


def free_address() -> str:
    """An address nothing listens on: connections to it are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def varied_programs(n: int, ticks: int, seed: int) -> list[bytes]:
    """Mutated pilot laps (they finish) and random drives (they hit walls and run all ticks)."""
    lap, _ = drive_lap(load_track(TRACK), max_ticks=ticks)
    base = np.frombuffer(lap.ljust(ticks, b"\x01"), dtype=np.uint8)
    rng = np.random.default_rng(seed)
    programs = []
    for i in range(n):
        if i % 2:
            masks = base.copy()
            flips = rng.random(ticks) < 0.05
            masks[flips] = rng.integers(0, 16, size=int(flips.sum()), dtype=np.uint8)
        else:
            masks = rng.choice(np.array([1, 1, 5, 9, 0], dtype=np.uint8), size=ticks)
        programs.append(masks.tobytes())
    return programs


def start_game_server(slots: int = 2) -> ServiceProcess:
    return start_service(["game-server", "--port", "0", "--evaluate-slots", str(slots), "--max-sessions", "2"])


@pytest.fixture(scope="module")
def servers() -> Iterator[list[ServiceProcess]]:
    procs = [start_game_server() for _ in range(2)]
    yield procs
    for p in procs:
        p.stop()


@pytest.fixture()
def victim() -> Iterator[ServiceProcess]:
    """A third server that a test may kill or stop."""
    proc = start_game_server()
    yield proc
    if proc.proc.poll() is None:
        os.kill(proc.pid, signal.SIGCONT)
    proc.kill()


@pytest.fixture()
def pool(servers: list[ServiceProcess]) -> Iterator[EvaluationPool]:
    with EvaluationPool(PoolConfig(servers=tuple(s.address for s in servers), health_interval_s=0.2)) as p:
        p.wait_ready(len(servers))
        yield p


@pytest.fixture(scope="module")
def task() -> LapTask:
    return LapTask(TRACK, max_ticks=2000)


@pytest.fixture(scope="module")
def batch(task: LapTask) -> tuple[list[bytes], list[sim_pb2.LapResult]]:
    """60 programs of 2,000 ticks and their in-process results: what every disturbed run must give."""
    programs = varied_programs(60, 2000, seed=1)
    return programs, list(map(task, programs))


# -- the Executor contract -------------------------------------------------------------------------
def test_map_equals_builtin_map(pool: EvaluationPool, task: LapTask) -> None:
    programs = varied_programs(24, 800, seed=2)
    results = list(pool.map(task, programs))
    assert results == list(map(task, programs))
    assert {r.finished for r in results} == {True, False}  # the batch really is varied
    assert pool.status().done >= 24


def test_map_raises_each_error_when_its_item_is_reached(pool: EvaluationPool, task: LapTask) -> None:
    programs = [b"\x01" * 50, b"\x01\xff", b"\x01" * 60]
    results = pool.map(task, programs, timeout=30)
    assert next(results) == task(programs[0])
    with pytest.raises(EvaluationError) as info:
        next(results)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(EvaluationError) as local:  # the same error in process
        task(programs[1])
    assert local.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_bad_tasks_fail_alone(pool: EvaluationPool) -> None:
    good, bad_mask, bad_track = (
        LapTask(TRACK).request(b"\x01" * 100),
        LapTask(TRACK).request(b"\x01\xff\x01"),
        LapTask("no-such-track").request(b"\x01"),
    )
    futures = [pool.submit(RequestTask(), r) for r in (good, bad_mask, bad_track, good)]
    assert futures[0].result(30) == futures[3].result(30) == RequestTask()(good)
    codes = [f.exception(30).code for f in futures[1:3]]  # type: ignore[union-attr]
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND]


def test_wait_and_as_completed(pool: EvaluationPool, task: LapTask) -> None:
    programs = varied_programs(8, 500, seed=3)
    futures = {pool.submit(task, p): i for i, p in enumerate(programs)}
    done, _ = wait(futures, timeout=30, return_when=FIRST_COMPLETED)
    assert done
    seen = {futures[f]: f.result() for f in as_completed(futures, timeout=30)}
    assert [seen[i] for i in range(len(programs))] == list(map(task, programs))


def test_plain_callables_are_refused(pool: EvaluationPool) -> None:
    with pytest.raises(TypeError, match="RemoteTask"):
        pool.submit(lambda masks: masks, b"\x01")
    with pytest.raises(TypeError, match="RemoteTask"):
        pool.map(len, [])


def test_request_errors_go_to_the_future(pool: EvaluationPool) -> None:
    future = pool.submit(RequestTask(), "not a request")
    assert isinstance(future.exception(5), TypeError)


def test_cancel_and_shutdown_cancel_only_what_has_not_started(
    servers: list[ServiceProcess], task: LapTask, batch: tuple[list[bytes], list[sim_pb2.LapResult]]
) -> None:
    programs, expected = batch
    pool = EvaluationPool(PoolConfig(servers=tuple(s.address for s in servers), health_interval_s=0.2))
    pool.wait_ready(2)
    futures = [pool.submit(task, p) for p in programs]
    assert futures[-1].cancel() and futures[-1].cancelled()
    futures[0].result(30)
    pool.shutdown(wait=True, cancel_futures=True)
    assert all(f.done() for f in futures)
    cancelled = [i for i, f in enumerate(futures) if f.cancelled()]
    assert 0 < len(cancelled) < len(futures) - 1
    for i, f in enumerate(futures):
        if not f.cancelled():
            assert f.result() == expected[i]
        else:
            with pytest.raises(CancelledError):
                f.result()
    with pytest.raises(RuntimeError, match="shutdown"):
        pool.submit(task, programs[0])


def test_leaving_the_pool_on_an_error_cancels_what_has_not_started(
    servers: list[ServiceProcess], task: LapTask, batch: tuple[list[bytes], list[sim_pb2.LapResult]]
) -> None:
    """Ctrl-C in a `with` block stops the pool at once, not after every queued task has run."""
    programs, _ = batch
    futures: list[Future[sim_pb2.LapResult]] = []
    config = PoolConfig(servers=tuple(s.address for s in servers), health_interval_s=0.2)
    with pytest.raises(KeyboardInterrupt), EvaluationPool(config) as pool:
        pool.wait_ready(2)
        futures = [pool.submit(task, p) for p in programs * 4]
        raise KeyboardInterrupt
    assert all(f.done() for f in futures) and sum(f.cancelled() for f in futures) >= len(programs)


def test_submit_blocks_beyond_max_pending_and_map_times_out() -> None:
    task = LapTask(TRACK)
    pool = EvaluationPool(PoolConfig(servers=(free_address(),), max_pending=2, health_interval_s=0.2))
    with pytest.raises(TimeoutError):
        next(pool.map(task, [b"\x01"], timeout=0.3))  # no healthy server: nothing starts
    blocked_errors: list[BaseException] = []

    def third_submit() -> None:
        try:
            pool.submit(task, b"\x01")
        except RuntimeError as exc:
            blocked_errors.append(exc)

    pool.submit(task, b"\x01")
    pool.submit(task, b"\x01")  # the map's cancelled item makes room for this one
    blocker = threading.Thread(target=third_submit)
    blocker.start()
    blocker.join(0.5)
    assert blocker.is_alive()  # backpressure: the producer waits
    assert pool.status().pending == 2
    pool.shutdown(wait=True, cancel_futures=True)
    blocker.join(5)
    assert not blocker.is_alive() and len(blocked_errors) == 1


# -- failures --------------------------------------------------------------------------------------
def test_with_no_healthy_server_queued_work_fails_unavailable_then_the_pool_recovers(task: LapTask) -> None:
    address = free_address()
    config = PoolConfig(servers=(address,), health_interval_s=0.2, unavailable_timeout_s=1.0)
    with EvaluationPool(config) as pool:
        t0 = time.monotonic()
        futures = [pool.submit(task, b"\x01" * 50) for _ in range(3)]
        for future in futures:
            with pytest.raises(EvaluationError) as info:
                future.result(15)
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
            assert "no healthy game server" in info.value.details and address in info.value.details
        assert time.monotonic() - t0 >= 1.0
        assert pool.status().failed == 3 and pool.status().pending == 0
        server = start_service(["game-server", "--port", address.rsplit(":", 1)[1]])
        try:
            pool.wait_ready(1, timeout_s=30)
            assert pool.submit(task, b"\x01" * 50).result(30) == task(b"\x01" * 50)
        finally:
            server.stop()


def test_sigkill_of_a_server_mid_batch_costs_time_not_results(
    servers: list[ServiceProcess],
    victim: ServiceProcess,
    task: LapTask,
    batch: tuple[list[bytes], list[sim_pb2.LapResult]],
) -> None:
    programs, expected = batch
    addresses = (*(s.address for s in servers), victim.address)
    with EvaluationPool(PoolConfig(servers=addresses, health_interval_s=0.2)) as pool:
        pool.wait_ready(3)
        futures = [pool.submit(task, p) for p in programs]
        while sum(f.done() for f in futures) < 6:
            time.sleep(0.005)
        victim.kill()
        assert [f.result(60) for f in futures] == expected
        status = pool.status()
    assert status.retried >= 1 and status.failed == 0
    assert not {s.address: s for s in status.servers}[victim.address].healthy


def test_without_backups_a_stopped_server_hits_the_deadline_and_its_work_moves(
    servers: list[ServiceProcess],
    victim: ServiceProcess,
    task: LapTask,
    batch: tuple[list[bytes], list[sim_pb2.LapResult]],
) -> None:
    programs, expected = batch[0][:20], batch[1][:20]
    addresses = (*(s.address for s in servers), victim.address)
    config = PoolConfig(
        servers=addresses, evaluate_timeout_s=2.0, health_timeout_s=0.5, health_interval_s=0.2, backup_factor=0
    )
    with EvaluationPool(config) as pool:
        pool.wait_ready(3)
        os.kill(victim.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            assert list(pool.map(task, programs, timeout=60)) == expected
            assert time.monotonic() - t0 >= 1.5  # it did wait for the deadline
            status = pool.status()
        finally:
            os.kill(victim.pid, signal.SIGCONT)
    stopped = {s.address: s for s in status.servers}[victim.address]
    assert status.retried >= 1 and stopped.failed >= 1 and not stopped.healthy


def test_a_frozen_server_costs_a_backup_copy_not_its_deadline_and_rejoins(
    servers: list[ServiceProcess],
    victim: ServiceProcess,
    task: LapTask,
    batch: tuple[list[bytes], list[sim_pb2.LapResult]],
) -> None:
    """Issue 21: work held by a hung server is copied to an idle one once the queue is empty; the first answer
    wins, the hung call is cancelled and its server set aside until it answers health checks again."""
    programs, expected = batch
    addresses = (*(s.address for s in servers), victim.address)
    deadline_s = 120.0
    config = PoolConfig(servers=addresses, evaluate_timeout_s=deadline_s, health_interval_s=0.2)
    with EvaluationPool(config) as pool:
        pool.wait_ready(3)
        assert list(pool.map(task, programs[:12])) == expected[:12]  # recent calls: what a straggler is measured by
        os.kill(victim.pid, signal.SIGSTOP)  # the pool still counts it healthy: it gets its share of the map
        try:
            t0 = time.monotonic()
            assert list(pool.map(task, programs, timeout=deadline_s / 2)) == expected
            seconds = time.monotonic() - t0
            # The hung calls' copies answered; the calls themselves are cancelled, and their slots come back.
            deadline = time.monotonic() + 30
            while (frozen := {s.address: s for s in pool.status().servers}[victim.address]).in_flight:
                assert time.monotonic() < deadline, frozen
                time.sleep(0.01)
            status = pool.status()
        finally:
            os.kill(victim.pid, signal.SIGCONT)
        assert status.backups >= 1 and status.failed == 0
        assert frozen.failed >= 1 and not frozen.healthy, frozen
        assert seconds < deadline_s / 4, "the map waited for the hung calls' deadline"
        pool.wait_ready(3, timeout_s=30)  # it answers health checks again: back in the pool
        done_before = {s.address: s.done for s in pool.status().servers}[victim.address]
        assert list(pool.map(task, programs)) == expected
        assert {s.address: s.done for s in pool.status().servers}[victim.address] > done_before


# -- membership ------------------------------------------------------------------------------------
def test_discovery_follows_dns_changes(servers: list[ServiceProcess], task: LapTask) -> None:
    answers = [[servers[0].address]]

    def resolver(host: str, port: int) -> list[str]:
        assert (host, port) == ("game.rrp.svc", 7000)
        return answers[-1]

    config = PoolConfig(discover="game.rrp.svc:7000", discover_interval_s=0.1, health_interval_s=0.1)
    with EvaluationPool(config, resolver=resolver) as pool:
        pool.wait_ready(1)
        assert [s.address for s in pool.status().servers] == [servers[0].address]
        answers.append([servers[0].address, servers[1].address])
        pool.wait_ready(2, timeout_s=10)
        answers.append([servers[1].address])
        deadline = time.monotonic() + 10
        while [s.address for s in pool.status().servers] != [servers[1].address]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert pool.submit(task, b"\x01" * 10).result(30) == task(b"\x01" * 10)
        assert {s.address: s.done for s in pool.status().servers} == {servers[1].address: 1}


def test_discovery_resolves_localhost(servers: list[ServiceProcess], task: LapTask) -> None:
    port = servers[0].port
    with EvaluationPool(PoolConfig(discover=f"localhost:{port}", health_interval_s=0.2)) as pool:
        pool.wait_ready(1)
        addresses = {s.address: s.healthy for s in pool.status().servers}
        assert addresses[f"127.0.0.1:{port}"]  # ::1, if localhost has it, is not served: never healthy
        assert set(addresses) <= {f"127.0.0.1:{port}", f"[::1]:{port}"}
        assert list(pool.map(task, [b"\x05" * 40])) == [task(b"\x05" * 40)]


def test_pool_config_is_validated() -> None:
    with pytest.raises(ValueError):
        PoolConfig()
    with pytest.raises(ValueError):
        PoolConfig(servers=("a:1",), discover="b")
    with pytest.raises(ValueError):
        PoolConfig(servers=("a:1",), evaluate_timeout_s=0)
    with pytest.raises(ValueError):
        PoolConfig(servers=("a:1",), unavailable_timeout_s=-1)
    assert PoolConfig(servers=("a:1",), unavailable_timeout_s=0).unavailable_timeout_s is None  # 0: for ever


def test_evaluate_request_is_sent_unchanged(pool: EvaluationPool) -> None:
    gate = sim_pb2.Gate(a=sim_pb2.Vec2(x_m=0, y_m=-50), b=sim_pb2.Vec2(x_m=0, y_m=50))
    request = game_pb2.EvaluateRequest(
        track=TRACK, program=sim_pb2.ControlProgram(masks=b"\x01" * 300), finish_gate=gate, return_trajectory=True
    )
    response = pool.submit(RequestTask(), request).result(30)
    assert response == RequestTask()(request)
    assert len(response.trajectory.x_m) == response.result.ticks


def test_run_with_server_leases_calls_and_retries(game_server_processes: list[ServiceProcess]) -> None:
    addresses = tuple(p.address for p in game_server_processes)
    seen: list[str] = []

    class Flaky(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.UNAVAILABLE

        def details(self) -> str:
            return "server went away"

    def drive(address: str) -> str:
        seen.append(address)
        if len(seen) == 1:
            raise Flaky()
        return address

    def broken(address: str) -> str:
        raise ValueError("the caller's own bug")

    with EvaluationPool(PoolConfig(servers=addresses, health_interval_s=0.2)) as pool:
        pool.wait_ready(2)
        assert pool.run_with_server(drive).result(30) in addresses
        assert len(seen) == 2 and seen[0] != seen[1]  # retried on the other server
        with pytest.raises(ValueError, match="own bug"):
            pool.run_with_server(broken).result(30)
        status = pool.status()
        assert status.retried >= 1


def test_a_tracks_drivers_travel_to_a_server_as_one_population(monkeypatch: pytest.MonkeyPatch) -> None:
    """A generation sent track by track reaches the servers as one EvaluateBatch per track (not guided batches
    shrinking to a driver or two, which a server would run one car at a time), with the builtin map's results."""
    sizes: list[int] = []
    real = servicer.evaluate_batch

    def counted(tasks: Sequence[game_pb2.EvaluateRequest], *args: Any) -> game_pb2.EvaluateBatchResponse:
        sizes.append(len(tasks))
        return real(tasks, *args)

    monkeypatch.setattr(servicer, "evaluate_batch", counted)
    config = GameServerConfig(server=ServerConfig(port=0, service_name="game-server-test"), game=GameConfig())
    game_servers = [create_game_server(config) for _ in range(2)]
    try:
        rng = random.Random(5)
        genomes = [[rng.uniform(lo, hi) for _, lo, hi in drivers.PARAM_SPEC] for _ in range(40)]
        task = DriverLap(drivers.RAYS_V1, {"oval": 60, "kidney": 60})
        args = ([g for _ in range(2) for g in genomes], [t for t in ("oval", "kidney") for _ in genomes])
        with EvaluationPool(PoolConfig(servers=tuple(s.address for s in game_servers))) as pool:
            pool.wait_ready(2)
            assert list(pool.map(task, *args)) == list(map(task, *args))
    finally:
        for s in game_servers:
            s.stop(0.5)
    assert sizes == [40, 40]
