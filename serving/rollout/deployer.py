"""The deployer's state machine: register (beside the default, no traffic) -> gate -> canary -> promote or roll back.

Each step is written to the deployment record before the next starts, so a deployer killed at any point and
started again redoes the step it was in and goes on: it finishes the rollout or undoes it. The routing always
names a default version that TorchServe has registered, and a version leaves TorchServe only once no routing
names it: the autopilots never stop.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from collector.store import RedisConfig
from game_server.leaderboard import Leaderboard, LeaderboardConfig
from plumbing import telemetry
from plumbing.channels import ClientTLS, channel_credentials
from plumbing.errors import DomainError, FailedPrecondition, Unavailable
from plumbing.lease import Lock
from plumbing.settings import nested, setting
from serving import metrics
from serving.archive import ArchiveConfig
from serving.client import PROTOCOLS, InferenceClient, ModelRef, connect
from serving.endpoints import Endpoints
from serving.registry import ModelVersion, Registry, ReplicaStatus, Routing, add_version, content_id
from serving.rollout.canary import Canary
from serving.rollout.config import CanaryConfig, GateConfig
from serving.rollout.gate import Gate
from serving.rollout.records import (
    DecisionFigures,
    DeploymentRecord,
    RegisterFigures,
    RolloutSettings,
    StepRecord,
    StepResult,
)

log = logging.getLogger(__name__)

STEPS = ("register", "gate", "canary")


@dataclass(frozen=True)
class RolloutConfig:
    """How the deployer rolls a version out: its name, the gate's and canary's thresholds, how long servers take."""

    version: str | None = setting(None, "human version of the candidate (default: the next number)")
    converge_s: float = setting(180.0, "how long the model servers may take to serve a new routing, s")
    game: tuple[str, ...] = setting(
        (), "game servers for the gate laps (none: one started here)", metavar="ADDR[,ADDR]"
    )
    protocol: str = setting("torchserve", "inference protocol of the gate's and the deployer's own cars' calls",
                            choices=PROTOCOLS, flag="inference-protocol")  # fmt: skip
    gate: GateConfig = nested(GateConfig, prefix="gate_")
    canary: CanaryConfig = nested(CanaryConfig, prefix="canary_")
    packaging: ArchiveConfig = nested(ArchiveConfig)
    leaderboard: str = setting(
        "", "Redis URL of a leaderboard: every finished gate and canary lap is verified and submitted ('' = none)"
    )
    # With a CA, the model server (its TLS front) and the game servers are called over TLS.
    tls: ClientTLS = nested(ClientTLS)


class Deployer:
    """One model store's rollouts; every state change is on disk before the next step starts.

    `games` gives the game servers of the gate laps and the deployer's own canary cars when `config.game` names
    none (the caller may start one only when it is first needed)."""

    def __init__(
        self, config: RolloutConfig, endpoints: Endpoints, stop: threading.Event | None = None,
        games: Callable[[], tuple[str, ...]] | None = None,
    ) -> None:  # fmt: skip
        self.config, self.endpoints = config, endpoints
        self.registry = Registry(endpoints.model_store)
        self.stop = stop or threading.Event()
        provider = telemetry.tracer_provider("rrp-deployer")
        self.tracer = provider.get_tracer("rrp.deployer") if provider is not None else None
        self._games = games
        self._game: tuple[str, ...] = config.game
        self._lock: Lock | None = None  # the deploy lock while it is held
        self.tls = config.tls if config.tls.enabled else None
        if self.tls is not None:
            channel_credentials(self.tls)  # a missing or bad file fails here, before any rollout step

    def client(self, name: str, version: str) -> InferenceClient:
        """An inference client of one version, from the one factory (`serving.client.connect`)."""
        return connect(self.config.protocol, self.endpoints.inference, ModelRef(name, version),
                       self.endpoints.inference_key, self.tls)  # fmt: skip

    def games(self) -> tuple[str, ...]:
        if not self._game:
            if self._games is None:
                raise FailedPrecondition("no game server for the gate laps: give --game ADDR")
            self._game = self._games()
        return self._game

    def _span(self, name: str, **attributes: Any) -> contextlib.AbstractContextManager[Any]:
        if self.tracer is None:
            return contextlib.nullcontext()
        return self.tracer.start_as_current_span(name, attributes=attributes)

    # -- entry points -------------------------------------------------------------------------------------------
    def deploy(self, model_dir: Path) -> DeploymentRecord:
        """Finishes an interrupted rollout first, then rolls out `model_dir` (nothing to do if it is the default)."""
        with self.registry.lock() as self._lock:
            unfinished = self.registry.unfinished()
            if unfinished is not None:
                log.warning("deployment %s was interrupted in %s: taking it up", unfinished.id, unfinished.stage)
                record = self._run(unfinished)
                if record.candidate == content_id(model_dir / "model.safetensors"):
                    return record
            candidate = add_version(self.registry, model_dir, self.config.version, self.config.packaging)
            routing = self.registry.routing()
            if routing is not None and routing.default == candidate.version:
                log.info("version %s (%s) is already the default", candidate.version, candidate.id)
                return DeploymentRecord(id="", kind="rollout", candidate=candidate.id, version=candidate.version,
                                        started=time.time(), state="done", stage="done", decision="none",
                                        reason="already the default")  # fmt: skip
            return self._run(self._new_record(candidate, routing))

    def resume(self) -> DeploymentRecord | None:
        with self.registry.lock() as self._lock:
            unfinished = self.registry.unfinished()
            return self._run(unfinished) if unfinished is not None else None

    def rollback_now(self) -> DeploymentRecord:
        """`--rollback`: the previous default becomes the default again, at once."""
        with self.registry.lock() as self._lock:
            unfinished = self.registry.unfinished()
            if unfinished is not None:  # a rollout in flight is undone, not finished
                if not unfinished.decision:
                    unfinished.decision, unfinished.reason = "rollback", "rrp deploy --rollback"
                    self.registry.save_deployment(unfinished)
                self._run(unfinished)
            routing = self.registry.routing()
            if routing is None or not routing.previous:
                raise FailedPrecondition("no previous version to roll back to")
            previous = self.registry.by_version(routing.previous)
            started = time.time()
            written = self.registry.set_routing(
                Routing(previous.name, default=previous.version, previous=routing.default)
            )
            self._converge(lambda st: st.default == previous.version, f"version {previous.version} the default",
                           written.updated)  # fmt: skip
            record = DeploymentRecord(
                id=f"{int(started * 1000)}-rollback", kind="rollback", candidate=previous.id, version=previous.version,
                started=started, name=previous.name, default=routing.default, state="done", stage="done",
                decision="rollback", reason=f"rrp deploy --rollback: {routing.default} -> {previous.version}",
                ended=time.time(),
            )  # fmt: skip
            self.registry.save_deployment(record)
            metrics.DEPLOY_DECISIONS.labels("rollback").inc()
            log.warning("rolled back: version %s is the default again (was %s)", previous.version, routing.default)
            return record

    # -- the rollout --------------------------------------------------------------------------------------------
    def _new_record(self, candidate: ModelVersion, routing: Routing | None) -> DeploymentRecord:
        started = time.time()
        record = DeploymentRecord(
            id=f"{int(started * 1000)}-{candidate.id[:8]}", kind="rollout" if routing is not None else "first",
            candidate=candidate.id, version=candidate.version, started=started, name=candidate.name,
            default=routing.default if routing is not None else "",
            settings=RolloutSettings(self.config.gate, self.config.canary),
        )  # fmt: skip
        self.registry.save_deployment(record)
        return record

    def _run(self, record: DeploymentRecord) -> DeploymentRecord:
        candidate = self.registry.by_id(record.candidate)
        if candidate is None:
            raise FailedPrecondition(f"deployment {record.id}: its version {record.candidate} left the registry")
        with self._span("deploy", **{"rrp.version": candidate.version, "rrp.candidate": candidate.id,
                                     "rrp.deployment": record.id}):  # fmt: skip
            for stage in ("register",) if record.kind == "first" else STEPS:
                if record.decision or stage in record.done_stages():
                    continue
                if self.stop.is_set():
                    raise FailedPrecondition("stopped: the rollout resumes when the deployer starts again")
                if self._lock is not None and self._lock.lost.is_set():
                    raise FailedPrecondition("the deploy lock went to another deployer: this one stops here")
                result = self._timed(stage, record, functools.partial(self._step, stage, record, candidate))
                if not result.ok:
                    record.decision, record.reason = "rollback", result.reason
                    self.registry.save_deployment(record)
            if not record.decision:
                record.decision = "promote"
                record.reason = "first version" if record.kind == "first" else "gate and canary held up"
                self.registry.save_deployment(record)
            final = "promote" if record.decision == "promote" else "rollback"
            self._timed(
                final, record, lambda: self._promote(candidate) if final == "promote" else self._undo(candidate)
            )
            record.state, record.stage, record.ended = "done", "done", time.time()
            self.registry.save_deployment(record)
        metrics.DEPLOY_DECISIONS.labels(final).inc()
        metrics.set_stage("idle")
        log.info("deployment %s: %s version %s (%s)", record.id, final, candidate.version, record.reason)
        return record

    def _timed(self, stage: str, record: DeploymentRecord, work: Callable[[], StepResult]) -> StepResult:
        """Runs one step, recorded on disk as started before it runs and with its result once it ends."""
        record.stage = stage
        entry = StepRecord(stage, started=time.time())
        record.steps = [s for s in record.steps if s.stage != stage] + [entry]
        self.registry.save_deployment(record)
        metrics.set_stage(stage)
        t0 = time.monotonic()
        with self._span(f"deploy.{stage}"):
            result = work()
        entry.ended, entry.seconds = time.time(), round(time.monotonic() - t0, 2)
        entry.ok, entry.figures, entry.reason = result.ok, result.figures, result.reason
        self.registry.save_deployment(record)
        metrics.DEPLOY_SECONDS.labels(stage).observe(time.monotonic() - t0)
        return result

    def _step(self, stage: str, record: DeploymentRecord, candidate: ModelVersion) -> StepResult:
        if stage == "register":
            return self._register(candidate)
        if stage == "gate":
            default = self.registry.by_version(record.default)
            self._ensure_registered(default)
            board = None
            if self.config.leaderboard:
                board = Leaderboard.connect(LeaderboardConfig(RedisConfig(url=self.config.leaderboard)))
            gate = Gate(self.config.gate, self.registry, lambda v: self.client(v.name, v.version),
                        lambda: self.games()[0], self._span, board, game_tls=self.tls)  # fmt: skip
            return gate.run(candidate, default)
        return Canary(
            self.config.canary,
            self.registry,
            self.client,
            self.games,
            self.stop,
            self.config.leaderboard,
            game_tls=self.tls,
        ).run(candidate)

    def _converge(self, done: Callable[[ReplicaStatus], bool], what: str, since: float, version: str = "") -> None:
        """Waits until every model server following the registry has reported `done` since the routing changed."""
        deadline = time.monotonic() + self.config.converge_s
        while True:
            statuses = self.registry.replicas()
            for st in statuses:
                if version and version in st.errors:
                    raise FailedPrecondition(f"version {version} does not load on {st.replica}: {st.errors[version]}")
            fresh = [st for st in statuses if st.updated >= since]
            if statuses and len(fresh) == len(statuses) and all(done(st) for st in fresh):
                return
            if time.monotonic() > deadline or self.stop.is_set():
                if not statuses:
                    raise Unavailable(f"no model server follows {self.registry.root}: start rrp serve with this "
                                      "model store")  # fmt: skip
                seen = [(st.replica, st.registered, st.default) for st in statuses]
                raise Unavailable(f"model servers did not make {what} within {self.config.converge_s:.0f} s: {seen}")
            time.sleep(0.2)

    def _ensure_registered(self, version: ModelVersion) -> None:
        """Staged: every model server registers the version, with no traffic."""
        routing = self.registry.routing()
        since = time.time()
        if routing is None:  # an empty store: the first version is the default from the start
            since = self.registry.set_routing(Routing(version.name, default=version.version)).updated
        elif version.version not in routing.desired():
            since = self.registry.set_routing(replace(routing, staged=(*routing.staged, version.version))).updated
        self._converge(lambda st: version.version in st.registered, f"version {version.version} registered",
                       since, version.version)  # fmt: skip

    def _register(self, candidate: ModelVersion) -> StepResult:
        t0 = time.monotonic()
        try:
            self._ensure_registered(candidate)
        except DomainError as exc:
            return StepResult(False, f"the candidate does not load: {exc}", RegisterFigures())
        return StepResult(True, "registered with no traffic", RegisterFigures(round(time.monotonic() - t0, 2)))

    # -- decisions ----------------------------------------------------------------------------------------------
    def _promote(self, candidate: ModelVersion) -> StepResult:
        routing = self.registry.routing()
        old = routing.default if routing is not None else ""
        if routing is not None and routing.default == candidate.version:
            old = routing.previous  # promoted already; the deployer died before the record said so
        # Kept registered: the new default and the previous one (for --rollback); the servers drop older ones.
        written = self.registry.set_routing(Routing(candidate.name, default=candidate.version, previous=old))
        self._converge(lambda st: st.default == candidate.version, f"version {candidate.version} the default",
                       written.updated, candidate.version)  # fmt: skip
        return StepResult(True, f"version {candidate.version} is the default", DecisionFigures(candidate.version, old))

    def _undo(self, candidate: ModelVersion) -> StepResult:
        routing = self.registry.routing()
        if routing is None:
            return StepResult(True, "no routing", DecisionFigures())
        v = candidate.version
        if routing.canary == v:
            routing = self.registry.set_routing(replace(routing, canary="", canary_share=0.0))
            self.stop.wait(self.config.canary.drain_s)  # laps on the candidate move to the default (the Router polls)
        if v in routing.staged:
            routing = self.registry.set_routing(replace(routing, staged=tuple(x for x in routing.staged if x != v)))
        kept = DecisionFigures(routing.default, routing.previous)
        if v in routing.desired():
            return StepResult(True, "kept: the candidate is the default or the previous version", kept)
        self._converge(lambda st: v not in st.registered, f"version {v} unregistered", routing.updated)
        return StepResult(True, f"version {v} unregistered", replace(kept, unregistered=v))
