"""Each model server follows the registry: the versions it must serve are written down, and it converges to them.

The deployer never calls a model server's management API: it writes the desired state (the routing: default,
previous, canary and staged versions) beside the model store, and every `rrp serve` registers what is missing,
sets its default and unregisters what is no longer named, then reports what it has. So any number of replicas
serve the same versions, management stays on each server's loopback, and a replica that restarts (TorchServe
starts empty) comes back with the right versions by itself.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

from plumbing.errors import DomainError
from serving.archive import archive_info
from serving.registry import Registry, ReplicaStatus
from serving.torchserve import ModelServerAdmin, wait_model

log = logging.getLogger(__name__)


class Reconciler:
    """Makes one TorchServe serve what the registry's routing names; reports the result as the replica's status."""

    def __init__(
        self, registry: Registry, admin: ModelServerAdmin, inference: str, inference_key: str | None,
        replica: str | None = None,
    ) -> None:  # fmt: skip
        self.registry, self.admin = registry, admin
        self.inference, self.inference_key = inference, inference_key
        self.replica = replica or f"{socket.gethostname()}-{inference.rsplit(':', 1)[-1]}"
        self.errors: dict[str, str] = {}  # version -> why it does not load (not retried until its archive changes)

    def once(self) -> ReplicaStatus:
        """One pass: register, set the default, unregister; returns (and saves) this replica's status."""
        routing = self.registry.routing()
        if routing is None:
            status = ReplicaStatus(self.replica, self.inference, errors=dict(self.errors), updated=time.time())
            self.registry.save_replica(status)
            return status
        want = routing.desired()
        have = self.admin.versions(routing.name)
        for number in want:
            if number in have or number in self.errors:
                continue
            try:
                version = self.registry.by_version(number)
                archive = self.registry.model_store / version.archive
                log.info("registering %s version %s (%s)", version.name, number, archive.name)
                self.admin.register(archive)
                info = archive_info(archive)
                wait_model(self.inference, self.inference_key or "", version.name, number, info["input"]["width"],
                           info["input"]["height"])  # fmt: skip
                have[number] = False
            except DomainError as exc:
                log.error("version %s does not load: %s", number, exc)
                self.errors[number] = str(exc)
        if routing.default in have and not have[routing.default]:
            self.admin.set_default(routing.name, routing.default)
            have = {v: v == routing.default for v in have}
            log.info("default version of %s: %s", routing.name, routing.default)
        for number in [v for v in have if v not in want and not have[v]]:
            try:
                self.admin.unregister(routing.name, number)
                log.info("unregistered %s version %s", routing.name, number)
                del have[number]
            except DomainError as exc:
                log.warning("unregistering version %s: %s", number, exc)
        self.errors = {v: e for v, e in self.errors.items() if v in want}
        status = ReplicaStatus(self.replica, self.inference, registered=sorted(have),
                               default=next((v for v, d in have.items() if d), ""), errors=dict(self.errors),
                               updated=time.time())  # fmt: skip
        self.registry.save_replica(status)
        return status

    def run(self, stop: threading.Event, every_s: float = 1.0) -> None:
        """Reconciles every `every_s` until `stop`; a failed pass is logged and tried again."""
        while not stop.wait(every_s):
            try:
                self.once()
            except DomainError as exc:
                log.warning("reconciling the model server with the registry: %s", exc)
