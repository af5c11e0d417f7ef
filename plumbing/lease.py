"""One holder at a time, across nodes: a Kubernetes Lease in a cluster, flock on one machine.

Both locks are non-blocking: `acquire` takes the lock or raises FailedPrecondition naming who holds it. A Lease is
held by renewing it (a thread, every third of its duration); a holder that dies stops renewing and the Lease
expires, as the kernel drops a dead process's flock. `lost` is set if a renewal finds another holder: the work the
lock guarded must stop. flock on a shared filesystem is per node on many ReadWriteMany backends: use the Lease on a
cluster (`lock_for` picks it when the pod runs in one).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import socket
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from plumbing.errors import FailedPrecondition, Unavailable

log = logging.getLogger(__name__)

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
LEASES = "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"


class Lock(Protocol):
    """What a deployer needs of its lock, whichever kind."""

    lost: threading.Event

    def acquire(self) -> None: ...

    def release(self) -> None: ...


@contextlib.contextmanager
def held(lock: Lock) -> Iterator[Lock]:
    """`with held(lock):` the lock is taken (or FailedPrecondition raised) and always given back."""
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()


@dataclass
class FileLock:
    """flock on a file: one holder per machine (and per node of a shared filesystem that keeps locks per node)."""

    path: Path
    lost: threading.Event = field(default_factory=threading.Event)
    _file: IO[str] | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = self.path.open("a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise FailedPrecondition(f"another holder has {self.path}") from None
        self._file = f

    def release(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            fcntl.flock(f, fcntl.LOCK_UN)
            f.close()


@dataclass(frozen=True)
class ApiServer:
    """Where and how to reach the Kubernetes API: in a pod, from its service account and environment."""

    url: str
    namespace: str
    token_file: Path | None = None  # read at every request: projected tokens rotate
    ca_file: Path | None = None

    @classmethod
    def in_cluster(cls, env: Mapping[str, str] = os.environ, account: Path = SERVICE_ACCOUNT) -> ApiServer | None:
        """The pod's own API server, or None outside a cluster (no KUBERNETES_SERVICE_HOST, token or CA)."""
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
        if not host or not (account / "token").is_file() or not (account / "ca.crt").is_file():
            return None
        host = f"[{host}]" if ":" in host else host
        namespace = (account / "namespace").read_text().strip()
        return cls(f"https://{host}:{port}", namespace, account / "token", account / "ca.crt")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _micro_time(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # a MicroTime, as the API server wants it


def _parse_time(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


class LeaseLock:
    """A coordination.k8s.io/v1 Lease: taken when absent, expired, released or already ours; renewed while held.

    Two contenders that both see it free both write it with the resourceVersion they read: the API server keeps
    one write and answers 409 Conflict to the other, which then does not hold it."""

    def __init__(
        self, api: ApiServer, name: str, holder: str | None = None, duration_s: int = 15, timeout_s: float = 5.0
    ) -> None:
        self.api = api
        self.name = name
        self.holder = holder or f"{socket.gethostname()}-{os.getpid()}"
        self.duration_s = duration_s
        self.timeout_s = timeout_s
        self.lost = threading.Event()
        self._lease: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._ssl: ssl.SSLContext | None = None  # made at the first call: the CA file is read then

    # -- the API ----------------------------------------------------------------------------------------------------
    def _url(self, name: str | None) -> str:
        base = self.api.url.rstrip("/") + LEASES.format(namespace=self.api.namespace)
        return f"{base}/{name}" if name else base

    def _call(self, method: str, name: str | None, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        headers = {"Accept": "application/json", "Content-Type": "application/json"}
        if self.api.token_file is not None:
            headers["Authorization"] = f"Bearer {self.api.token_file.read_text().strip()}"
        if self._ssl is None and self.api.ca_file is not None:
            self._ssl = ssl.create_default_context(cafile=str(self.api.ca_file))
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self._url(name), data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s, context=self._ssl) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            if exc.code in (404, 409):
                return exc.code, {}
            raise Unavailable(f"Kubernetes API {method} lease {self.name}: HTTP {exc.code} {exc.reason}") from None
        except OSError as exc:
            raise Unavailable(f"Kubernetes API {method} lease {self.name}: {exc}") from None

    def _spec(self, previous: dict[str, Any] | None) -> dict[str, Any]:
        now = _micro_time(_now())
        spec = dict(previous or {})
        if spec.get("holderIdentity") != self.holder:
            spec["acquireTime"] = now
            spec["leaseTransitions"] = int(spec.get("leaseTransitions", 0)) + (1 if previous else 0)
        spec.update(holderIdentity=self.holder, leaseDurationSeconds=self.duration_s, renewTime=now)
        return spec

    @staticmethod
    def _free(spec: dict[str, Any]) -> bool:
        if not spec.get("holderIdentity"):
            return True
        renewed = _parse_time(spec.get("renewTime")) or _parse_time(spec.get("acquireTime"))
        duration = dt.timedelta(seconds=int(spec.get("leaseDurationSeconds") or 0))
        return renewed is None or renewed + duration < _now()

    # -- the lock ---------------------------------------------------------------------------------------------------
    def acquire(self) -> None:
        status, lease = self._call("GET", self.name)
        if status == 404:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.api.namespace},
                "spec": self._spec(None),
            }
            status, lease = self._call("POST", None, body)
            if status == 409:
                raise FailedPrecondition(f"lease {self.name}: another holder created it first")
        else:
            spec = lease.get("spec", {})
            if spec.get("holderIdentity") != self.holder and not self._free(spec):
                raise FailedPrecondition(f"lease {self.name} is held by {spec.get('holderIdentity')}")
            status, lease = self._call("PUT", self.name, {**lease, "spec": self._spec(spec)})
            if status in (404, 409):
                raise FailedPrecondition(f"lease {self.name}: another holder took it first")
        self._lease = lease
        self.lost.clear()
        self._stop.clear()
        self._renewer = threading.Thread(target=self._renew, daemon=True, name=f"lease-{self.name}")
        self._renewer.start()
        log.info("lease %s/%s taken by %s", self.api.namespace, self.name, self.holder)

    def _renew(self) -> None:
        while not self._stop.wait(self.duration_s / 3):
            lease = self._lease
            assert lease is not None
            try:
                status, renewed = self._call("PUT", self.name, {**lease, "spec": self._spec(lease["spec"])})
            except Unavailable as exc:  # the API may come back before the lease runs out
                log.warning("lease %s not renewed: %s", self.name, exc)
                continue
            if status != 200 or renewed.get("spec", {}).get("holderIdentity") != self.holder:
                log.error("lease %s lost: another holder wrote it (HTTP %d)", self.name, status)
                self.lost.set()
                return
            self._lease = renewed

    def release(self) -> None:
        """Stops renewing and frees the Lease at once (no holder), so that the next deployer need not wait."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None
        lease, self._lease = self._lease, None
        if lease is None or self.lost.is_set():
            return
        spec = {**lease["spec"], "holderIdentity": None, "leaseDurationSeconds": 1, "renewTime": _micro_time(_now())}
        try:
            self._call("PUT", self.name, {**lease, "spec": spec})
        except Unavailable as exc:  # it expires on its own
            log.warning("lease %s not released (it expires in %d s): %s", self.name, self.duration_s, exc)


def lock_for(name: str, path: Path, env: Mapping[str, str] = os.environ, account: Path = SERVICE_ACCOUNT) -> Lock:
    """The Lease `name` when this runs in a cluster pod with a service account token, else flock on `path`."""
    api = ApiServer.in_cluster(env, account)
    return LeaseLock(api, name) if api is not None else FileLock(path)
