"""plumbing.lease: the Kubernetes Lease against a small fake API server (Lease GET/POST/PUT with resourceVersion
conflicts and a bearer token, as the real one answers them), and flock on one machine."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from plumbing.errors import FailedPrecondition, Unavailable
from plumbing.lease import ApiServer, FileLock, LeaseLock, held, lock_for

TOKEN = "test-token"
PREFIX = "/apis/coordination.k8s.io/v1/namespaces/racing/leases"


class FakeApi(ThreadingHTTPServer):
    """Leases in memory; every write must carry the resourceVersion it read (optimistic concurrency)."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.leases: dict[str, dict[str, Any]] = {}
        self.version = 0
        self.lock = threading.Lock()
        self.writes: list[tuple[str, str, int]] = []  # (method, holder, HTTP status)

    def next_version(self) -> str:
        self.version += 1
        return str(self.version)


class _Handler(BaseHTTPRequestHandler):
    server: FakeApi

    def log_message(self, *args: object) -> None:
        pass

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _route(self) -> str | None:
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self._answer(401, {"kind": "Status", "code": 401})
            return None
        if not self.path.startswith(PREFIX):
            self._answer(404, {"kind": "Status", "code": 404})
            return None
        return self.path[len(PREFIX) :].strip("/")

    def do_GET(self) -> None:
        name = self._route()
        if name is None:
            return
        with self.server.lock:
            lease = self.server.leases.get(name)
        self._answer(200, lease) if lease else self._answer(404, {"kind": "Status", "code": 404})

    def _body(self) -> dict[str, Any]:
        return dict(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

    def do_POST(self) -> None:
        if self._route() is None:
            return
        body = self._body()
        name = body["metadata"]["name"]
        with self.server.lock:
            if name in self.server.leases:
                status = 409  # AlreadyExists
            else:
                body["metadata"]["resourceVersion"] = self.server.next_version()
                self.server.leases[name] = body
                status = 201
            self.server.writes.append(("POST", body["spec"]["holderIdentity"], status))
        self._answer(status, body if status == 201 else {"kind": "Status", "code": 409})

    def do_PUT(self) -> None:
        name = self._route()
        if name is None:
            return
        body = self._body()
        with self.server.lock:
            current = self.server.leases.get(name)
            if current is None:
                status = 404
            elif body["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
                status = 409  # Conflict: written by someone else since it was read
            else:
                body["metadata"]["resourceVersion"] = self.server.next_version()
                self.server.leases[name] = body
                status = 200
            self.server.writes.append(("PUT", body["spec"].get("holderIdentity"), status))
        self._answer(status, body if status == 200 else {"kind": "Status", "code": status})


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[FakeApi, ApiServer]]:
    server = FakeApi()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    token = tmp_path / "token"
    token.write_text(TOKEN)
    try:
        yield server, ApiServer(f"http://127.0.0.1:{server.server_address[1]}", "racing", token)
    finally:
        server.shutdown()
        server.server_close()


def _until(condition: Any, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_one_holder_at_a_time_and_release_frees_it(api: tuple[FakeApi, ApiServer]) -> None:
    fake, server = api
    a, b = LeaseLock(server, "rrp-deployer", "a"), LeaseLock(server, "rrp-deployer", "b")
    with held(a):
        assert fake.leases["rrp-deployer"]["spec"]["holderIdentity"] == "a"
        with pytest.raises(FailedPrecondition, match="held by a"):
            b.acquire()
    assert fake.leases["rrp-deployer"]["spec"]["holderIdentity"] is None
    with held(b):
        spec = fake.leases["rrp-deployer"]["spec"]
        assert spec["holderIdentity"] == "b" and spec["leaseTransitions"] == 1


def test_a_dead_holders_lease_expires_and_a_live_one_is_renewed(api: tuple[FakeApi, ApiServer]) -> None:
    fake, server = api
    alive = LeaseLock(server, "live", "alive", duration_s=1)
    alive.acquire()
    first = fake.leases["live"]["spec"]["renewTime"]
    _until(lambda: fake.leases["live"]["spec"]["renewTime"] != first)  # renewed before it runs out
    with pytest.raises(FailedPrecondition):
        LeaseLock(server, "live", "other").acquire()
    alive.release()
    dead = LeaseLock(server, "dead", "dead", duration_s=1)
    dead.acquire()
    dead._stop.set()  # the process is killed: nobody renews, nobody releases
    taker = LeaseLock(server, "dead", "taker", duration_s=1)

    def taken() -> bool:
        try:
            taker.acquire()
        except FailedPrecondition:
            return False
        return True

    _until(taken)
    assert fake.leases["dead"]["spec"]["holderIdentity"] == "taker"
    taker.release()


def test_a_holder_learns_that_another_took_its_lease(api: tuple[FakeApi, ApiServer]) -> None:
    fake, server = api
    paused = LeaseLock(server, "taken", "paused", duration_s=1)
    paused.acquire()
    with fake.lock:  # another holder wrote it (it found the lease expired while this one was paused)
        lease = fake.leases["taken"]
        lease["spec"]["holderIdentity"] = "intruder"
        lease["metadata"]["resourceVersion"] = fake.next_version()
    _until(paused.lost.is_set)  # its next renewal meets a Conflict: the guarded work must stop
    paused.release()
    assert fake.leases["taken"]["spec"]["holderIdentity"] == "intruder"  # a lost lease is not released


def test_contenders_racing_for_a_free_lease_get_one_winner(api: tuple[FakeApi, ApiServer]) -> None:
    fake, server = api
    first = LeaseLock(server, "race", "first")
    first.acquire()
    first._stop.set()  # first dies, and its lease has expired: everyone reads it free at once
    fake.leases["race"]["spec"]["renewTime"] = "2000-01-01T00:00:00.000000Z"
    locks = [LeaseLock(server, "race", f"c{i}", duration_s=30) for i in range(8)]
    won, barrier = [], threading.Barrier(len(locks))

    def contend(lock: LeaseLock) -> None:
        barrier.wait()
        try:
            lock.acquire()
            won.append(lock.holder)
        except FailedPrecondition:
            pass

    threads = [threading.Thread(target=contend, args=(lock,)) for lock in locks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and fake.leases["race"]["spec"]["holderIdentity"] == won[0]
    conflicts = [w for w in fake.writes if w[0] == "PUT" and w[2] == 409]
    assert len(conflicts) + len(won) == len([w for w in fake.writes if w[0] == "PUT" and w[1] != "first"])
    next(lock for lock in locks if lock.holder == won[0]).release()


def test_the_api_must_answer_and_accept_the_token(api: tuple[FakeApi, ApiServer], tmp_path: Path) -> None:
    _, server = api
    bad = tmp_path / "bad-token"
    bad.write_text("nope")
    with pytest.raises(Unavailable, match="401"):
        LeaseLock(ApiServer(server.url, "racing", bad), "x").acquire()
    with pytest.raises(Unavailable):
        LeaseLock(ApiServer("http://127.0.0.1:1", "racing"), "x", timeout_s=1).acquire()


def test_flock_on_one_machine(tmp_path: Path) -> None:
    a, b = FileLock(tmp_path / "deploy.lock"), FileLock(tmp_path / "deploy.lock")
    with held(a), pytest.raises(FailedPrecondition, match="another holder"):
        b.acquire()
    with held(b):
        pass


def test_lock_for_picks_the_lease_in_a_cluster_and_flock_elsewhere(tmp_path: Path) -> None:
    account = tmp_path / "serviceaccount"
    account.mkdir()
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    assert isinstance(lock_for("d", tmp_path / "l", env=env, account=account), FileLock)  # no service account
    for name, text in (("token", TOKEN), ("namespace", "racing\n"), ("ca.crt", "")):
        (account / name).write_text(text)
    assert isinstance(lock_for("d", tmp_path / "l", env={}, account=account), FileLock)  # no API server
    lock = lock_for("rrp-deployer", tmp_path / "l", env=env, account=account)
    assert isinstance(lock, LeaseLock) and lock.name == "rrp-deployer"
    assert (lock.api.url, lock.api.namespace, lock.api.token_file) == (
        "https://10.96.0.1:443",
        "racing",
        account / "token",
    )


def test_the_registry_takes_the_lease_its_env_names_and_flock_without_one(
    api: tuple[FakeApi, ApiServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from serving import registry as registry_module

    fake, server = api
    one, other = registry_module.Registry(tmp_path / "store"), registry_module.Registry(tmp_path / "store")
    with one.lock() as lock:  # no RRP_DEPLOY_LEASE: flock on the store
        assert isinstance(lock, FileLock)
        with pytest.raises(FailedPrecondition, match="another deployer holds"):
            other.lock().__enter__()
    # In a pod (the API found from the service account), the Lease the chart names: a second deployer,
    # on another node where flock would not see the first, is refused by the API server.
    holders = iter(("deployer-a", "deployer-b"))
    monkeypatch.setattr(registry_module, "lock_for", lambda name, path: LeaseLock(server, name, next(holders)))
    monkeypatch.setenv(registry_module.LEASE_ENV, "rrp-deployer")
    with one.lock() as lock:
        assert isinstance(lock, LeaseLock)
        assert fake.leases["rrp-deployer"]["spec"]["holderIdentity"] == "deployer-a"
        with pytest.raises(FailedPrecondition, match=r"another deployer holds.*held by deployer-a"):
            other.lock().__enter__()
    assert fake.leases["rrp-deployer"]["spec"]["holderIdentity"] is None
