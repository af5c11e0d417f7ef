"""Faults while racing: a TorchServe worker killed, a model-server replica killed, the only one restarted.

Real TorchServe processes and real game servers; the faults are real signals. A race is one real-time lap,
the fault injected ~2 s in from a thread, stopped 2 s after the fault is over: how long a TorchServe takes to
come back depends on the machine's load, and the lap must outlast it. Missed and coasted ticks are counted from the
fault on (the autopilot's counters, sampled when it begins): a stall of the shared machine before it is not the
fault's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from prometheus_client import REGISTRY

from game_server.core.state import TICK_S
from plumbing.errors import DomainError
from plumbing.procs import ServiceProcess
from serving.archive import ArchiveConfig, build_archive
from serving.autopilot import AutopilotConfig, CarLap, run_autopilot
from serving.client import InferenceClient, ModelRef, TorchServeClient, read_token
from serving.codec import Decision
from serving.race import RaceModel
from serving.replicas import connect_replicas
from serving.torchserve import LocalTorchServe, TorchServeConfig

from .tiny_models import SMALL, train_tiny

NAME = "rrp-vision"
MODEL = ModelRef(NAME)
FAULT_AT_S = 2.0  # into the race (~tick 50)
RIDE_S = 2.0  # raced on after the fault is over
COUNTS = ("missed_ticks", "safe_ticks")  # the autopilot's counters a fault must not move
OUTAGE_TICKS = 15  # of the >= 25 ticks (1 s) with no answer, those after safe mode's entry (safe_after_ms)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model, packaged with batch 1 and one worker."""
    model_dir = train_tiny(tmp_path_factory.mktemp("model"), epochs=2)
    return build_archive(model_dir, "1", tmp_path_factory.mktemp("store"), ArchiveConfig(batch_size=1))


def _serve(archive: Path, config: TorchServeConfig | None = None) -> LocalTorchServe:
    """A started TorchServe with the model registered and answering (its first inference done)."""
    server = LocalTorchServe(config or TorchServeConfig()).start()
    try:
        server.register(archive)
        server.wait_model(NAME, "", SMALL.width, SMALL.height)
    except BaseException:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def _serving(archive: Path) -> Iterator[LocalTorchServe]:
    server = _serve(archive)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def workdir() -> Iterator[Path]:
    """A fixed working directory (short: the workers' Unix sockets live in it), so a restart finds its store."""
    path = Path(tempfile.mkdtemp(prefix="rrp-ts-"))
    yield path
    import shutil

    shutil.rmtree(path, ignore_errors=True)


class Recorded:
    """An InferenceClient that notes when each call ended and how, to tell what happened after a fault."""

    def __init__(self, inner: InferenceClient) -> None:
        self.inner, self.model, self.version = inner, inner.model, inner.version
        self.calls: list[tuple[float, str]] = []  # (monotonic time, "ok" or the error's code)

    def infer(self, frame: np.ndarray, speed_m_per_s: float, timeout_s: float) -> Decision:
        try:
            decision = self.inner.infer(frame, speed_m_per_s, timeout_s)
        except DomainError as exc:
            self.calls.append((time.monotonic(), exc.code))
            raise
        self.calls.append((time.monotonic(), "ok"))
        return decision

    def close(self) -> None:
        self.inner.close()

    def answered_after(self, t: float) -> int:
        return sum(1 for when, outcome in self.calls if when > t and outcome == "ok")


def _race(
    game: str, client: Recorded, fault: Callable[[], None], at_fault: dict[str, float] | None = None
) -> tuple[CarLap, float, list[BaseException]]:
    """A real-time lap with `fault` run FAULT_AT_S into it, stopped RIDE_S after `fault` returns; the lap, when the
    fault began, the fault's errors. The client's channel opens before the lap: its first call is not the one
    measured."""
    client.inner.infer(np.zeros((SMALL.height, SMALL.width, 3), np.uint8), 0.0, 10.0)
    laps, fault_at, errors = _race_cars(game, lambda: client, fault, cars=1, at_fault=at_fault)
    return laps[0], fault_at, errors


def _counts() -> dict[str, float]:
    """The autopilot's missed and coasted ticks so far (all laps of this process)."""
    return {m: _metric(f"rrp_autopilot_{m}_total", version="default") for m in COUNTS}


def _since(at_fault: dict[str, float]) -> dict[str, float]:
    """Missed and coasted ticks from the fault on. A stall of this shared machine before the fault is not the
    fault's, and the laps' own totals include it."""
    now = _counts()
    return {m: now[m] - at_fault[m] for m in COUNTS}


def _race_cars(
    game: str,
    connect: Callable[[], InferenceClient],
    fault: Callable[[], None],
    cars: int,
    race_model: Callable[[], RaceModel] | None = None,
    at_fault: dict[str, float] | None = None,
) -> tuple[list[CarLap], float, list[BaseException]]:
    """`cars` real-time laps with `fault` run FAULT_AT_S into them, stopped RIDE_S after `fault` returns;
    `at_fault`, when given, receives the missed and coasted ticks counted when the fault began."""
    # Ten ticks of fallback ahead: a TorchServe (re)starting takes both cores for a while, and the autopilot and
    # the game server must ride out their own stalls on this shared machine (the default 5 covers 200 ms).
    config = AutopilotConfig(
        track="oval", mode="realtime", max_ticks=1500, stuck_ticks=0, fallback_ticks=10, width=SMALL.width,
        height=SMALL.height, cars=cars,
    )  # fmt: skip
    started, stop = threading.Event(), threading.Event()
    fault_at: list[float] = []
    errors: list[BaseException] = []

    def inject() -> None:
        started.wait(30.0)
        time.sleep(FAULT_AT_S)
        fault_at.append(time.monotonic())
        if at_fault is not None:
            at_fault.update(_counts())
        try:
            fault()
        except BaseException as exc:
            errors.append(exc)
        time.sleep(RIDE_S)
        stop.set()

    injector = threading.Thread(target=inject, daemon=True)
    injector.start()

    def connect_started() -> InferenceClient:
        started.set()
        return connect()

    def race_started() -> RaceModel:
        assert race_model is not None
        started.set()
        return race_model()

    result = run_autopilot(
        config, (game,), connect_started, stop=stop, race_model=race_started if race_model is not None else None
    )
    injector.join(60.0)
    return result.laps, fault_at[0], errors


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _longest_run_of_zeros(keys: list[int]) -> int:
    best = run = 0
    for k in keys:
        run = run + 1 if k == 0 else 0
        best = max(best, run)
    return best


def _assert_safe_ticks_coasted(lap: CarLap) -> None:
    """Every safe tick coasted, and the outage (at least 1 s with nothing answering) in one run. A loaded machine
    may add a short safe-mode episode elsewhere, so the safe ticks need not all be in that one run."""
    assert lap.safe_ticks > 0 and lap.keys.count(0) >= lap.safe_ticks
    assert _longest_run_of_zeros(lap.keys) >= OUTAGE_TICKS, lap.keys


def workers_of(server: LocalTorchServe) -> list[Any]:
    """TorchServe's Python model workers (psutil processes)."""
    found = []
    for p in server.processes():
        with contextlib.suppress(psutil.Error):  # a killed worker stays a zombie until the JVM reaps it
            if "model_service_worker" in " ".join(p.cmdline()):
                found.append(p)
    return found


def _assert_safe_mode_logged(caplog: pytest.LogCaptureFixture) -> None:
    """Each entry into safe mode logged once, and its exit (a loaded machine may add a short one elsewhere)."""
    logged = [r.getMessage() for r in caplog.records]
    entries, exits = sum("safe mode, coasting" in m for m in logged), sum("safe mode left" in m for m in logged)
    assert entries == exits >= 1, logged


def _kill_group(server: LocalTorchServe) -> None:
    """SIGKILL to TorchServe's whole process group (launcher, JVM, workers): no goodbye to any client."""
    assert server.proc is not None
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(10)


@pytest.mark.slow
def test_a_killed_worker_is_ridden_through_on_the_fallback_and_answers_again(
    archive: Path, game_server_processes: list[ServiceProcess], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="serving")
    with _serving(archive) as server:
        assert server.keys is not None
        workers = workers_of(server)
        assert len(workers) == 1
        client = Recorded(TorchServeClient(server.inference_address, MODEL, server.keys.inference))

        def kill_worker() -> None:
            """Kills the worker, and returns once a new one has answered."""
            workers[0].kill()
            deadline = time.monotonic() + 60.0
            while not [p for p in workers_of(server) if p.pid != workers[0].pid]:
                assert time.monotonic() < deadline, "TorchServe started no new worker"
                time.sleep(0.05)
            spawned = time.monotonic()
            while not client.answered_after(spawned):
                assert time.monotonic() < deadline, "the new worker never answered"
                time.sleep(0.05)

        before = {m: _metric(f"rrp_autopilot_{m}_total", version="default") for m in ("fallbacks", "safe_ticks")}
        at_kill: dict[str, float] = {}
        lap, killed_at, errors = _race(game_server_processes[0].address, client, kill_worker, at_kill)
        assert not errors
        restarted = workers_of(server)
        assert restarted and restarted[0].pid != workers[0].pid  # TorchServe started a new worker
    # The car drove every tick on commands of its own until stopped, the outage on the fallback.
    assert lap.stop_reason == "stopped" and lap.ticks >= (FAULT_AT_S + RIDE_S) / TICK_S
    assert _since(at_kill)["missed_ticks"] == 0, lap.summary()
    assert lap.fallbacks > 0 and lap.safe_ticks > 0  # the restarted worker answered nothing for seconds
    _assert_safe_ticks_coasted(lap)  # the unanswered ticks coasted
    assert _metric("rrp_autopilot_fallbacks_total", version="default") - before["fallbacks"] == lap.fallbacks
    assert _metric("rrp_autopilot_safe_ticks_total", version="default") - before["safe_ticks"] == lap.safe_ticks
    assert client.answered_after(killed_at + 1.0) > 20  # the new worker answers, for the RIDE_S after
    _assert_safe_mode_logged(caplog)


@pytest.mark.slow
def test_a_killed_worker_under_four_raced_cars_costs_no_tick(
    archive: Path, game_server_processes: list[ServiceProcess]
) -> None:
    from serving.batching import RacePool

    with _serving(archive) as server:
        assert server.keys is not None
        key, address = server.keys.inference, server.inference_address
        worker = workers_of(server)[0]
        batcher = RacePool(lambda: TorchServeClient(address, MODEL, key))
        answered: list[float] = []

        def kill_worker() -> None:
            """Kills the worker, and returns once a batch has been answered by a new one."""
            worker.kill()
            sent = len(batcher.sizes)
            deadline = time.monotonic() + 60.0
            while not [p for p in workers_of(server) if p.pid != worker.pid] or len(batcher.sizes) < sent + 25:
                assert time.monotonic() < deadline, "no new worker answered"
                time.sleep(0.05)
            answered.append(time.monotonic())

        at_kill: dict[str, float] = {}
        try:
            laps, _, errors = _race_cars(
                game_server_processes[0].address, lambda: pytest.fail("a race asks its pool"), kill_worker, cars=4,
                race_model=lambda: batcher, at_fault=at_kill,
            )  # fmt: skip
        finally:
            batcher.close()
    assert not errors and answered, errors
    assert len(laps) == 4 and all(lap.stop_reason == "stopped" for lap in laps)
    assert _since(at_kill)["missed_ticks"] == 0, [lap.summary() for lap in laps]
    assert max(batcher.sizes) == 4  # the race's frames went in one request a tick


@pytest.mark.slow
def test_the_replica_in_use_killed_fails_over_within_a_tick(
    archive: Path, game_server_processes: list[ServiceProcess], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="serving")
    with _serving(archive) as first, _serving(archive) as second:
        keys = {s.inference_address: s.key_file for s in (first, second)}
        a, b = first.inference_address, second.inference_address
        client = Recorded(connect_replicas("torchserve", (a, b), MODEL, lambda address: read_token(keys[address])))
        before = _metric("rrp_autopilot_failovers_total", from_server=a, to_server=b)
        at_kill: dict[str, float] = {}
        lap, killed_at, errors = _race(game_server_processes[0].address, client, lambda: _kill_group(first), at_kill)
        assert not errors
    # From the kill on, no tick went without its command and none coasted: the fail-over cost the car nothing.
    assert lap.stop_reason == "stopped"
    assert _since(at_kill) == {"missed_ticks": 0.0, "safe_ticks": 0.0}, lap.summary()
    # Every call that found the first replica dead was answered by the second in the same tick: no UNAVAILABLE
    # reached the autopilot. Before that, the call in flight while the kernel tears the JVM down just goes
    # unanswered (late, not failed): a tick or two on a quiet machine, longer under load.
    after = [outcome for when, outcome in client.calls if when > killed_at]
    assert "UNAVAILABLE" not in after and "ok" in after, after[:10]
    assert _metric("rrp_autopilot_failovers_total", from_server=a, to_server=b) - before == 1
    assert _metric("rrp_autopilot_model_server_up", server=a) == 0.0
    assert _metric("rrp_autopilot_model_server_up", server=b) == 1.0
    assert client.answered_after(killed_at) > 25  # the rest of the lap, from the second replica
    assert sum(f"{a} unavailable: failed over to {b}" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.slow
def test_the_only_model_server_restarted_slows_the_car_safely_and_it_resumes(
    archive: Path, game_server_processes: list[ServiceProcess], workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="serving")
    server = _serve(archive, TorchServeConfig(workdir=workdir))
    fixed = TorchServeConfig(
        workdir=workdir,
        grpc_port=server.ports["grpc"],
        grpc_management_port=server.ports["grpc_management"],
        metrics_port=server.ports["metrics"],
    )
    address = server.inference_address
    back: list[float] = []

    def restart() -> None:
        nonlocal server
        _kill_group(server)
        time.sleep(1.0)  # an outage with the port closed
        # TorchServe generates new keys on every start, and without config snapshots registers nothing.
        server = _serve(server.model_store / archive.name, fixed)
        back.append(time.monotonic())

    key_file = workdir / "key_file.json"
    client = Recorded(connect_replicas("torchserve", (address,), MODEL, lambda _: read_token(key_file)))
    before = _metric("rrp_autopilot_safe_ticks_total", version="default")
    at_kill: dict[str, float] = {}
    try:
        lap, killed_at, errors = _race(game_server_processes[0].address, client, restart, at_kill)
    finally:
        server.stop()
    assert not errors and back, errors
    assert lap.stop_reason == "stopped" and _since(at_kill)["missed_ticks"] == 0, lap.summary()
    _assert_safe_ticks_coasted(lap)
    assert _metric("rrp_autopilot_safe_ticks_total", version="default") - before == lap.safe_ticks
    outage = [outcome for when, outcome in client.calls if killed_at < when < back[0]]
    assert "UNAVAILABLE" in outage
    resumed = [when for when, outcome in client.calls if when > back[0] and outcome == "ok"]
    assert resumed and resumed[0] - back[0] < 2.0  # the old channel reconnects, the new key is read
    assert _metric("rrp_autopilot_model_server_up", server=address) == 1.0
    _assert_safe_mode_logged(caplog)


@pytest.mark.slow
def test_a_model_server_restarted_on_its_ports_is_reached_again_within_a_second(archive: Path, workdir: Path) -> None:
    # grpc's default back-off would wait ~10 s more after an outage this long; the client's waits at most 1 s.
    server = LocalTorchServe(TorchServeConfig(workdir=workdir)).start()
    assert server.keys is not None
    client = TorchServeClient(server.inference_address, MODEL, server.keys.inference)
    frame = np.zeros((SMALL.height, SMALL.width, 3), np.uint8)
    fixed = TorchServeConfig(
        workdir=workdir,
        grpc_port=server.ports["grpc"],
        grpc_management_port=server.ports["grpc_management"],
        metrics_port=server.ports["metrics"],
    )

    def outcome() -> str:
        try:
            client.infer(frame, 1.0, 1.0)
        except DomainError as exc:
            return exc.code
        return "ok"

    assert outcome() == "NOT_FOUND"  # reached: no model registered
    _kill_group(server)
    down_until = time.monotonic() + 10.0
    while time.monotonic() < down_until:  # the channel keeps trying, its back-off growing
        assert outcome() == "UNAVAILABLE"
        time.sleep(0.1)
    server = LocalTorchServe(fixed).start()
    try:
        up = time.monotonic()
        while (seen := outcome()) == "UNAVAILABLE" and time.monotonic() - up < 10.0:
            time.sleep(0.02)
        reached_s = time.monotonic() - up
    finally:
        client.close()
        server.stop()
    assert seen == "PERMISSION_DENIED"  # the restarted server's new keys: reached with the old one
    assert reached_s < 1.5, reached_s


class Replica:
    """A stand-in replica for the routing rules alone: answers, or raises the error it is given."""

    def __init__(self, address: str, error: DomainError | None = None) -> None:
        self.address, self.error, self.model, self.version, self.calls = address, error, NAME, "", 0

    def infer(self, frame: np.ndarray, speed_m_per_s: float, timeout_s: float) -> Decision:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return Decision((0.0,) * 6, 1)

    def close(self) -> None:
        pass


def test_only_an_unavailable_replica_is_failed_over_from_and_a_refused_token_is_read_again() -> None:
    from plumbing.errors import NotFound, Unavailable
    from serving.client import PermissionDenied
    from serving.replicas import FailoverClient

    frame = np.zeros((SMALL.height, SMALL.width, 3), np.uint8)
    made: list[str] = []
    replicas: dict[str, Replica] = {}

    def connect_one(address: str) -> InferenceClient:
        made.append(address)
        return replicas[address]

    replicas = {"10.0.0.1:1": Replica("10.0.0.1:1", NotFound("no model")), "10.0.0.2:2": Replica("10.0.0.2:2")}
    a, b = replicas
    client = FailoverClient((a, b), MODEL, connect_one)
    with pytest.raises(NotFound):  # every replica would say so: not a reason to move
        client.infer(frame, 1.0, 1.0)
    assert client.infer(frame, 1.0, 1.0).keys == 1  # round robin: the next call goes to b
    assert replicas[a].calls == 1 and replicas[b].calls == 1

    replicas[a].error = Unavailable("down")
    before = _metric("rrp_autopilot_failovers_total", from_server=a, to_server=b)
    for _ in range(4):  # the same call goes to the other replica; then a is left out of the rotation
        assert client.infer(frame, 1.0, 1.0).keys == 1
    assert replicas[a].calls == 2 and replicas[b].calls == 5
    assert _metric("rrp_autopilot_failovers_total", from_server=a, to_server=b) - before == 1
    assert _metric("rrp_autopilot_model_server_up", server=a) == 0.0

    replicas[b].error = Unavailable("down too")
    with pytest.raises(Unavailable):
        client.infer(frame, 1.0, 1.0)

    replicas[b].error = PermissionDenied("refused")  # a restarted TorchServe's new keys
    made.clear()
    for _ in range(3):  # a, down a moment ago, is left out; b answers, if with a refusal
        with pytest.raises(PermissionDenied):
            client.infer(frame, 1.0, 1.0)
    assert made == [b]  # connected again, its token re-read, once within the second


class Outage:
    """A model that drives forward, and fails with UNAVAILABLE for calls `start` to `end` (exclusive)."""

    def __init__(self, start: int, end: int) -> None:
        self.start, self.end, self.calls, self.model, self.version = start, end, 0, NAME, "outage"

    def infer(self, frame: np.ndarray, speed_m_per_s: float, timeout_s: float) -> Decision:
        self.calls += 1
        if self.start <= self.calls - 1 < self.end:
            from plumbing.errors import Unavailable

            raise Unavailable("the model server is down")
        return Decision((0.0,) * 6, 1)

    def close(self) -> None:
        pass


def test_safe_mode_coasts_from_the_third_failure_to_the_next_answer(
    game_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="serving")
    config = AutopilotConfig(track="oval", mode="realtime", max_ticks=100, stuck_ticks=0, width=64, height=48)
    model = Outage(20, 45)
    before = _metric("rrp_autopilot_safe_ticks_total", version="outage")
    lap = run_autopilot(config, (game_server.address,), lambda: model).laps[0]
    assert lap.ticks == 100 and lap.missed_ticks == 0 and lap.inference_errors == 25
    # Failures 1 and 2 hold the keys; from the third to the next answer the car coasts (keys 0), commands flowing.
    # (23 calls from the third failure to the answer; a tick a stall left no time to ask for coasts too.)
    assert lap.safe_ticks == lap.keys.count(0) == _longest_run_of_zeros(lap.keys) >= 23
    assert _metric("rrp_autopilot_safe_ticks_total", version="outage") - before == lap.safe_ticks
    logged = [r.getMessage() for r in caplog.records]
    assert sum("safe mode, coasting" in m for m in logged) == 1 and sum("safe mode left" in m for m in logged) == 1
    assert sum("inference failed" in m for m in logged) == 3  # while coasting, failures are not logged one by one


def test_the_autopilot_command_takes_replicas_and_a_token_file_each_or_one_for_all(tmp_path: Path) -> None:
    from pipeline.serve import AutopilotCommandConfig, run_autopilot_command
    from plumbing.errors import InvalidArgument
    from rrp.cli import build_parser

    argv = ["autopilot", "--game", "g:1", "--model-server", "m:1,m:2", "--token-file", "k1,k2"]
    args = build_parser(argv).parse_args(argv)
    assert args.model_server == ("m:1", "m:2") and args.token_file == (Path("k1"), Path("k2"))
    three = tuple(tmp_path / f"k{i}" for i in range(3))
    config = AutopilotCommandConfig(game=("g:1",), model_server=("m:1", "m:2"), token_file=three)
    with pytest.raises(InvalidArgument, match="3 token files for 2 model servers"):
        run_autopilot_command(config)
    from pipeline.serve import token_files

    servers = ("m:1", "m:2")
    assert token_files(servers, ()) == {}  # token auth off (a cluster behind a NetworkPolicy)
    assert token_files(servers, (Path("k"),)) == {"m:1": Path("k"), "m:2": Path("k")}
    assert token_files(servers, (Path("a"), Path("b"))) == {"m:1": Path("a"), "m:2": Path("b")}
