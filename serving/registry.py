"""Model versions and the traffic split between them, kept as files beside TorchServe's model store.

A version is a content hash (of the weights) with a human version number, its archive, its model card, a
reference to its training data and its evaluation. `routing.json` names the default version, the one in
canary and the share of cars that drive it: the autopilots read it before each lap (TorchServe has no traffic
split), the deployer writes it. Every write is atomic (a temporary file renamed over the old one), so a reader
never sees half a file and a killed deployer never leaves one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from plumbing.errors import FailedPrecondition, InvalidArgument, NotFound, quote
from plumbing.lease import FileLock, Lock, lock_for
from serving.archive import ArchiveConfig, archive_info, build_archive
from serving.rollout.records import DeploymentRecord, GateOutcome, LiveOutcome, dump_record, load_record

LEASE_ENV = "RRP_DEPLOY_LEASE"  # the Lease that one deployer at a time holds in a cluster (the chart sets it)

REGISTRY_DIR = "registry"
ROUTING_FILE = "routing.json"


def write_json(path: Path, data: Any) -> None:
    """Atomically: readers see the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFound(f"{path} not found") from None
    except ValueError as exc:
        raise FailedPrecondition(f"{path}: not JSON ({exc})") from None


def content_id(weights: Path) -> str:
    """The version's identity: the same weights are the same version, whatever it is called."""
    return hashlib.sha256(weights.read_bytes()).hexdigest()[:16]


@dataclass
class ModelVersion:
    """One trained model as the registry knows it."""

    id: str  # content hash of the weights
    version: str  # human version number: 1, 2, ...
    name: str  # model name on the model server
    archive: str  # file name in the model store
    source: str  # the trained model's directory
    created: float
    # The model card's essentials and where its training data came from: free-form JSON written by training.
    card: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)  # offline evaluation, when the model dir has one
    gate: GateOutcome | None = None  # the last gate's figures
    live: LiveOutcome | None = None  # the last canary's figures


@dataclass(frozen=True)
class Routing:
    """Which version each car drives: the default, and a candidate on a share of the cars."""

    name: str
    default: str
    previous: str = ""  # the default before the last promotion: where --rollback goes
    canary: str = ""
    canary_share: float = 0.0
    staged: tuple[str, ...] = ()  # registered on every model server, with no traffic (a candidate being gated)
    updated: float = 0.0

    def desired(self) -> list[str]:
        """The versions every model server must have registered: the routed ones and the staged ones."""
        return [v for v in dict.fromkeys((self.default, self.previous, self.canary, *self.staged)) if v]

    def cars_on_canary(self, cars: int) -> int:
        """At least one car, and (with two or more) never all: car 0 keeps the default as the live baseline."""
        if not self.canary or self.canary_share <= 0:
            return 0
        if cars == 1:
            return 1
        return min(cars - 1, max(1, round(self.canary_share * cars)))

    def version_for(self, car: int, cars: int) -> str:
        """The last `cars_on_canary` cars drive the candidate."""
        return self.canary if car >= cars - self.cars_on_canary(cars) else self.default

    def routed(self) -> set[str]:
        """The versions a lap may go on driving: the model server keeps each of them registered."""
        return {v for v in (self.default, self.canary, self.previous) if v}


@dataclass(frozen=True)
class ReplicaStatus:
    """What one model server has registered, as its `rrp serve` reports after each reconciliation."""

    replica: str
    inference: str = ""  # its gRPC inference address
    registered: list[str] = field(default_factory=list)  # versions registered on it
    default: str = ""  # its default version
    errors: dict[str, str] = field(default_factory=dict)  # version -> why it does not load
    updated: float = 0.0  # time.time() of the report


class Router:
    """An autopilot's view of `routing.json`: re-read when the file changes, at most every `every_s`."""

    def __init__(self, path: Path, every_s: float = 0.2) -> None:
        self.path, self.every_s = path, every_s
        self._routing: Routing | None = None
        self._checked = 0.0
        self._stamp: tuple[int, int] | None = None

    def current(self) -> Routing:
        now = time.monotonic()
        if self._routing is not None and now - self._checked < self.every_s:
            return self._routing
        self._checked = now
        try:
            st = self.path.stat()
        except FileNotFoundError:
            if self._routing is None:
                raise NotFound(f"routing file {self.path} not found: start rrp serve, or deploy a model") from None
            return self._routing  # keep driving on what was last read
        stamp = (st.st_mtime_ns, st.st_ino)
        if stamp != self._stamp or self._routing is None:
            with contextlib.suppress(FailedPrecondition, NotFound, TypeError):
                self._routing = load_record(Routing, read_json(self.path))
                self._stamp = stamp
            if self._routing is None:
                raise FailedPrecondition(f"routing file {self.path} is not a routing")
        return self._routing


class Registry:
    """The versions, the routing and the deployment records under `<model store>/registry/`."""

    def __init__(self, model_store: Path) -> None:
        self.model_store = model_store
        self.root = model_store / REGISTRY_DIR

    @property
    def routing_path(self) -> Path:
        return self.root / ROUTING_FILE

    # -- versions ---------------------------------------------------------------------------------------------
    def versions(self) -> list[ModelVersion]:
        found = [load_record(ModelVersion, read_json(p)) for p in (self.root / "versions").glob("*.json")]
        return sorted(found, key=lambda v: (v.created, v.id))

    def find(self, key: str) -> ModelVersion:
        """A version by content id (or a prefix of one) or by human version."""
        matches = [v for v in self.versions() if v.version == key or v.id.startswith(key)]
        if not key or not matches:
            raise NotFound(f"no model version {quote(key)} in {self.root}")
        if len(matches) > 1:
            raise InvalidArgument(f"{quote(key)} names {len(matches)} versions: give more of the id")
        return matches[0]

    def by_id(self, version_id: str) -> ModelVersion | None:
        path = self.root / "versions" / f"{version_id}.json"
        return load_record(ModelVersion, read_json(path)) if path.is_file() else None

    def by_version(self, version: str) -> ModelVersion:
        for v in self.versions():
            if v.version == version:
                return v
        raise NotFound(f"no model version {quote(version)} in {self.root}")

    def next_version(self) -> str:
        numbers = [int(v.version) for v in self.versions() if v.version.isdigit()]
        return str(max(numbers, default=0) + 1)

    def save(self, version: ModelVersion) -> None:
        write_json(self.root / "versions" / f"{version.id}.json", dump_record(version))

    def update(self, version_id: str, **changes: Any) -> ModelVersion:
        current = self.by_id(version_id)
        if current is None:
            raise NotFound(f"no model version {version_id} in {self.root}")
        updated = replace(current, **changes)
        self.save(updated)
        return updated

    # -- routing ----------------------------------------------------------------------------------------------
    def routing(self) -> Routing | None:
        if not self.routing_path.is_file():
            return None
        return load_record(Routing, read_json(self.routing_path))

    def set_routing(self, routing: Routing) -> Routing:
        if not routing.default:
            raise FailedPrecondition("a routing without a default version")  # never written
        routing = replace(routing, updated=time.time())
        write_json(self.routing_path, dump_record(routing))
        return routing

    # -- model servers ----------------------------------------------------------------------------------------
    def save_replica(self, status: ReplicaStatus) -> None:
        """What one model server has registered, written by its `rrp serve` after each reconciliation."""
        write_json(self.root / "replicas" / f"{status.replica}.json", dump_record(status))

    def replicas(self, fresh_s: float = 15.0) -> list[ReplicaStatus]:
        """The model servers that reported within `fresh_s`: the ones a rollout waits for."""
        now, found = time.time(), []
        for path in (self.root / "replicas").glob("*.json"):
            with contextlib.suppress(NotFound, FailedPrecondition):
                status = load_record(ReplicaStatus, read_json(path))
                if now - status.updated <= fresh_s:
                    found.append(status)
        return found

    # -- deployments ------------------------------------------------------------------------------------------
    def deployments(self) -> list[DeploymentRecord]:
        records = [load_record(DeploymentRecord, read_json(p)) for p in (self.root / "deployments").glob("*.json")]
        return sorted(records, key=lambda r: r.started)

    def unfinished(self) -> DeploymentRecord | None:
        open_ = [r for r in self.deployments() if r.state != "done"]
        return open_[-1] if open_ else None

    def save_deployment(self, record: DeploymentRecord) -> None:
        write_json(self.root / "deployments" / f"{record.id}.json", dump_record(record))

    @contextlib.contextmanager
    def lock(self) -> Iterator[Lock]:
        """One deployer at a time, across nodes: the Kubernetes Lease named by RRP_DEPLOY_LEASE when this runs
        in a cluster pod, flock on `deploy.lock` otherwise. A killed holder's flock is dropped by the kernel, its
        Lease expires; the lock's `lost` is set if another holder took the Lease, and the work must stop."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "deploy.lock"
        name = os.environ.get(LEASE_ENV, "")
        lock = lock_for(name, path) if name else FileLock(path)
        try:
            lock.acquire()
        except FailedPrecondition as exc:
            raise FailedPrecondition(f"another deployer holds the deploy lock: {exc}") from None
        try:
            yield lock
        finally:
            lock.release()


# -- new versions ----------------------------------------------------------------------------------------------


def _card_parts(card: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """What a version keeps of its model card: the essentials, and where its training data came from."""
    data = card.get("data", {}) if isinstance(card.get("data"), dict) else {}
    kept = ("model", "date", "seed", "input", "output", "metrics", "training")
    essentials = {k: card[k] for k in kept if k in card}
    source = {
        k: data[k] for k in ("source", "train_frames", "val_frames", "split_by", "frames", "episodes") if k in data
    }
    return essentials, source


def add_version(registry: Registry, model_dir: Path, version: str | None, packaging: ArchiveConfig) -> ModelVersion:
    """The model directory as a registry version (the existing one when the same weights are there already)."""
    weights = model_dir / "model.safetensors"
    if not weights.is_file():
        raise NotFound(f"{model_dir}: no model.safetensors (train one: rrp train)")
    vid = content_id(weights)
    known = registry.by_id(vid)
    if known is not None:
        if not (registry.model_store / known.archive).is_file():
            build_archive(model_dir, known.version, registry.model_store, replace(packaging, name=known.name))
        return known
    number = version or registry.next_version()
    with contextlib.suppress(NotFound):
        other = registry.by_version(number)
        raise FailedPrecondition(f"version {number} is already {other.id} in {registry.root}: give another --version")
    archive = build_archive(model_dir, number, registry.model_store, packaging)
    card: dict[str, Any] = {}
    with contextlib.suppress(NotFound, FailedPrecondition):
        card = read_json(model_dir / "model_card.json")
    evaluation: dict[str, Any] = {}
    for name in ("evaluation.json", "evaluate.json"):
        if (model_dir / name).is_file():
            with contextlib.suppress(NotFound, FailedPrecondition):
                evaluation = read_json(model_dir / name)
    essentials, source = _card_parts(card)
    entry = ModelVersion(
        id=vid, version=number, name=packaging.name, archive=archive.name, source=str(model_dir.resolve()),
        created=time.time(), card=essentials, data=source, evaluation=evaluation,
    )  # fmt: skip
    registry.save(entry)
    return entry


def add_archive(registry: Registry, archive: Path) -> ModelVersion:
    """An archive built by `rrp package` as a registry version (its id: the hash of the weights inside)."""
    import shutil
    import zipfile

    info = archive_info(archive)
    try:
        with zipfile.ZipFile(archive) as z:
            weights = z.read("model.safetensors")
            card = json.loads(z.read("model_card.json")) if "model_card.json" in z.namelist() else {}
    except (KeyError, ValueError, OSError, zipfile.BadZipFile) as exc:
        raise InvalidArgument(f"{archive}: no model.safetensors inside ({exc})") from None
    vid = hashlib.sha256(weights).hexdigest()[:16]
    known = registry.by_id(vid)
    if known is not None:
        return known
    with contextlib.suppress(NotFound):
        other = registry.by_version(info["version"])
        raise FailedPrecondition(f"version {info['version']} is already {other.id} in {registry.root}")
    target = registry.model_store / archive.name
    if archive.resolve() != target.resolve():
        registry.model_store.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(archive, target)
    essentials, source = _card_parts(card)
    entry = ModelVersion(
        id=vid, version=info["version"], name=info["name"], archive=archive.name, source=str(archive.resolve()),
        created=time.time(), card=essentials, data=source,
    )  # fmt: skip
    registry.save(entry)
    return entry
