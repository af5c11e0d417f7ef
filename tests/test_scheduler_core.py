"""Unit tests of the scheduler's pure core: leases, health, membership, retries and target parsing."""

from __future__ import annotations

import pytest

from scheduler.core import Ledger, RetryPolicy, join_host_port, parse_target, population_share


def ledger_with(**capacities: int) -> Ledger:
    ledger = Ledger()
    ledger.set_members(capacities)
    for address, capacity in capacities.items():
        ledger.mark_healthy(address, capacity)
    return ledger


def test_leases_never_exceed_capacity() -> None:
    ledger = ledger_with(a=2, b=1)
    leases = [ledger.lease() for _ in range(5)]
    assert sorted(x for x in leases if x) == ["a", "a", "b"]
    assert leases[3:] == [None, None]
    assert ledger.in_flight() == 3 and ledger.free_slots() == 0
    ledger.release("a", server_fault=False)
    assert ledger.lease() == "a"


def test_lease_prefers_least_loaded_and_avoids_the_failed_server() -> None:
    ledger = ledger_with(a=2, b=2)
    assert ledger.lease() == "a"
    assert ledger.lease() == "b"
    assert ledger.lease(avoid="a") == "b"
    assert ledger.lease(avoid="a") == "a"  # the only free slot left


def test_a_backup_lease_is_never_on_the_excluded_server() -> None:
    ledger = ledger_with(a=2, b=1)
    assert ledger.lease(exclude="a") == "b"
    assert ledger.lease(exclude="a") is None  # a has free slots, but the copy must run elsewhere
    assert ledger.lease() == "a"


def test_server_fault_marks_unhealthy_until_a_newer_check_passes() -> None:
    ledger = ledger_with(a=1)
    assert ledger.lease() == "a"
    faults_when_probe_sent = ledger.servers["a"].failed
    ledger.release("a", server_fault=True)
    assert not ledger.servers["a"].healthy and ledger.lease() is None
    ledger.mark_healthy("a", 1, faults_seen=faults_when_probe_sent)  # a probe older than the fault
    assert not ledger.servers["a"].healthy
    ledger.mark_healthy("a", 1, faults_seen=ledger.servers["a"].failed)
    assert ledger.lease() == "a"


def test_late_health_checks_set_a_busy_server_aside_only_when_late_several_times_in_a_row() -> None:
    ledger = ledger_with(a=2)
    ledger.probe_timed_out("a", limit=3)
    ledger.probe_timed_out("a", limit=3)
    assert ledger.servers["a"].healthy, "two late answers from a busy server do not set it aside"
    ledger.mark_healthy("a", 2)  # an answer in time starts the count again
    for _ in range(2):
        ledger.probe_timed_out("a", limit=3)
    assert ledger.lease() == "a"
    ledger.probe_timed_out("a", limit=3)
    assert not ledger.servers["a"].healthy and ledger.lease() is None
    ledger.mark_unhealthy("a")  # a refused or NOT_SERVING check never waits for a count
    ledger.mark_healthy("a", 2)
    ledger.mark_unhealthy("a")
    assert not ledger.servers["a"].healthy


def test_a_new_server_whose_checks_time_out_never_joins() -> None:
    ledger = Ledger()
    ledger.set_members(["a"])
    for _ in range(5):
        ledger.probe_timed_out("a", limit=3)
    assert not ledger.servers["a"].healthy and ledger.lease() is None


def test_zero_capacity_is_unhealthy() -> None:
    ledger = ledger_with(a=0)
    assert not ledger.servers["a"].healthy and ledger.lease() is None


def test_membership_keeps_a_leaving_server_until_its_leases_return() -> None:
    ledger = ledger_with(a=1, b=1)
    assert ledger.lease(avoid="b") == "a"
    joined, left = ledger.set_members(["b", "c"])
    assert (joined, left) == (["c"], ["a"])
    assert "a" in ledger.servers and ledger.addresses() == ["b", "c"]
    assert ledger.lease() == "b"  # never a new lease on a leaving server; c is not checked yet
    assert ledger.lease() is None
    ledger.release("a", server_fault=False)
    assert "a" not in ledger.servers
    assert ledger.set_members(["b", "c"]) == ([], [])


def test_counters_and_status() -> None:
    ledger = ledger_with(b=2, a=1)
    ledger.lease()
    ledger.counters.done += 3
    status = ledger.status(pending=7)
    assert [s.address for s in status.servers] == ["a", "b"]
    assert (status.in_flight, status.pending, status.done) == (1, 7, 3)


@pytest.mark.parametrize(
    ("code", "attempts", "retry"),
    [
        ("UNAVAILABLE", 1, True),
        ("DEADLINE_EXCEEDED", 3, True),
        ("RESOURCE_EXHAUSTED", 1, True),
        ("UNAVAILABLE", 4, False),  # attempts are bounded
        ("INVALID_ARGUMENT", 1, False),  # a bad task fails on any server
        ("NOT_FOUND", 1, False),
        ("FAILED_PRECONDITION", 1, False),
        ("INTERNAL", 1, False),
    ],
)
def test_retry_policy(code: str, attempts: int, retry: bool) -> None:
    assert RetryPolicy(max_attempts=4).should_retry(code, attempts) is retry


def test_retry_policy_needs_an_attempt() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("game", ("game", 50051)),
        ("game:7000", ("game", 7000)),
        ("game-server.rrp.svc.cluster.local:50051", ("game-server.rrp.svc.cluster.local", 50051)),
        ("[::1]:7000", ("::1", 7000)),
        ("[::1]", ("::1", 50051)),
    ],
)
def test_parse_target(target: str, expected: tuple[str, int]) -> None:
    assert parse_target(target, 50051) == expected


@pytest.mark.parametrize("target", ["", ":80", "game:0", "game:x", "[::1", "[::1]x"])
def test_parse_target_rejects(target: str) -> None:
    with pytest.raises(ValueError):
        parse_target(target, 50051)


def test_join_host_port_brackets_ipv6() -> None:
    assert join_host_port("::1", 80) == "[::1]:80"
    assert join_host_port("10.0.0.1", 80) == "10.0.0.1:80"


def test_a_population_is_cut_only_to_feed_idle_servers_and_into_equal_parts() -> None:
    def share(group: int, queued: int, idle: int, ticks: int = 1000) -> int:
        return population_share(group, group * ticks, queued, idle, floor=32, max_batch=128, max_ticks=200_000)

    # A GA generation of 96 drivers on 3 tracks: one track per server while servers are idle, then whole.
    assert [share(96, 288, 3), share(96, 192, 2), share(96, 96, 1)] == [96, 96, 96]
    assert [share(96, 288, 2), share(96, 192, 1), share(96, 96, 0)] == [96, 96, 96]
    # One track, two idle servers: halves; never a small remainder, never below the floor.
    assert share(96, 96, 2) == 48
    assert share(100, 100, 3) == 34
    assert share(40, 40, 4) == 40
    assert share(5, 5, 2) == 5
    # Bounded by max_batch and by the ticks one call may carry, in equal parts.
    assert share(300, 300, 1) == 100
    assert share(96, 96, 1, ticks=3000) == 48
