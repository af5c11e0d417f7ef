"""EvaluationPool: a concurrent.futures.Executor that runs evaluation tasks on a pool of game servers."""

from __future__ import annotations

import functools
import logging
import math
import socket
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import context as otel_context

from plumbing import telemetry
from plumbing.channels import ClientTLS, channel_credentials, open_channel
from plumbing.settings import nested, setting
from rallyrobopilot.v1 import game_pb2, game_pb2_grpc
from scheduler.core import Ledger, PoolStatus, RetryPolicy, join_host_port, parse_target, population_share
from scheduler.tasks import EvaluationError, RemoteTask

log = logging.getLogger(__name__)

T = TypeVar("T")

GAME_SERVICE = game_pb2.DESCRIPTOR.services_by_name["GameService"].full_name
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
DEFAULT_GAME_PORT = 50051
# Worker threads are cheap while they wait, but a huge discovered pool should not spawn thousands.
MAX_WORKERS = 256

Resolver = Callable[[str, int], list[str]]


@dataclass(frozen=True)
class PoolConfig:
    """Where the game servers are and how patiently to use them."""

    # Exactly one of `servers` and `discover` is given.
    servers: tuple[str, ...] = setting((), "game servers, host:port,host:port")
    discover: str | None = setting(None, "DNS name[:port] resolving to the game servers (a headless Service)")
    discover_interval_s: float = setting(5.0, "seconds between DNS resolutions")
    evaluate_timeout_s: float = setting(
        60.0, "deadline of one Evaluate call, seconds, before the allowance for the ticks it carries"
    )
    health_timeout_s: float = setting(2.0, "deadline of one health check, seconds")
    health_interval_s: float = setting(1.0, "seconds between health checks of every server")
    health_slow_limit: int = setting(
        3, "health checks in a row that may time out before a server is set aside (one refused: at once)"
    )
    max_attempts: int = setting(4, "attempts per evaluation when servers fail")
    # A call's deadline: evaluate_timeout_s plus this allowance per tick of the work it carries (a
    # closed-loop driver takes ~0.13 ms a tick on one core; the allowance leaves room for a loaded machine).
    tick_timeout_s: float = setting(0.002, "deadline allowance per simulated tick, on top of evaluate_timeout_s")
    # Ticks of work one EvaluateBatch may carry, so that heavy tasks travel alone and a batch's deadline
    # stays short; the first task of a batch is always taken, however heavy. Room for a population of 96
    # drivers on a long track (alpine: 1,287 ticks each).
    max_batch_ticks: int = setting(200_000, "simulated ticks one EvaluateBatch call may carry")
    # A busy server (its slots taken by abandoned or foreign work) is retried after a back-off, without
    # using up an attempt, until the task has waited this long for a slot.
    busy_timeout_s: float = setting(300.0, "seconds a task may be refused by busy servers before it fails")
    # Short laps sent together pay one round trip per batch; batches shrink as the queue drains.
    max_batch: int = setting(128, "evaluations sent together in one EvaluateBatch call when many wait")
    # Sensor drivers on one track run as one population on the server, where a tick of the population costs
    # ~0.4 ms however few cars it holds: a population of 12 runs at ~2x one car at a time, one of 96 at ~10x.
    # So a track's drivers travel together, split only to keep every server busy, and never below this.
    min_population: int = setting(
        32, "sensor-driver evaluations on one track sent together at least, when that many wait"
    )
    # submit() blocks beyond this, so a producer cannot outrun the pool.
    max_pending: int = setting(4096, "evaluations queued before submitters wait")
    # Backup tasks, as MapReduce's: once nothing waits in the queue, a call running far longer than its peers
    # (or on a server that stopped answering health checks) is copied to an idle slot on another server. Any
    # copy's answer is the same (the simulation is deterministic): the first wins and the other is cancelled.
    backup_factor: float = setting(
        2.0,
        "a call running this many times longer than recent calls' time per tick gets a backup copy on another"
        " server once the queue is empty; 0: no backups",
    )
    backup_min_s: float = setting(0.5, "seconds a call runs before it may get a backup copy")
    # A pool whose servers are all gone should say so, not hang.
    unavailable_timeout_s: float | None = setting(
        120.0,
        "seconds queued evaluations wait while no game server is healthy, then fail UNAVAILABLE; 0: for ever",
    )
    # With a CA, every game server is called over TLS. Discovered servers are dialled by IP, so their
    # certificates must carry the discovered name (or --tls-server-name).
    tls: ClientTLS = nested(ClientTLS)

    def __post_init__(self) -> None:
        if bool(self.servers) == bool(self.discover):
            raise ValueError("give either servers or a DNS name to discover them")
        if min(self.evaluate_timeout_s, self.health_timeout_s, self.health_interval_s) <= 0:
            raise ValueError("timeouts and intervals must be positive")
        if (
            self.discover_interval_s <= 0
            or self.max_pending < 1
            or self.max_attempts < 1
            or self.max_batch < 1
            or self.min_population < 1
        ):
            raise ValueError(
                "discover_interval_s, max_pending, max_attempts, max_batch and min_population must be positive"
            )
        if self.backup_factor < 0 or self.backup_min_s < 0:
            raise ValueError("backup_factor and backup_min_s must not be negative")
        if self.health_slow_limit < 1:
            raise ValueError("health_slow_limit must be at least 1")
        if self.unavailable_timeout_s == 0:
            object.__setattr__(self, "unavailable_timeout_s", None)
        if self.unavailable_timeout_s is not None and self.unavailable_timeout_s < 0:
            raise ValueError("unavailable_timeout_s must be positive, or None to wait for ever")


def resolve_dns(host: str, port: int) -> list[str]:
    """Every address the name resolves to, as gRPC targets; a headless Service lists one per pod."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({join_host_port(str(info[4][0]), int(info[4][1])) for info in infos})


@dataclass(eq=False, slots=True)
class _Job:
    future: Future[Any]
    task: Any  # a RemoteTask, or the _ServerCall of run_with_server
    request: Any  # the request message of the task's RPC
    method: str = "Evaluate"
    timeout_s: float | None = None
    attempts: int = 0
    last_server: str | None = None
    started: bool = False  # its future runs: it can no longer be cancelled
    busy: int = 0  # refusals by busy servers so far
    busy_since: float | None = None
    alone: bool = False  # its response did not fit in a batch's reply: it travels alone
    ticks: int = 0  # the simulated ticks it asks for, which size its deadline
    # Jobs with the same population (sensor drivers on one track and finish gate) run as one on the server.
    population: bytes | None = None
    reply_bytes: int = 0  # a guess at its response's size (trajectories are ~40 bytes a tick)
    copies: int = 0  # calls carrying it now: two while a backup copy races the straggling original
    queued_copy: bool = False  # a backup copy of it waits in the queue
    exclude: str | None = None  # the server its straggling original runs on: its copy goes elsewhere
    resolved: bool = False  # its future has its outcome: a copy still out lost the race and is ignored
    # The submitter's trace context: the call made on a pool thread joins the submitter's trace.
    trace_context: Any = field(default_factory=otel_context.get_current)


@dataclass(eq=False)
class _Call:
    """One call out on a server, carrying one job or a batch; what backup tasks watch and cancel."""

    jobs: list[_Job]
    address: str
    started: float
    ticks: int
    backupable: bool  # only Evaluate calls: pure, deterministic, so that any copy's answer is the same
    rpc: Any = None  # its grpc future once sent, to cancel it
    cancelled: bool = False
    backed_up: bool = False  # a copy of its jobs was sent elsewhere


# One call's outcome for one job: (response, None, "") or (None, code, details).
_Outcome = tuple[Any, grpc.StatusCode | None, str]
_CODES = {code.value[0]: code for code in grpc.StatusCode}
_TRAJECTORY_BYTES_PER_TICK = 48
_BUSY_CODES = (grpc.StatusCode.RESOURCE_EXHAUSTED,)
_BUSY_BACKOFF_S = (0.05, 1.0)  # first and longest wait before a busy server is asked again
_SHARES_PER_SLOT = 2  # calls per slot a map is cut into at first (fewer as its queue drains)


def _work_of(method: str, request: Any) -> tuple[int, int, bytes | None]:
    """The ticks an evaluation asks for, a guess at its reply's size, and the population it may join on the
    server (drivers the server batches: on sensors alone, without a trajectory), from its request alone."""
    if method != "Evaluate" or not isinstance(request, game_pb2.EvaluateRequest):
        return 0, 0, None
    ticks = request.max_ticks or len(request.program.masks)
    reply = (ticks * _TRAJECTORY_BYTES_PER_TICK if request.return_trajectory else 0) + 1024
    population = None
    if request.WhichOneof("policy") == "driver" and not request.driver.recovering and not request.return_trajectory:
        gate = request.finish_gate.SerializeToString() if request.HasField("finish_gate") else b""
        population = b"%d:%s:%s" % (len(request.track), request.track.encode(), gate)
    return ticks, reply, population


@dataclass
class _Connection:
    """One channel per server, shared by its evaluation slots and its health checks."""

    channel: grpc.Channel
    game: Any = field(init=False)
    server_info: Any = field(init=False)
    health: Any = field(init=False)

    def __post_init__(self) -> None:
        self.game = game_pb2_grpc.GameServiceStub(self.channel)
        self.server_info = self.game.GetServerInfo
        self.health = health_pb2_grpc.HealthStub(self.channel).Check


def _connect(address: str, tls: ClientTLS) -> _Connection:
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    # One channel is one server of the ledger: never spread over the addresses a given name may have.
    channel = open_channel(address, tls, options, spread=False)
    return _Connection(telemetry.instrument_channel(channel, "scheduler"))


SERVER_CALL = "__server_call__"


@dataclass(frozen=True)
class _Raised:
    exc: Exception


class _ServerCall:
    """The task of run_with_server: its callable's return value is the result (or its exception)."""

    def result(self, response: Any) -> Any:
        if isinstance(response, _Raised):
            raise response.exc
        return response


def _unwrap(fn: object, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """Sees through functools.partial, as DEAP's `toolbox.register` wraps every function in one."""
    while isinstance(fn, functools.partial):
        args = (*fn.args, *args)
        kwargs = {**fn.keywords, **kwargs}
        fn = fn.func
    return fn, args, kwargs


def _require_task(fn: object) -> None:
    fn, _, _ = _unwrap(fn, (), {})
    if not isinstance(fn, RemoteTask):
        raise TypeError(
            f"EvaluationPool runs RemoteTask objects (request/result/__call__), not {type(fn).__name__}: "
            "code is never shipped to game servers; subclass scheduler.EvaluationTask"
        )


class EvaluationPool(Executor):
    """Runs RemoteTask evaluations on leased game-server slots, with deadlines and retries.

    One worker thread per leasable slot takes the next queued task, leases a slot for it and makes a
    blocking Evaluate call; when the call returns, the same thread takes the next task. A blocking call
    costs less than half of grpc's future API (no hand-off to a callback thread), which matters when an
    evaluation takes only a few milliseconds.
    """

    def __init__(self, config: PoolConfig, *, resolver: Resolver = resolve_dns) -> None:
        self.config = config
        self._resolver = resolver
        self._tls = config.tls
        if config.tls.enabled:
            channel_credentials(config.tls)  # a missing or bad file fails here, not on the first server
            if config.discover:
                self._tls = config.tls.for_name(parse_target(config.discover, DEFAULT_GAME_PORT)[0])
        self._retry = RetryPolicy(config.max_attempts)
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # workers: a task and a free slot may be there
        self._space = threading.Condition(self._lock)  # submitters and waiters: a task left the queue
        self._ledger = Ledger()
        self._queue: deque[_Job] = deque()
        self._calls: set[_Call] = set()  # out on servers now
        self._probing: dict[str, float] = {}  # servers with a health check out, and since when
        # Seconds per simulated tick of recent calls: what a straggler is measured against.
        self._tick_seconds: deque[float] = deque(maxlen=64)
        self._connections: dict[str, _Connection] = {}
        self._workers: list[threading.Thread] = []
        # Jobs accepted whose future is not resolved yet: shutdown(wait=True) waits for zero.
        self._unresolved = 0
        self._shutdown = False
        self._stopped = threading.Event()
        self._no_server_since: float | None = time.monotonic()  # None while a server is healthy
        self._refresh_members()
        self._maintainer = threading.Thread(target=self._maintain, daemon=True, name="scheduler-maintainer")
        self._maintainer.start()

    # -- Executor -------------------------------------------------------------------------------
    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Queues `fn.request(*args, **kwargs)`; blocks while `max_pending` tasks already wait."""
        _require_task(fn)
        (future,) = self._submit_all(fn, [(args, kwargs)])
        return future

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[T]:
        """Like the builtin map, in order; refuses a plain callable even when the iterables are empty.

        Every task is queued before any is sent (up to `max_pending` at a time), so that the first calls find
        the whole map to batch, not the few tasks submitted before a worker woke up."""
        _require_task(fn)
        deadline = None if timeout is None else time.monotonic() + timeout
        futures = self._submit_all(fn, [(args, {}) for args in zip(*iterables, strict=False)])

        def results() -> Iterator[T]:
            try:
                futures.reverse()
                while futures:
                    future = futures.pop()
                    try:
                        yield future.result(None if deadline is None else deadline - time.monotonic())
                    finally:
                        future.cancel()
            finally:
                for future in futures:
                    future.cancel()

        return results()

    def _submit_all(self, fn: Callable[..., T], calls: list[tuple[tuple[Any, ...], dict[str, Any]]]) -> list[Future[T]]:
        """Builds each call's request, then queues them in order, as many at once as `max_pending` allows."""
        jobs: list[_Job] = []
        futures: list[Future[T]] = []
        for args, kwargs in calls:
            unwrapped, args, kwargs = _unwrap(fn, args, kwargs)
            task: RemoteTask[T] = unwrapped
            future: Future[T] = Future()
            futures.append(future)
            try:
                request = task.request(*args, **kwargs)
            except Exception as exc:
                future.set_running_or_notify_cancel()
                future.set_exception(exc)
                continue
            method = str(getattr(task, "method", "Evaluate"))
            job = _Job(future, task, request, method, getattr(task, "timeout_s", None))
            job.ticks, job.reply_bytes, job.population = _work_of(method, request)
            jobs.append(job)
        while jobs:
            with self._lock:
                while len(self._queue) >= self.config.max_pending and not self._shutdown:
                    if not self._purge_cancelled_locked():
                        self._space.wait()
                if self._shutdown:
                    raise RuntimeError("cannot schedule new evaluations after shutdown")
                room = self.config.max_pending - len(self._queue)
                self._queue.extend(jobs[:room])
                self._unresolved += len(jobs[:room])
                self._work.notify_all()
                jobs = jobs[room:]
        return futures

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Refuses new tasks; cancels queued ones that have not started if asked; closes the channels."""
        cancelled: list[_Job] = []
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                # Retries have started (their futures run): they go on.
                cancelled = [job for job in self._queue if not job.started]
                self._queue = deque(job for job in self._queue if job.started)
            self._space.notify_all()
        for job in cancelled:
            job.future.cancel()
        self._resolved(len(cancelled))
        if wait:
            with self._lock:
                self._space.wait_for(lambda: self._unresolved == 0)
            self._maintainer.join()
            for worker in self._workers:
                worker.join()

    # -- pool -----------------------------------------------------------------------------------
    def status(self) -> PoolStatus:
        with self._lock:
            return self._ledger.status(pending=len(self._queue))

    @property
    def client_tls(self) -> ClientTLS | None:
        """How a client of `run_with_server` reaches the address it is given: TLS settings, or None (plaintext)."""
        return self._tls if self._tls.enabled else None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        """Leaving on an error or Ctrl-C cancels the queued tasks (the running ones end first): a stopped job
        must not first evaluate all it had queued, minutes of work nobody will read."""
        self.shutdown(wait=True, cancel_futures=exc_type is not None)

    def run_with_server(self, fn: Callable[[str], T], *, timeout_s: float | None = None) -> Future[T]:
        """Leases a slot on a healthy game server and calls `fn(address)` on a pool thread.

        For clients that hold a session themselves (a vision model driving over the Drive stream): the
        pool chooses the server, never oversubscribes it, and when `fn` raises a retryable
        grpc.RpcError (UNAVAILABLE, DEADLINE_EXCEEDED, ...) calls it again on another server. `fn` runs
        in this process; nothing is shipped to the server but its own RPCs.
        """
        future: Future[T] = Future()
        with self._lock:
            while len(self._queue) >= self.config.max_pending and not self._shutdown:
                self._space.wait()
            if self._shutdown:
                raise RuntimeError("cannot schedule new work after shutdown")
            self._queue.append(_Job(future, _ServerCall(), fn, SERVER_CALL, timeout_s))
            self._unresolved += 1
            self._work.notify()
        return future

    def wait_ready(self, servers: int = 1, timeout_s: float = 30.0) -> None:
        """Blocks until `servers` servers passed a health check; for callers that time their batches."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while sum(1 for r in self._ledger.servers.values() if r.healthy) < servers:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"fewer than {servers} healthy game servers after {timeout_s}s")
                self._space.wait(left)

    # -- dispatch -------------------------------------------------------------------------------
    def _work_loop(self) -> None:
        while (call := self._next_call()) is not None:
            jobs, address = call.jobs, call.address
            # The lease keeps the server's record, and so its connection, until the call returns.
            with self._lock:
                connection = self._connections[address]
            first = jobs[0]
            token = otel_context.attach(first.trace_context)
            # Sized by the work it carries, so that a heavy batch is not cut off (and then computed twice).
            timeout = (first.timeout_s or self.config.evaluate_timeout_s) + self.config.tick_timeout_s * call.ticks
            outcomes: list[_Outcome]
            call_code: grpc.StatusCode | None = None
            try:
                if first.method == SERVER_CALL:
                    try:
                        outcomes = [(first.request(address), None, "")]
                    except grpc.RpcError:
                        raise
                    except Exception as exc:  # the caller's own failure: its future gets it, not a retry
                        outcomes = [(_Raised(exc), None, "")]
                elif len(jobs) == 1:
                    response = self._send(call, getattr(connection.game, first.method), first.request, timeout)
                    outcomes = [(response, None, "")]
                else:
                    batch = game_pb2.EvaluateBatchRequest(tasks=[job.request for job in jobs])
                    items = self._send(call, connection.game.EvaluateBatch, batch, timeout).items
                    outcomes = [
                        (item.response, None, "")
                        if item.WhichOneof("outcome") == "response"
                        else (None, _CODES.get(item.error.code, grpc.StatusCode.UNKNOWN), item.error.message)
                        for item in items
                    ]
                    if len(outcomes) != len(jobs):
                        raise RuntimeError(f"{address} answered {len(outcomes)} items for {len(jobs)} tasks")
            except grpc.RpcError as exc:
                call_code = exc.code()
                outcomes = [(None, call_code, exc.details() or "")] * len(jobs)
            except grpc.FutureCancelledError:  # its backup copy answered first
                call_code = grpc.StatusCode.CANCELLED
                outcomes = [(None, call_code, "cancelled: a backup copy answered first")] * len(jobs)
            finally:
                otel_context.detach(token)
            busy = [job for job, outcome in zip(jobs, outcomes, strict=False) if outcome[1] in _BUSY_CODES]
            if busy:
                # The server's slots are taken (by work whose caller left, or another client's): hold this
                # lease a moment, so that the retry does not find the same slot still busy.
                wait = min(_BUSY_BACKOFF_S[1], _BUSY_BACKOFF_S[0] * 2 ** min(max(j.busy for j in busy), 5))
                self._stopped.wait(wait)
            self._finished(call, outcomes, call_code)

    def _send(self, call: _Call, method: Any, request: Any, timeout: float) -> Any:
        """Makes the call through grpc's future API, so that a backup copy that answers first can cancel it."""
        rpc = method.future(request, timeout=timeout)
        with self._lock:
            call.rpc = rpc
            cancelled = call.cancelled
        if cancelled:
            rpc.cancel()
        return rpc.result()

    def _next_call(self) -> _Call | None:
        """Waits for queued tasks and a free slot and leases it; None when the pool has stopped.

        Evaluate tasks are taken several at a time, about half a fair share of the queue per slot. Backup copies
        of straggling calls join the front of the queue, never to be sent where their original runs."""
        with self._lock:
            while True:
                if self._stopped.is_set():
                    return None
                next_due = self._queue_backups_locked()
                while self._queue and self._queue[0].resolved:  # a copy whose original answered meanwhile
                    self._queue.popleft().queued_copy = False
                if self._queue and self._ledger.free_slots(exclude=self._queue[0].exclude) > 0:
                    job = self._queue.popleft()
                    self._space.notify_all()
                    if not self._start_locked(job):
                        continue
                    jobs = [job]
                    if job.method == "Evaluate" and not job.alone:
                        want = self._batch_size_locked(job)
                        ticks, reply = job.ticks, job.reply_bytes
                        while len(jobs) < want and self._queue:
                            mate = self._queue[0]
                            if (
                                mate.method != "Evaluate"
                                or mate.alone
                                or mate.exclude not in (None, job.exclude)
                                or (job.population is not None and mate.population != job.population)
                                or ticks + mate.ticks > self.config.max_batch_ticks
                                or reply + mate.reply_bytes > MAX_MESSAGE_BYTES // 2
                            ):
                                break
                            self._queue.popleft()
                            if mate.resolved:
                                mate.queued_copy = False
                                continue
                            if not self._start_locked(mate):
                                continue
                            ticks, reply = ticks + mate.ticks, reply + mate.reply_bytes
                            jobs.append(mate)
                    if not self._queue:
                        self._work.notify_all()  # idle workers: the tail begins, stragglers may want backups
                    address = self._ledger.lease(avoid=job.last_server, exclude=job.exclude)
                    assert address is not None  # free_slots(exclude) > 0
                    return self._call_locked(jobs, address)
                self._work.wait(next_due)

    def _batch_size_locked(self, job: _Job) -> int:
        """How many queued Evaluate tasks travel with `job` (taken from the queue's head) in one call.

        Guided self-scheduling: half a fair share per slot, so that calls shrink towards the end of a map and a
        straggler (or its backup copy) holds little of it; with one slot, fewer and bigger calls. Drivers of one
        population (see `min_population`) go by servers instead, as a server's slots share one interpreter: a
        fair share per idle server, at least `min_population` (scheduler.core.population_share)."""
        healthy = [r for r in self._ledger.servers.values() if r.healthy]
        if job.population is None:
            slots = max(1, sum(r.capacity for r in healthy))
            shares = _SHARES_PER_SLOT * slots if slots > 1 else 1
            return min(self.config.max_batch, math.ceil((len(self._queue) + 1) / shares))
        group, ticks = 1, job.ticks
        for mate in self._queue:
            if mate.population != job.population or mate.method != "Evaluate" or mate.alone:
                break
            group, ticks = group + 1, ticks + mate.ticks
        return population_share(
            group,
            ticks,
            len(self._queue) + 1,
            sum(1 for r in healthy if r.leased == 0),
            floor=self.config.min_population,
            max_batch=self.config.max_batch,
            max_ticks=self.config.max_batch_ticks,
        )

    def _call_locked(self, jobs: list[_Job], address: str) -> _Call:
        backupable = all(job.method == "Evaluate" for job in jobs)
        call = _Call(jobs, address, time.monotonic(), sum(job.ticks for job in jobs), backupable)
        for job in jobs:
            job.copies += 1
            job.queued_copy = False
        self._calls.add(call)
        return call

    def _queue_backups_locked(self) -> float | None:
        """Puts backup copies of straggling calls at the front of the queue; returns the seconds until the next
        call would straggle (None: none can until something changes).

        A call on a server that stopped answering (a failed health check, or one out for half its deadline) is
        copied at once, after `backup_min_s`. Otherwise only once the queue is empty and a slot is free on
        another server, as MapReduce does near the end of a map, so that a copy never delays fresh work: a call
        straggles when it has run `backup_factor` times longer than recent calls took for as many ticks."""
        if self.config.backup_factor <= 0 or not self._calls:
            return None
        now = time.monotonic()
        per_tick = statistics.median(self._tick_seconds) if self._tick_seconds else None
        tail = not self._queue
        next_due: float | None = None
        for call in self._calls:
            if call.backed_up or call.cancelled or not call.backupable or all(j.resolved for j in call.jobs):
                continue
            record = self._ledger.servers.get(call.address)
            earliest = call.started + self.config.backup_min_s
            due = math.inf
            if record is None or not record.healthy or record.slow_probes > 0:
                due = earliest
            elif (probed := self._probing.get(call.address)) is not None:
                due = max(earliest, probed + self.config.health_timeout_s / 2)
            answering = math.isinf(due)
            if tail and per_tick is not None:
                due = min(due, max(earliest, call.started + self.config.backup_factor * per_tick * max(1, call.ticks)))
            if math.isinf(due):
                continue  # its server answers and there is nothing to compare with: a deadline would tell
            if due > now:
                next_due = due if next_due is None else min(next_due, due)
                continue
            if answering and self._ledger.free_slots(exclude=call.address) == 0:
                continue  # late, not hung: a copy is worth an idle slot only; a call that ends frees one
            if not any(r.healthy and a != call.address for a, r in self._ledger.servers.items()):
                continue  # no other server to copy it to
            call.backed_up = True
            copies = [j for j in call.jobs if not j.resolved]
            for job in reversed(copies):
                job.exclude = call.address
                job.queued_copy = True
                self._queue.appendleft(job)
            self._ledger.counters.backups += len(copies)
            log.info(
                "backup: %d task(s) running %.1f s on %s (%s) queued for another server",
                len(copies),
                now - call.started,
                call.address,
                "late" if answering else "its server is not answering",
            )
        return None if next_due is None else max(0.0, next_due - now)

    def _start_locked(self, job: _Job) -> bool:
        """Marks a job taken from the queue as running; False (and forgotten) if it was cancelled there."""
        if job.started:
            return True
        if not job.future.set_running_or_notify_cancel():
            self._unresolved -= 1
            return False
        job.started = True
        return True

    def _busy_retry(self, job: _Job, details: str) -> bool:
        """Whether a task refused by a busy server goes back to the queue; it uses up no attempt."""
        now = time.monotonic()
        job.busy += 1
        if job.busy_since is None:
            job.busy_since = now
        if "does not fit" in details:
            job.alone = True
        return now - job.busy_since < self.config.busy_timeout_s

    def _finished(self, call: _Call, outcomes: list[_Outcome], call_code: grpc.StatusCode | None) -> None:
        jobs, address = call.jobs, call.address
        # A busy server is healthy: it answered. Only real faults set it aside until a health check passes; a
        # straggler that lost to its backup copy is set aside too, while a backup that lost is not at fault.
        if call.cancelled and call_code == grpc.StatusCode.CANCELLED:
            server_fault = call.backed_up
        else:
            server_fault = (
                call_code is not None and call_code not in _BUSY_CODES and self._retry.is_server_fault(call_code.name)
            )
        resolved: list[tuple[_Job, _Outcome]] = []
        losers: list[_Call] = []
        with self._lock:
            self._calls.discard(call)
            if call_code is None and call.ticks and not call.cancelled:
                self._tick_seconds.append((time.monotonic() - call.started) / call.ticks)
            record = self._ledger.servers.get(address)  # gone after the release if it left the pool
            counted = 0
            for job, outcome in zip(jobs, outcomes, strict=True):
                job.copies -= 1
                code = outcome[1]
                if code is not None and job.queued_copy:
                    job.exclude = None  # its queued copy is now its only attempt: on any server, as a retry is
                if job.resolved or (code is not None and (job.copies > 0 or job.queued_copy)):
                    continue  # another copy answered first, or is still out and has the last word
                counted += 1
                if code in _BUSY_CODES:
                    retry = self._busy_retry(job, outcome[2])
                else:
                    job.attempts += 1
                    retry = code is not None and self._retry.should_retry(code.name, job.attempts)
                if code is None:
                    self._ledger.counters.done += 1
                elif retry:
                    self._ledger.counters.retried += 1
                    if record is not None:
                        record.retried += 1
                    job.last_server, job.exclude = address, None
                    self._queue.appendleft(job)
                    self._work.notify()
                else:
                    self._ledger.counters.failed += 1
                if not retry:
                    job.resolved = True
                    resolved.append((job, outcome))
            self._ledger.release(address, server_fault, tasks=len(jobs) if server_fault else counted)
            if resolved:
                # Copies whose every job now has its answer are no longer needed: cancel them.
                for other in self._calls:
                    if not other.cancelled and all(j.resolved for j in other.jobs):
                        other.cancelled = True
                        losers.append(other)
        for loser in losers:
            if loser.rpc is not None:
                loser.rpc.cancel()
            log.info("a backup copy answered first; cancelled the call on %s", loser.address)
        if server_fault and not call.cancelled:
            assert call_code is not None
            log.warning(
                "%s failed %d task(s) with %s (%s); retrying what has attempts left elsewhere",
                address,
                len(jobs),
                call_code.name,
                outcomes[0][2],
            )
        for job, (response, code, details) in resolved:
            if code is not None:
                job.future.set_exception(EvaluationError(code, details))
            else:
                try:
                    job.future.set_result(job.task.result(response))
                except Exception as exc:
                    job.future.set_exception(exc)
        if resolved:
            self._resolved(len(resolved))

    def _purge_cancelled_locked(self) -> int:
        """Drops jobs cancelled while queued, so that they stop taking room; returns how many."""
        kept = deque(job for job in self._queue if not job.future.cancelled())
        purged = len(self._queue) - len(kept)
        self._queue = kept
        self._unresolved -= purged
        return purged

    def _resolved(self, count: int) -> None:
        with self._lock:
            self._unresolved -= count
            if self._shutdown and self._unresolved == 0:
                self._stopped.set()
                self._work.notify_all()
            self._space.notify_all()

    def _add_workers_locked(self) -> None:
        """One worker per slot the healthy servers offer; workers stay when capacity shrinks, idle."""
        wanted = min(MAX_WORKERS, sum(r.capacity for r in self._ledger.servers.values() if r.healthy))
        while len(self._workers) < wanted and not self._stopped.is_set():
            worker = threading.Thread(target=self._work_loop, daemon=True, name=f"scheduler-slot-{len(self._workers)}")
            worker.start()
            self._workers.append(worker)

    # -- membership and health ------------------------------------------------------------------
    def _maintain(self) -> None:
        next_resolve = time.monotonic() + self.config.discover_interval_s
        while True:
            if self.config.discover and time.monotonic() >= next_resolve:
                self._refresh_members()
                next_resolve = time.monotonic() + self.config.discover_interval_s
            self._check_health()
            if self._stopped.wait(self.config.health_interval_s):
                break
        with self._lock:
            connections, self._connections = self._connections, {}
        for connection in connections.values():
            connection.channel.close()

    def _refresh_members(self) -> None:
        if self.config.discover:
            host, port = parse_target(self.config.discover, DEFAULT_GAME_PORT)
            try:
                addresses = self._resolver(host, port)
            except OSError as exc:
                log.warning("cannot resolve %s (%s); keeping the pool as it is", self.config.discover, exc)
                return
        else:
            addresses = list(self.config.servers)
        with self._lock:
            joined, left = self._ledger.set_members(addresses)
            for address in joined:
                if address not in self._connections:
                    self._connections[address] = _connect(address, self._tls)
            gone = [a for a in self._connections if a not in self._ledger.servers]
            closing = [self._connections.pop(a) for a in gone]
        for connection in closing:
            connection.channel.close()
        if joined or left:
            log.info("pool membership: joined %s, left %s", joined, left)

    def _check_health(self) -> None:
        """Checks every server at once, so that one hung server costs one deadline, not one per server."""
        with self._lock:
            # A call that fails while a probe is out proves more than the probe: remember fault counts.
            targets = [
                (a, c, self._ledger.servers[a].failed)
                for a, c in self._connections.items()
                if a in self._ledger.servers
            ]
        timeout = self.config.health_timeout_s
        probes = [
            (
                address,
                faults,
                c.health.future(health_pb2.HealthCheckRequest(service=GAME_SERVICE), timeout=timeout),
                c.server_info.future(game_pb2.GetServerInfoRequest(), timeout=timeout),
            )
            for address, c, faults in targets
        ]
        sent = time.monotonic()
        with self._lock:
            for address, _, _ in targets:
                self._probing.setdefault(address, sent)
            self._work.notify_all()  # idle workers time the backups of calls on servers that stay silent
        for address, _, health, _ in probes:
            health.add_done_callback(functools.partial(self._answered, address))
        verdicts: list[tuple[str, int, int | None]] = []  # capacity None: the check ran out of time
        for address, faults, health, info in probes:
            capacity: int | None
            try:
                serving = health.result().status == health_pb2.HealthCheckResponse.SERVING
                capacity = int(info.result().evaluate_slots) if serving else 0
            except grpc.RpcError as exc:
                capacity = None if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED else 0
            verdicts.append((address, faults, capacity))
        with self._lock:
            changed = []
            for address, faults, capacity in verdicts:
                record = self._ledger.servers.get(address)
                if record is None:
                    continue
                was = record.healthy
                if capacity is None:
                    self._ledger.probe_timed_out(address, self.config.health_slow_limit)
                elif capacity > 0:
                    self._ledger.mark_healthy(address, capacity, faults_seen=faults)
                else:
                    self._ledger.mark_unhealthy(address)
                if record.healthy != was:
                    changed.append((address, record.healthy, capacity or 0))
            self._add_workers_locked()
            self._work.notify_all()
            self._space.notify_all()  # wait_ready()
            stranded = self._take_stranded_locked()
            members = ", ".join(sorted(self._ledger.servers)) or "none"
        for address, healthy, capacity in changed:
            log.info("%s is %s", address, f"healthy with {capacity} slots" if healthy else "unhealthy")
        if stranded:
            self._fail_stranded(stranded, members)

    def _answered(self, address: str, _: Any) -> None:
        """A health check came back (whatever it said): the server is not hung."""
        with self._lock:
            self._probing.pop(address, None)

    def _take_stranded_locked(self) -> list[_Job]:
        """The queue, once no server has been healthy for `unavailable_timeout_s`; otherwise nothing."""
        if any(r.healthy for r in self._ledger.servers.values()):
            self._no_server_since = None
            return []
        now = time.monotonic()
        if self._no_server_since is None:
            self._no_server_since = now
        limit = self.config.unavailable_timeout_s
        if limit is None or not self._queue or now - self._no_server_since < limit:
            return []
        # A backup copy's job is left to its original, still out.
        stranded = [job for job in dict.fromkeys(self._queue) if not job.resolved and job.copies == 0]
        for job in self._queue:
            job.queued_copy = False
        for job in stranded:
            job.resolved = True
        self._queue = deque()
        self._ledger.counters.failed += len(stranded)
        self._space.notify_all()
        return stranded

    def _fail_stranded(self, jobs: list[_Job], members: str) -> None:
        limit = self.config.unavailable_timeout_s
        details = f"no healthy game server for {limit:g} s (pool members: {members})"
        log.error("failing %d queued task(s): %s", len(jobs), details)
        for job in jobs:
            # A retry's future is already running; a first attempt's is started here, unless cancelled.
            if job.started or job.future.set_running_or_notify_cancel():
                job.future.set_exception(EvaluationError(grpc.StatusCode.UNAVAILABLE, details))
        self._resolved(len(jobs))
