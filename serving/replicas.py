"""One model over its replicas: round robin over every address the model servers' names resolve to (looked up
again in the background), a dead replica left out for a moment and a joining one taken in, with no missed tick."""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable

import numpy as np

from plumbing.channels import ClientTLS
from plumbing.errors import DeadlineExceeded, DomainError, InvalidArgument, Unavailable, quote
from serving import metrics
from serving.client import (
    Busy,
    InferenceClient,
    ModelRef,
    PermissionDenied,
    T,
    Unauthenticated,
    connect,
)
from serving.codec import Decision

log = logging.getLogger(__name__)

REFRESH_EVERY_S = 1.0  # a replica whose token is refused is reconnected at most this often
RESOLVE_EVERY_S = 1.0  # a name's addresses are looked up again this often: a new replica serves within ~1 s
RETRY_DOWN_S = 1.0  # a replica found unavailable is left out of the rotation this long, then tried again
# A call unanswered this long is stuck, not late (a late answer comes within serving.race's 1 s): the replica's
# client is connected again on a connection of its own, and the stuck call left to end by itself.
STUCK_CALL_S = 2.0


def _host_name(address: str) -> tuple[str, str] | None:
    """(host name, port) of `name:port`; None for an IP literal or what is not `host:port`."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return None
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        return host, port


def resolve_address(address: str) -> list[str]:
    """`host:port` -> every `ip:port` the host name resolves to (an IP literal: itself)."""
    named = _host_name(address)
    if named is None:
        return [address]
    host, port = named
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except OSError as exc:
        raise Unavailable(f"model server name {quote(host)} does not resolve: {exc}") from None
    found: list[str] = []
    for family, *_, sockaddr in infos:
        ip = str(sockaddr[0])
        target = f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}"
        if target not in found:
            found.append(target)
    return found


class Replicas:
    """The model server's replicas: the given addresses, each name expanded to every address it resolves to,
    looked up again every `every_s` in a background thread (a call never waits on DNS), as a headless Service's
    name lists its pods. `origin(target)` is the given address a resolved one came from (whose token it uses)."""

    def __init__(
        self,
        addresses: tuple[str, ...],
        resolve: Callable[[str], list[str]] = resolve_address,
        every_s: float = RESOLVE_EVERY_S,
    ) -> None:
        if not addresses:
            raise InvalidArgument("give at least one model server address")
        self.addresses, self._resolve, self.every_s = addresses, resolve, every_s
        self._origin: dict[str, str] = {}
        self.targets: tuple[str, ...] = ()
        self.refresh()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if resolve is not resolve_address or any(_host_name(a) is not None for a in addresses):
            self._thread = threading.Thread(target=self._follow, name="model-server-resolver", daemon=True)
            self._thread.start()

    def refresh(self) -> None:
        """Looks every name up again; a name that fails to resolve keeps its last addresses."""
        targets: list[str] = []
        origin = dict(self._origin)
        for address in self.addresses:
            try:
                found = self._resolve(address)
            except DomainError as exc:
                found = [t for t, o in self._origin.items() if o == address] or [address]
                log.warning("%s", exc)
            for target in found:
                origin[target] = address
                if target not in targets:
                    targets.append(target)
        if tuple(targets) != self.targets:
            if self.targets:
                log.info("model server replicas now %s", ", ".join(targets))
            self._origin, self.targets = origin, tuple(targets)

    def origin(self, target: str) -> str:
        return self._origin.get(target, target)

    def _follow(self) -> None:
        while not self._stop.wait(self.every_s):
            self.refresh()

    def close(self) -> None:
        self._stop.set()


class FailoverClient:
    """One model over replicas of the model server, round robin: each call goes to the next replica, so that
    replicas share the load; one that is UNAVAILABLE (down, refusing connections) hands the call to the next
    within the same call's budget, so a replica's death costs no tick, and it is left out of the rotation for
    `RETRY_DOWN_S` before it is tried again. A replica that joins (a name resolving to one more address) takes
    calls from the next lookup on.

    A replica's client holds one call at a time. One whose call has gone unanswered for `STUCK_CALL_S` (a
    connection that never came up, a request the server lost) is connected again, so one lost request costs
    seconds, not the call's whole gRPC deadline.

    Only UNAVAILABLE fails over: a missing model, a refused input or token would be refused by every replica
    alike. A refused token, though, is what a restarted TorchServe answers (it generates new keys on every
    start): that replica is connected again (at most once a second), which re-reads its token, and asked again.
    Calls come from one thread (a car, or the batcher's sender).
    """

    def __init__(
        self,
        addresses: tuple[str, ...] | Replicas,
        model: ModelRef,
        connect_one: Callable[[str], InferenceClient],
    ):
        self._owns_replicas = not isinstance(addresses, Replicas)
        self.replicas = addresses if isinstance(addresses, Replicas) else Replicas(addresses)
        self.model_ref, self._connect_one = model, connect_one
        self.model, self.version = model.name, model.version
        self._clients: dict[str, InferenceClient] = {}
        self._refreshed: dict[str, float] = {}
        self._down: dict[str, float] = {}  # replica -> when it was found unavailable
        self._stuck: list[InferenceClient] = []  # clients replaced while a call was stuck: closed once it ends
        self._next = 0
        self.calls: dict[str, int] = {}  # answered calls per replica: how the load was shared
        self.first_answer: dict[str, float] = {}  # each replica's first answer, wall clock (when it joined)

    @property
    def addresses(self) -> tuple[str, ...]:
        return self.replicas.targets

    def _client(self, target: str) -> InferenceClient:
        client = self._clients.get(target)
        if client is None:
            client = self._clients[target] = self._connect_one(target)
        return client

    def _refresh(self, target: str) -> bool:
        """Connects the replica again (its token re-read); False when it was done within the last second."""
        now = time.monotonic()
        if now - self._refreshed.get(target, 0.0) < REFRESH_EVERY_S:
            return False
        self._refreshed[target] = now
        try:
            fresh = self._connect_one(target)
        except DomainError as exc:  # e.g. the key file not written yet by a TorchServe starting again
            log.debug("model server %s: cannot connect again yet: %s", target, exc)
            return False
        old, self._clients[target] = self._clients.get(target), fresh
        if old is not None:
            old.close()
        return True

    def _ask(self, target: str, call: Callable[[InferenceClient, float], T], deadline: float) -> T:
        try:
            return call(self._client(target), max(deadline - time.monotonic(), 0.0))
        except (PermissionDenied, Unauthenticated):
            if not self._refresh(target):
                raise
            return call(self._client(target), max(deadline - time.monotonic(), 0.0))
        except Busy:
            if not self._unstick(target):
                raise
            return call(self._client(target), max(deadline - time.monotonic(), 0.0))

    def _unstick(self, target: str) -> bool:
        """Connects the replica again when its client's call is stuck; False when it is only late."""
        self._close_ended()
        old = self._clients.get(target)
        pending_for: Callable[[], float] | None = getattr(old, "pending_for", None)
        if old is None or pending_for is None or (stuck_s := pending_for()) < STUCK_CALL_S:
            return False
        try:
            fresh = self._connect_one(target)
        except DomainError as exc:
            log.debug("model server %s: cannot connect again yet: %s", target, exc)
            return False
        log.warning("model server %s: a call unanswered for %.1f s; connected again", target, stuck_s)
        metrics.STUCK_CALLS.labels(target).inc()
        self._clients[target] = fresh
        self._stuck.append(old)
        return True

    def _close_ended(self) -> None:
        """Closes the replaced clients whose stuck call has ended (closing one earlier would wait for it)."""
        ended = [c for c in self._stuck if getattr(c, "pending_for", lambda: 0.0)() == 0.0]
        for client in ended:
            self._stuck.remove(client)
            client.close()

    def _order(self) -> list[str]:
        """This call's replicas: the rotation from the next one, those found down lately at the end."""
        now = time.monotonic()
        targets = self.replicas.targets
        up = [t for t in targets if now - self._down.get(t, -RETRY_DOWN_S) >= RETRY_DOWN_S]
        down = [t for t in targets if t not in up]
        start, self._next = self._next, self._next + 1
        return [up[(start + k) % len(up)] for k in range(len(up))] + down

    def infer(self, frame: np.ndarray, speed_m_per_s: float, timeout_s: float) -> Decision:
        return self.call(lambda client, left: client.infer(frame, speed_m_per_s, left), timeout_s)

    def infer_batch(
        self, frames: list[np.ndarray], speeds: list[float], timeout_s: float
    ) -> list[Decision | InvalidArgument]:
        def one(client: InferenceClient, left: float) -> list[Decision | InvalidArgument]:
            # getattr, not isinstance on the runtime Protocol: that costs ~50 us a call, every tick of a race.
            batch: Callable[..., list[Decision | InvalidArgument]] | None = getattr(client, "infer_batch", None)
            if batch is None:
                raise InvalidArgument(f"{type(client).__name__} takes no batches")
            return batch(frames, speeds, left)

        return self.call(one, timeout_s)

    def call(self, call: Callable[[InferenceClient, float], T], timeout_s: float) -> T:
        """`call(replica's client, seconds left)` on the next replica, failing over on UNAVAILABLE."""
        deadline = time.monotonic() + timeout_s
        unavailable: DomainError | None = None
        busy: DomainError | None = None  # a replica alive but on its last call: this call is late, not failed
        for step, target in enumerate(self._order()):
            if step and deadline - time.monotonic() <= 0.001:
                # Replicas not asked may be up: out of time, the call is late rather than unavailable.
                raise busy or DeadlineExceeded(f"no time left to ask another model server replica after {unavailable}")
            try:
                answer = self._ask(target, call, deadline)
            except Busy as exc:  # still on its last call: the next replica, if any, is asked instead
                busy = exc
                continue
            except DomainError as exc:
                if exc.code == "UNAVAILABLE":
                    self._mark_down(target, exc)
                    unavailable = exc
                    continue
                if exc.code != "DEADLINE_EXCEEDED":
                    self._mark_up(target)  # it answered, if with an error
                raise
            self._mark_up(target)
            self.calls[target] = self.calls.get(target, 0) + 1
            self.first_answer.setdefault(target, time.time())
            return answer
        if busy is not None:
            raise busy
        assert unavailable is not None  # every replica was asked: each busy or unavailable
        raise unavailable

    def settle(self, timeout_s: float) -> None:
        """Waits until every replica's last call is answered (or `timeout_s` in all)."""
        deadline = time.monotonic() + timeout_s
        for client in list(self._clients.values()):
            settle = getattr(client, "settle", None)
            if settle is not None:
                settle(max(deadline - time.monotonic(), 0.0))

    def _mark_down(self, target: str, exc: DomainError) -> None:
        metrics.MODEL_SERVER_UP.labels(target).set(0)
        if target not in self._down:
            others = [t for t in self.replicas.targets if t != target and t not in self._down]
            metrics.FAILOVERS.labels(target, others[0] if others else "-").inc()
            log.warning("model server %s unavailable: failed over to %s (%s)", target,
                        others[0] if others else "none left", exc)  # fmt: skip
        self._down[target] = time.monotonic()

    def _mark_up(self, target: str) -> None:
        metrics.MODEL_SERVER_UP.labels(target).set(1)
        self._down.pop(target, None)

    def close(self) -> None:
        if self._owns_replicas:
            self.replicas.close()
        for client in [*self._clients.values(), *self._stuck]:
            client.close()


def connect_replicas(
    protocol: str,
    addresses: tuple[str, ...] | Replicas,
    model: ModelRef,
    token_of: Callable[[str], str | None],
    tls: ClientTLS | None = None,
) -> FailoverClient:
    """A client over the model server's replicas (each name re-resolved, see `Replicas`); `token_of(address)`,
    of the address as given, is asked again when a token is refused. With TLS, a replica dialled by the IP its
    name resolved to must show a certificate for that name."""

    def connect_one(target: str) -> InferenceClient:
        origin = client.replicas.origin(target)
        named = _host_name(origin)
        target_tls = tls.for_name(named[0]) if tls is not None and named is not None else tls
        return connect(protocol, target, model, token_of(origin), target_tls)

    client = FailoverClient(addresses, model, connect_one)
    return client
