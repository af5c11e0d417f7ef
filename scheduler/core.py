"""The scheduler's pure bookkeeping: pool membership, health, slot leases, retry policy and counters."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

# Status codes by name, so that this module needs no grpc. A server that died, hung or is shutting down
# answers these; the same evaluation on another server is expected to succeed.
SERVER_FAULTS = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "ABORTED", "UNKNOWN"})
# A server that is busy (its slots taken, e.g. by another client) answers this: retry elsewhere.
SERVER_BUSY = frozenset({"RESOURCE_EXHAUSTED"})


@dataclass(frozen=True)
class RetryPolicy:
    """Which errors are the server's fault, and how often one evaluation may be tried."""

    max_attempts: int = 4

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")

    @staticmethod
    def is_server_fault(code: str) -> bool:
        """A server fault says nothing about the task: the server is set aside and the task retried."""
        return code in SERVER_FAULTS or code in SERVER_BUSY

    def should_retry(self, code: str, attempts_made: int) -> bool:
        """Task errors (INVALID_ARGUMENT, NOT_FOUND, ...) fail at once; they would fail on any server."""
        return self.is_server_fault(code) and attempts_made < self.max_attempts


@dataclass
class ServerRecord:
    """What the pool knows about one game server."""

    address: str
    healthy: bool = False
    capacity: int = 0
    leased: int = 0
    done: int = 0
    failed: int = 0
    retried: int = 0  # tasks it failed or refused that went back to the queue
    slow_probes: int = 0  # health checks in a row that ran out of time
    # False once discovery no longer lists it; it is forgotten when its last lease returns.
    member: bool = True

    @property
    def free_slots(self) -> int:
        if not (self.healthy and self.member):
            return 0
        return max(0, self.capacity - self.leased)


@dataclass(frozen=True)
class ServerStatus:
    """A snapshot of one server, for status reports."""

    address: str
    healthy: bool
    capacity: int
    in_flight: int
    done: int
    failed: int
    retried: int = 0


@dataclass(frozen=True)
class PoolStatus:
    """A snapshot of the pool and its counters."""

    servers: tuple[ServerStatus, ...]
    in_flight: int
    pending: int
    done: int
    retried: int
    failed: int
    backups: int = 0


@dataclass
class Counters:
    """Evaluations finished with a result (done) or an error (failed), attempts retried, and backup copies
    sent for straggling calls."""

    done: int = 0
    retried: int = 0
    failed: int = 0
    backups: int = 0


@dataclass
class Ledger:
    """Servers and their leases: never more leases on a server than the slots it offers.

    Not thread-safe by itself: the executor calls it under its one lock, which keeps this class free
    of threads and easy to test.
    """

    servers: dict[str, ServerRecord] = field(default_factory=dict)
    counters: Counters = field(default_factory=Counters)

    # -- membership -----------------------------------------------------------------------------
    def set_members(self, addresses: Iterable[str]) -> tuple[list[str], list[str]]:
        """Makes `addresses` the pool; returns (joined, left). New servers are unhealthy until checked."""
        wanted = dict.fromkeys(addresses)
        joined = [a for a in wanted if a not in self.servers or not self.servers[a].member]
        left = [a for a, r in self.servers.items() if r.member and a not in wanted]
        for address in joined:
            record = self.servers.get(address)
            if record is None:
                self.servers[address] = ServerRecord(address)
            else:
                record.member = True
        for address in left:
            self.servers[address].member = False
        self._forget_departed()
        return joined, left

    def _forget_departed(self) -> None:
        for address in [a for a, r in self.servers.items() if not r.member and r.leased == 0]:
            del self.servers[address]

    def addresses(self) -> list[str]:
        return [a for a, r in self.servers.items() if r.member]

    # -- health ---------------------------------------------------------------------------------
    def mark_healthy(self, address: str, capacity: int, faults_seen: int | None = None) -> None:
        """Admits a server that passed a health check, unless a call failed on it since the check began.

        `faults_seen` is the server's `failed` count when the check was sent: a fault after that is
        newer evidence than the check's answer.
        """
        record = self.servers.get(address)
        if record is None or (faults_seen is not None and record.failed != faults_seen):
            return
        record.healthy = capacity > 0
        record.capacity = capacity
        record.slow_probes = 0

    def mark_unhealthy(self, address: str) -> None:
        record = self.servers.get(address)
        if record is not None:
            record.healthy = False

    def probe_timed_out(self, address: str, limit: int) -> None:
        """A health check that ran out of time sets a healthy server aside only the `limit`-th time in a row.

        A server busy evaluating on a loaded machine can answer a probe late and still be fine; one that is
        down or says NOT_SERVING is set aside at once (`mark_unhealthy`), and so is one whose call fails.
        """
        record = self.servers.get(address)
        if record is None:
            return
        record.slow_probes += 1
        if record.slow_probes >= limit:
            record.healthy = False

    # -- leases ---------------------------------------------------------------------------------
    def free_slots(self, exclude: str | None = None) -> int:
        return sum(r.free_slots for r in self.servers.values() if r.address != exclude)

    def lease(self, avoid: str | None = None, exclude: str | None = None) -> str | None:
        """Leases a slot on the least loaded healthy server, preferring one other than `avoid` and never on
        `exclude` (a backup copy must run elsewhere than the call it backs up)."""
        best: ServerRecord | None = None
        best_key: tuple[bool, float] | None = None
        for record in self.servers.values():
            if record.free_slots == 0 or record.address == exclude:
                continue
            key = (record.address == avoid, record.leased / record.capacity)
            if best_key is None or key < best_key:
                best, best_key = record, key
        if best is None:
            return None
        best.leased += 1
        return best.address

    def release(self, address: str, server_fault: bool, tasks: int = 1) -> None:
        """Returns a lease that ran `tasks` tasks; a server fault marks the server unhealthy until a health
        check passes."""
        record = self.servers[address]
        record.leased -= 1
        if server_fault:
            record.failed += tasks
            record.healthy = False
        else:
            record.done += tasks
        if not record.member and record.leased == 0:
            del self.servers[address]

    def in_flight(self) -> int:
        return sum(r.leased for r in self.servers.values())

    def status(self, pending: int) -> PoolStatus:
        servers = tuple(
            ServerStatus(r.address, r.healthy, r.capacity, r.leased, r.done, r.failed, r.retried)
            for r in sorted(self.servers.values(), key=lambda r: r.address)
        )
        c = self.counters
        return PoolStatus(servers, self.in_flight(), pending, c.done, c.retried, c.failed, c.backups)


def population_share(
    group: int, group_ticks: int, queued: int, idle_servers: int, *, floor: int, max_batch: int, max_ticks: int
) -> int:
    """How many of the `group` drivers of one population at the queue's head (`group_ticks` ticks of work, in
    a queue of `queued` tasks) travel in the next call.

    A tick of a population costs about the same however few cars it holds, so a population is cut only to
    give every idle server a fair share of the queue (a server's slots share one interpreter: the second
    slot of a busy server adds no speed), never below `floor` drivers, into equal parts, so that no call is
    left with a few cars; `max_batch` and `max_ticks` bound one call."""
    want = max(floor, math.ceil(queued / max(1, idle_servers)))
    parts = max(1, min(math.ceil(group / want), group // floor))
    parts = max(parts, math.ceil(group / max_batch), math.ceil(group_ticks / max_ticks))
    return math.ceil(group / parts)


def parse_target(target: str, default_port: int) -> tuple[str, int]:
    """Splits "name[:port]" ("[v6]:port" for IPv6 literals) for DNS discovery."""
    host, port = target, default_port
    if target.startswith("["):
        close = target.find("]")
        if close < 0:
            raise ValueError(f"unbalanced bracket in {target!r}")
        host, rest = target[1:close], target[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"expected ':port' after the address in {target!r}")
            port = int(rest[1:])
    elif target.count(":") == 1:
        host, port_text = target.split(":")
        port = int(port_text)
    if not host or not 0 < port < 65536:
        raise ValueError(f"not a host[:port] target: {target!r}")
    return host, port


def join_host_port(host: str, port: int) -> str:
    """The "host:port" form gRPC dials, bracketing IPv6 addresses."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
