"""`rrp deploy` and `rrp models`: a model version's rollout with no person in the loop.

register (beside the default, no traffic) -> gate (loads, answers in budget, laps held-out tracks in lockstep at
least as well as the default) -> canary (a share of the autopilots' cars drive it) -> promote or roll back.
Each step is written to the deployment record before the next starts, so a deployer killed at any point and
started again redoes the step it was in and goes on: it finishes the rollout or undoes it. The routing always
names a default version that TorchServe has registered, and a version leaves TorchServe only once no routing
names it: the autopilots never stop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from game_server.core.state import TICK_S
from game_server.core.tracks import TRAINING_TRACKS, UNSEEN_TRACKS
from plumbing import telemetry
from plumbing.errors import DomainError, FailedPrecondition, InvalidArgument, NotFound, Unavailable, quote
from plumbing.metrics import start_metrics
from plumbing.procs import stop_on_signals
from plumbing.settings import nested, setting
from serving import metrics
from serving.archive import ArchiveConfig, archive_info, build_archive
from serving.registry import ModelVersion, Registry, Router, Routing, content_id, read_json, write_json

log = logging.getLogger(__name__)

ENDPOINTS_FILE = "endpoints.json"  # written by `rrp serve` into its working directory


@dataclass(frozen=True)
class GateConfig:
    """What a candidate must show before any car drives it: thresholds against the default on held-out tracks."""

    tracks: tuple[str, ...] = setting(UNSEEN_TRACKS[:2], "held-out tracks lapped in lockstep (never trained on)")
    max_ticks: int = setting(3000, "tick budget of a gate lap")
    max_p99_ms: float = setting(
        25.0,
        "the candidate's inference p99 must stay under this, ms, or (on a loaded machine) within "
        "--gate-latency-ratio of the default's measured alongside it",
    )
    latency_ratio: float = setting(1.25, "the candidate's p99 allowed, as a multiple of the default's")
    latency_samples: int = setting(200, "inferences per version in the latency probe, interleaved")
    rate_hz: float = setting(
        50.0,
        "gate laps and the latency probe ask the model server at most this often a second, so that the "
        "live cars sharing it keep their real time (0: no limit)",
    )
    lap_time_ratio: float = setting(1.02, "a finished lap may take at most this times the default's")
    progress_tolerance: float = setting(0.02, "on a lap the default does not finish either, the share of it the "
                                        "candidate may fall short of the default's progress")  # fmt: skip
    wall_ratio: float = setting(1.5, "wall-contact ticks allowed, as a multiple of the default's ...")
    wall_allowance: int = setting(25, "... plus this many ticks")

    def __post_init__(self) -> None:
        if not self.tracks:
            raise InvalidArgument("the gate needs at least one held-out track")
        trained = sorted(set(self.tracks) & set(TRAINING_TRACKS))
        if trained:
            raise InvalidArgument(f"gate tracks {', '.join(trained)} are training tracks: the gate needs held-out ones")


@dataclass(frozen=True)
class CanaryConfig:
    """The live trial: a share of the cars drive the candidate until enough of its laps are in."""

    share: float = setting(0.5, "share of the autopilots' cars that drive the candidate (at least one car)")
    laps: int = setting(2, "candidate laps to wait for before deciding")
    max_s: float = setting(300.0, "decide after this long even with fewer laps (none: roll back)")
    live: tuple[str, ...] = setting(
        (), "metrics URLs of the autopilots (http://HOST:PORT/metrics), read for live figures", metavar="URL[,URL]"
    )
    prometheus: str = setting("", "a Prometheus (http://HOST:PORT) to read the autopilots' figures from instead")
    cars: int = setting(0, "cars the deployer races itself on the routing during the canary (0: the autopilots')")
    track: str = setting("kidney", "track of the deployer's own canary cars")
    max_ticks: int = setting(3000, "tick budget of a lap of the deployer's own canary cars")
    completion_tolerance: float = setting(0.25, "candidate laps finished may fall this far below the default's share")
    lap_time_ratio: float = setting(1.05, "mean finished lap time allowed, as a multiple of the default's")
    max_fallback_rate: float = setting(0.10, "ticks on the fallback command, as a share of the candidate's ticks")
    max_missed_rate: float = setting(0.002, "missed ticks, as a share of the candidate's ticks")
    max_error_rate: float = setting(0.01, "failed inferences, as a share of the candidate's ticks")
    drain_s: float = setting(1.0, "after a rollback, how long the candidate stays registered for laps to move off it")

    def __post_init__(self) -> None:
        if not 0.0 < self.share <= 1.0:
            raise InvalidArgument("the canary share must be in (0, 1]")
        if self.laps < 1 or self.max_s <= 0:
            raise InvalidArgument("the canary needs at least one lap and a positive time limit")


@dataclass(frozen=True)
class DeployConfig:
    """`rrp deploy`: where the model server is, what to deploy, and the gate's and canary's thresholds."""

    model: Path | None = setting(None, "trained model directory to deploy (model.safetensors + card)")
    rollback: bool = setting(False, "return to the previous default version at once, and stop")
    watch: Path | None = setting(None, "keep running: deploy each new model.safetensors that appears under DIR")
    watch_every_s: float = setting(10.0, "how often --watch looks, s", flag="watch-every")
    version: str | None = setting(None, "human version of the candidate (default: the next number)")
    serve_dir: Path = setting(Path("out/serve"), "rrp serve's working directory (its endpoints, key file, store)")
    model_store: Path | None = setting(None, "TorchServe's model store (default: the serve dir's)")
    model_server: str = setting("", "TorchServe's gRPC inference address (default: from the serve dir)", metavar="ADDR")
    converge_s: float = setting(180.0, "how long the model servers may take to serve a new routing, s")
    token_file: Path | None = setting(
        None,
        "TorchServe's inference token: its key_file.json or a file with the token (default: the serve dir's, if any)",
    )
    game: tuple[str, ...] = setting(
        (), "game servers for the gate laps (none: one started here)", metavar="ADDR[,ADDR]"
    )
    metrics_port: int = setting(0, "port of the Prometheus metrics endpoint (/metrics); 0: none")
    metrics_host: str = setting("127.0.0.1", "address the metrics endpoint binds; 0.0.0.0 in a pod")
    gate: GateConfig = nested(GateConfig, prefix="gate_")
    canary: CanaryConfig = nested(CanaryConfig, prefix="canary_")
    packaging: ArchiveConfig = nested(ArchiveConfig)


@dataclass(frozen=True)
class ModelsConfig:
    """`rrp models`: the versions in a model store."""

    serve_dir: Path = setting(Path("out/serve"), "rrp serve's working directory")
    model_store: Path | None = setting(None, "TorchServe's model store (default: the serve dir's)")
    json: bool = setting(False, "print JSON instead of a table")


# -- the model server, as the deployer reaches it ----------------------------------------------------------------


@dataclass(frozen=True)
class Endpoints:
    """What the deployer reaches: the shared model store (the registry), and TorchServe's inference API for the gate.

    No management address: model servers follow the registry themselves (`serving.reconcile`)."""

    model_store: Path
    inference: str
    inference_key: str | None

    @classmethod
    def resolve(cls, serve_dir: Path, model_store: Path | None, inference: str, token_file: Path | None) -> Endpoints:
        from serving.client import read_token
        from serving.torchserve import KEY_FILE

        written: dict[str, Any] = {}
        if (serve_dir / ENDPOINTS_FILE).is_file():
            written = read_json(serve_dir / ENDPOINTS_FILE)
        store = model_store or Path(written.get("model_store", serve_dir / "model-store"))
        inference = inference or written.get("inference", "")
        if not inference:
            raise FailedPrecondition(
                f"no model server: start one (rrp serve --workdir {serve_dir}), or give --model-server ADDR"
            )
        if token_file is None and (serve_dir / KEY_FILE).is_file():
            token_file = serve_dir / KEY_FILE
        return cls(store, inference, read_token(token_file))


def write_endpoints(serve_dir: Path, server: Any) -> None:
    """What `rrp deploy` and `rrp autopilot` need to find the `rrp serve` of this directory (no keys)."""
    write_json(
        serve_dir / ENDPOINTS_FILE,
        {
            "inference": server.inference_address,
            "management": server.management_address,
            "metrics": server.metrics_url,
            "model_store": str(server.model_store),
            "routing": str(Registry(server.model_store).routing_path),
        },
    )


def _card_parts(card: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What a version keeps of its model card: the essentials, and where its training data came from."""
    data = card.get("data", {}) if isinstance(card.get("data"), dict) else {}
    return {
        "card": {k: card[k] for k in ("model", "date", "seed", "input", "output", "metrics", "training") if k in card},
        "data": {
            k: data[k] for k in ("source", "train_frames", "val_frames", "split_by", "frames", "episodes") if k in data
        },
    }


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
    entry = ModelVersion(
        id=vid,
        version=number,
        name=packaging.name,
        archive=archive.name,
        source=str(model_dir.resolve()),
        created=time.time(),
        **_card_parts(card),
        evaluation=evaluation,
    )
    registry.save(entry)
    return entry


def add_archive(registry: Registry, archive: Path) -> ModelVersion:
    """An archive built by `rrp package` as a registry version (its id: the hash of the weights inside)."""
    import hashlib
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
    entry = ModelVersion(
        id=vid, version=info["version"], name=info["name"], archive=archive.name, source=str(archive.resolve()),
        created=time.time(), **_card_parts(card),
    )  # fmt: skip
    registry.save(entry)
    return entry


# -- live figures: the autopilots' counters, per version ---------------------------------------------------------

_COUNTERS = ("laps", "wall_contacts", "fallbacks", "missed_ticks", "ticks", "inference_errors")


def _empty() -> dict[str, float]:
    return {"laps": 0.0, "finished": 0.0, "lap_s_sum": 0.0, **{c: 0.0 for c in _COUNTERS if c != "laps"}}


def _add(out: dict[str, dict[str, float]], name: str, labels: dict[str, str], value: float) -> None:
    version = labels.get("version", "")
    if not name.startswith("rrp_autopilot_") or not version:
        return
    figures = out.setdefault(version, _empty())
    stem = name.removeprefix("rrp_autopilot_")
    if stem == "laps_total":
        figures["laps"] += value
        if labels.get("finished") == "true":
            figures["finished"] += value
    elif stem == "lap_seconds_sum":
        figures["lap_s_sum"] += value
    elif stem.endswith("_total") and stem.removesuffix("_total") in _COUNTERS:
        figures[stem.removesuffix("_total")] += value


def parse_exposition(text: str, out: dict[str, dict[str, float]] | None = None) -> dict[str, dict[str, float]]:
    """Prometheus text exposition -> per-version autopilot counters (summed over every source)."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {} if out is None else out
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            _add(out, sample.name, dict(sample.labels), float(sample.value))
    return out


class LiveFigures:
    """Snapshots of the autopilots' per-version counters: scraped, from a Prometheus, or this process's own."""

    def __init__(self, urls: tuple[str, ...], prometheus: str, own: bool) -> None:
        self.urls, self.prometheus, self.own = urls, prometheus.rstrip("/"), own

    def snapshot(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        if self.own:
            from prometheus_client import REGISTRY, generate_latest

            parse_exposition(generate_latest(REGISTRY).decode(), out)
        for url in self.urls:
            try:
                with urllib.request.urlopen(url, timeout=5.0) as r:
                    parse_exposition(r.read().decode(), out)
            except OSError as exc:
                log.warning("live figures: %s unreachable: %s", url, exc)
        if self.prometheus:
            query = (
                'sum by (__name__, version, finished) ({__name__=~"rrp_autopilot_(laps|wall_contacts|fallbacks|'
                'missed_ticks|ticks|inference_errors)_total|rrp_autopilot_lap_seconds_sum"})'
            )
            url = f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": query})
            try:
                with urllib.request.urlopen(url, timeout=5.0) as r:
                    body = json.loads(r.read())
                for item in body.get("data", {}).get("result", []):
                    labels = dict(item["metric"])
                    _add(out, labels.pop("__name__", ""), labels, float(item["value"][1]))
            except (OSError, ValueError, KeyError) as exc:
                log.warning("live figures: Prometheus %s: %s", self.prometheus, exc)
        return out


def window(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]], version: str) -> dict[str, float]:
    """One version's counters between two snapshots, with the rates the canary judges."""
    a, b = after.get(version, _empty()), before.get(version, _empty())
    d = {k: max(0.0, a[k] - b.get(k, 0.0)) for k in a}
    ticks = d["ticks"] or 1.0
    d["completion"] = d["finished"] / d["laps"] if d["laps"] else 0.0
    d["mean_lap_s"] = d["lap_s_sum"] / d["finished"] if d["finished"] else 0.0
    d["fallback_rate"] = d["fallbacks"] / ticks
    d["missed_rate"] = d["missed_ticks"] / ticks
    d["error_rate"] = d["inference_errors"] / ticks
    return {k: round(v, 4) for k, v in d.items()}


def judge_canary(candidate: dict[str, float], default: dict[str, float], c: CanaryConfig) -> list[str]:
    """Why the canary failed; [] when it held up."""
    failures = []
    if candidate["laps"] < 1:
        return ["no candidate lap was driven during the canary"]
    if default["laps"] >= 1 and candidate["completion"] < default["completion"] - c.completion_tolerance:
        failures.append(f"completion {candidate['completion']:.2f} vs the default's {default['completion']:.2f}")
    if (
        candidate["finished"]
        and default["finished"]
        and candidate["mean_lap_s"] > default["mean_lap_s"] * c.lap_time_ratio
    ):
        failures.append(f"mean lap {candidate['mean_lap_s']:.2f} s vs the default's {default['mean_lap_s']:.2f} s")
    for rate, limit in (("fallback_rate", c.max_fallback_rate), ("missed_rate", c.max_missed_rate),
                        ("error_rate", c.max_error_rate)):  # fmt: skip
        if candidate[rate] > limit:
            failures.append(f"{rate.replace('_', ' ')} {candidate[rate]:.4f} over {limit}")
    return failures


# -- the gate ------------------------------------------------------------------------------------------------------


def judge_lap(cand: dict[str, Any], base: dict[str, Any], g: GateConfig) -> list[str]:
    """Why a candidate's gate lap is worse than the default's on the same track; [] when it is not."""
    track, failures = cand["track"], []
    if base["finished"] and not cand["finished"]:
        failures.append(f"{track}: did not finish ({cand['progress']:.0%}, {cand['stop_reason']}); the default did")
    elif base["finished"] and cand["lap_ticks"] > base["lap_ticks"] * g.lap_time_ratio:
        failures.append(f"{track}: lap {cand['lap_s']:.2f} s vs the default's {base['lap_s']:.2f} s")
    elif not base["finished"] and not cand["finished"] and cand["progress"] < base["progress"] - g.progress_tolerance:
        failures.append(f"{track}: reached {cand['progress']:.0%} of the lap vs the default's {base['progress']:.0%}")
    if cand["wall_contacts"] > base["wall_contacts"] * g.wall_ratio + g.wall_allowance:
        failures.append(f"{track}: {cand['wall_contacts']} wall-contact ticks vs the default's {base['wall_contacts']}")
    return failures


# -- the deployer --------------------------------------------------------------------------------------------------

STEPS = ("register", "gate", "canary")
WARMUP_INFERENCES = 10  # a fresh worker's first answers are slow: the budget is for the steady state


class Deployer:
    """One model store's rollouts; every state change is on disk before the next step starts."""

    def __init__(self, config: DeployConfig, endpoints: Endpoints, stop: threading.Event | None = None) -> None:
        self.config, self.endpoints = config, endpoints
        self.registry = Registry(endpoints.model_store)
        self.stop = stop or threading.Event()
        provider = telemetry.tracer_provider("rrp-deployer")
        self.tracer = provider.get_tracer("rrp.deployer") if provider is not None else None
        self._game: tuple[str, ...] = config.game
        self._stack = contextlib.ExitStack()

    def close(self) -> None:
        self._stack.close()

    def _span(self, name: str, **attributes: Any) -> contextlib.AbstractContextManager[Any]:
        if self.tracer is None:
            return contextlib.nullcontext()
        return self.tracer.start_as_current_span(name, attributes=attributes)

    def games(self) -> tuple[str, ...]:
        if not self._game:
            from pipeline.pools import local_game_servers

            self._game = tuple(s.address for s in self._stack.enter_context(local_game_servers(1)))
        return self._game

    # -- entry points -------------------------------------------------------------------------------------------
    def deploy(self, model_dir: Path) -> dict[str, Any]:
        """Finishes an interrupted rollout first, then rolls out `model_dir` (nothing to do if it is the default)."""
        with self.registry.lock():
            unfinished = self.registry.unfinished()
            if unfinished is not None:
                log.warning("deployment %s was interrupted in %s: taking it up", unfinished["id"], unfinished["stage"])
                record = self._run(unfinished)
                if record["candidate"] == content_id(model_dir / "model.safetensors"):
                    return record
            candidate = add_version(self.registry, model_dir, self.config.version, self.config.packaging)
            routing = self.registry.routing()
            if routing is not None and routing.default == candidate.version:
                log.info("version %s (%s) is already the default", candidate.version, candidate.id)
                return {"id": "", "candidate": candidate.id, "decision": "none", "reason": "already the default"}
            record = self._new_record(candidate, routing)
            return self._run(record)

    def resume(self) -> dict[str, Any] | None:
        with self.registry.lock():
            unfinished = self.registry.unfinished()
            return self._run(unfinished) if unfinished is not None else None

    def rollback_now(self) -> dict[str, Any]:
        """`--rollback`: the previous default becomes the default again, at once."""
        with self.registry.lock():
            unfinished = self.registry.unfinished()
            if unfinished is not None:  # a rollout in flight is undone, not finished
                if not unfinished.get("decision"):
                    unfinished["decision"], unfinished["reason"] = "rollback", "rrp deploy --rollback"
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
            self._converge(lambda st: st["default"] == previous.version, f"version {previous.version} the default",
                           written.updated)  # fmt: skip
            record = {
                "id": f"{int(started * 1000)}-rollback", "kind": "rollback", "candidate": previous.id,
                "version": previous.version, "default": routing.default, "started": started, "ended": time.time(),
                "state": "done", "stage": "done", "steps": [], "decision": "rollback",
                "reason": f"rrp deploy --rollback: {routing.default} -> {previous.version}",
            }  # fmt: skip
            self.registry.save_deployment(record)
            metrics.DEPLOY_DECISIONS.labels("rollback").inc()
            log.warning("rolled back: version %s is the default again (was %s)", previous.version, routing.default)
            return record

    # -- the rollout --------------------------------------------------------------------------------------------
    def _new_record(self, candidate: ModelVersion, routing: Routing | None) -> dict[str, Any]:
        started = time.time()
        record: dict[str, Any] = {
            "id": f"{int(started * 1000)}-{candidate.id[:8]}",
            "kind": "rollout" if routing is not None else "first",
            "candidate": candidate.id,
            "version": candidate.version,
            "name": candidate.name,
            "default": routing.default if routing is not None else "",
            "started": started,
            "state": "running",
            "stage": "register",
            "steps": [],
            "decision": "",
            "reason": "",
            "settings": {"gate": asdict(self.config.gate), "canary": asdict(self.config.canary)},
        }
        self.registry.save_deployment(record)
        return record

    def _done_steps(self, record: dict[str, Any]) -> set[str]:
        return {s["stage"] for s in record["steps"] if s.get("ended")}

    def _run(self, record: dict[str, Any]) -> dict[str, Any]:
        candidate = self.registry.by_id(record["candidate"])
        if candidate is None:
            raise FailedPrecondition(f"deployment {record['id']}: its version {record['candidate']} left the registry")
        with self._span("deploy", **{"rrp.version": candidate.version, "rrp.candidate": candidate.id,
                                     "rrp.deployment": record["id"]}):  # fmt: skip
            steps = ("register",) if record["kind"] == "first" else STEPS
            for stage in steps:
                if record["decision"] or stage in self._done_steps(record):
                    continue
                if self.stop.is_set():
                    raise FailedPrecondition("stopped: the rollout resumes when the deployer starts again")
                ok, _, reason = self._step(stage, record, candidate)
                if not ok:
                    record["decision"], record["reason"] = "rollback", reason
                    self.registry.save_deployment(record)
            if not record["decision"]:
                record["decision"] = "promote"
                record["reason"] = "first version" if record["kind"] == "first" else "gate and canary held up"
                self.registry.save_deployment(record)
            final = "promote" if record["decision"] == "promote" else "rollback"
            self._timed(
                final, record, lambda: self._promote(candidate) if final == "promote" else self._undo(candidate)
            )
            record["state"], record["stage"], record["ended"] = "done", "done", time.time()
            self.registry.save_deployment(record)
        metrics.DEPLOY_DECISIONS.labels(final).inc()
        metrics.set_stage("idle")
        log.info("deployment %s: %s version %s (%s)", record["id"], final, candidate.version, record["reason"])
        return record

    def _timed(self, stage: str, record: dict[str, Any], work: Any) -> Any:
        record["stage"] = stage
        entry = {"stage": stage, "started": time.time()}
        record["steps"] = [s for s in record["steps"] if s["stage"] != stage] + [entry]
        self.registry.save_deployment(record)
        metrics.set_stage(stage)
        t0 = time.monotonic()
        with self._span(f"deploy.{stage}"):
            result = work()
        entry["ended"] = time.time()
        entry["seconds"] = round(time.monotonic() - t0, 2)
        if isinstance(result, tuple):
            entry["ok"], entry["figures"], entry["reason"] = result[0], result[1], result[2]
        self.registry.save_deployment(record)
        metrics.DEPLOY_SECONDS.labels(stage).observe(time.monotonic() - t0)
        return result

    def _step(self, stage: str, record: dict[str, Any], candidate: ModelVersion) -> tuple[bool, dict[str, Any], str]:
        work = {"register": self._register, "gate": self._gate, "canary": self._canary}[stage]
        result: tuple[bool, dict[str, Any], str] = self._timed(stage, record, lambda: work(candidate, record))
        return result

    def _converge(self, done: Any, what: str, since: float, version: str = "") -> None:
        """Waits until every model server following the registry has reported `done` since the routing changed."""
        deadline = time.monotonic() + self.config.converge_s
        while True:
            statuses = self.registry.replicas()
            for st in statuses:
                if version and version in st.get("errors", {}):
                    raise FailedPrecondition(f"version {version} does not load on {st['replica']}: "
                                             f"{st['errors'][version]}")  # fmt: skip
            fresh = [st for st in statuses if float(st.get("updated", 0)) >= since]
            if statuses and len(fresh) == len(statuses) and all(done(st) for st in fresh):
                return
            if time.monotonic() > deadline or self.stop.is_set():
                if not statuses:
                    raise Unavailable(f"no model server follows {self.registry.root}: start rrp serve with this "
                                      "model store")  # fmt: skip
                seen = [(st["replica"], st["registered"], st["default"]) for st in statuses]
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
        self._converge(lambda st: version.version in st["registered"], f"version {version.version} registered",
                       since, version.version)  # fmt: skip

    def _register(self, candidate: ModelVersion, record: dict[str, Any]) -> tuple[bool, dict[str, Any], str]:
        t0 = time.monotonic()
        try:
            self._ensure_registered(candidate)
        except DomainError as exc:
            return False, {}, f"the candidate does not load: {exc}"
        figures = {"load_s": round(time.monotonic() - t0, 2)}
        return True, figures, "registered with no traffic"

    # -- gate ---------------------------------------------------------------------------------------------------
    def _lap(self, version: ModelVersion, track: str) -> dict[str, Any]:
        from game_server.client import GameClient
        from serving.autopilot import AutopilotConfig, LapRecord, drive_lap
        from serving.client import ModelRef, TorchServeClient

        info = archive_info(self.registry.model_store / version.archive)
        g = self.config.gate
        pilot = AutopilotConfig(track=track, mode="lockstep", max_ticks=g.max_ticks, width=info["input"]["width"],
                                height=info["input"]["height"], lockstep_hz=g.rate_hz)  # fmt: skip
        client = TorchServeClient(self.endpoints.inference, ModelRef(version.name, version.version),
                                  self.endpoints.inference_key)  # fmt: skip
        try:
            span = self._span("gate.lap", **{"rrp.track": track, "rrp.version": version.version})
            with span, GameClient(self.games()[0]) as game:
                r = drive_lap(
                    game, client, pilot, LapRecord(0, 0, self.games()[0], version=version.version), counted=False
                )
        finally:
            client.close()
        import numpy as np

        return {
            "track": track, "version": version.version, "finished": r.finished, "lap_ticks": r.lap_ticks,
            "lap_s": round(r.lap_ticks * TICK_S, 2), "progress": round(r.progress_fraction, 4),
            "wall_contacts": r.wall_contacts, "ticks": r.ticks, "stop_reason": r.stop_reason,
            "inference_ms_p50": round(float(np.percentile(r.inference_ms, 50)), 2) if r.inference_ms else None,
            "inference_ms_p99": round(float(np.percentile(r.inference_ms, 99)), 2) if r.inference_ms else None,
            "inference_ms": [round(v, 2) for v in r.inference_ms],
        }  # fmt: skip

    def _baseline(self, default: ModelVersion, track: str) -> dict[str, Any]:
        """The default's gate lap: lockstep laps are deterministic, so one kept from its own gate serves again."""
        key = f"{track}@{self.config.gate.max_ticks}"
        kept = default.gate.get("laps", {}).get(key)
        if kept is not None:
            return dict(kept)
        lap = self._lap(default, track)
        laps = {**default.gate.get("laps", {}), key: {k: v for k, v in lap.items() if k != "inference_ms"}}
        self.registry.update(default.id, gate={**default.gate, "laps": laps})
        return lap

    def _latency(self, candidate: ModelVersion, default: ModelVersion) -> tuple[float, float]:
        """Both versions' p99 over the same frames, calls interleaved, so that both see the same load."""
        import numpy as np

        from serving.client import ModelRef, TorchServeClient

        info = archive_info(self.registry.model_store / candidate.archive)
        w, h = info["input"]["width"], info["input"]["height"]
        frames = np.random.default_rng(0).integers(0, 256, (8, h, w, 3), dtype=np.uint8)
        clients = [TorchServeClient(self.endpoints.inference, ModelRef(v.name, v.version), self.endpoints.inference_key)
                   for v in (candidate, default)]  # fmt: skip
        times: list[list[float]] = [[], []]
        try:
            with self._span("gate.latency"):
                period = 1.0 / self.config.gate.rate_hz if self.config.gate.rate_hz > 0 else 0.0
                for i in range(WARMUP_INFERENCES + self.config.gate.latency_samples):
                    time.sleep(period * len(clients))
                    for k, client in enumerate(clients):
                        t0 = time.perf_counter()
                        client.infer(frames[i % len(frames)], 10.0, timeout_s=10.0)
                        if i >= WARMUP_INFERENCES:
                            times[k].append((time.perf_counter() - t0) * 1e3)
        finally:
            for client in clients:
                client.close()
        return float(np.percentile(times[0], 99)), float(np.percentile(times[1], 99))

    def _gate(self, candidate: ModelVersion, record: dict[str, Any]) -> tuple[bool, dict[str, Any], str]:

        g = self.config.gate
        default = self.registry.by_version(record["default"])
        self._ensure_registered(default)
        failures: list[str] = []
        laps = []
        for track in g.tracks:
            base = self._baseline(default, track)
            cand = self._lap(candidate, track)
            cand.pop("inference_ms")
            base.pop("inference_ms", None)
            failures += judge_lap(cand, base, g)
            laps.append({"track": track, "candidate": cand, "default": base})
        p99, base_p99 = self._latency(candidate, default)
        if p99 > max(g.max_p99_ms, g.latency_ratio * base_p99):
            failures.append(f"inference p99 {p99:.1f} ms over the {g.max_p99_ms} ms budget and over "
                            f"{g.latency_ratio}x the default's {base_p99:.1f} ms")  # fmt: skip
        figures = {"laps": laps, "inference_ms_p99": round(p99, 2), "default_inference_ms_p99": round(base_p99, 2),
                   "failures": failures}  # fmt: skip
        key_laps = {f"{lap['track']}@{g.max_ticks}": lap["candidate"] for lap in laps}
        self.registry.update(candidate.id, gate={"passed": not failures, "failures": failures,
                                                 "inference_ms_p99": round(p99, 2), "laps": key_laps})  # fmt: skip
        reason = "gate: " + "; ".join(failures) if failures else "gate: at least as good as the default"
        return not failures, figures, reason

    # -- canary -------------------------------------------------------------------------------------------------
    def _canary(self, candidate: ModelVersion, record: dict[str, Any]) -> tuple[bool, dict[str, Any], str]:
        c = self.config.canary
        routing = self.registry.routing()
        if routing is None:
            raise FailedPrecondition("no routing: the model store has no default version")
        live = LiveFigures(c.live, c.prometheus, own=c.cars > 0)
        before = live.snapshot()
        staged = tuple(v for v in routing.staged if v != candidate.version)
        self.registry.set_routing(replace(routing, canary=candidate.version, canary_share=c.share, staged=staged))
        t0 = time.monotonic()
        with self._own_cars():
            while True:
                now = live.snapshot()
                cand = window(before, now, candidate.version)
                if cand["laps"] >= c.laps or time.monotonic() - t0 > c.max_s or self.stop.is_set():
                    break
                self.stop.wait(1.0)
        if self.stop.is_set():
            raise FailedPrecondition("stopped during the canary: it starts again when the deployer does")
        base = window(before, now, routing.default)
        failures = judge_canary(cand, base, c)
        figures = {"candidate": cand, "default": base, "seconds": round(time.monotonic() - t0, 1), "failures": failures}
        self.registry.update(candidate.id, live={"candidate": cand, "default": base, "passed": not failures})
        reason = "canary: " + "; ".join(failures) if failures else "canary: live figures held up"
        return not failures, figures, reason

    @contextlib.contextmanager
    def _own_cars(self) -> Iterator[None]:
        """The deployer's own cars on the routing, for a canary without autopilots (tests, one machine)."""
        c = self.config.canary
        if c.cars <= 0:
            yield
            return
        from serving.autopilot import AutopilotConfig, run_autopilot
        from serving.client import ModelRef, TorchServeClient

        routing = self.registry.routing()
        assert routing is not None
        info = archive_info(self.registry.model_store / self.registry.by_version(routing.default).archive)
        size = info["input"]
        pilot = AutopilotConfig(
            track=c.track, cars=c.cars, laps=10_000, max_ticks=c.max_ticks, width=size["width"], height=size["height"]
        )
        stop = threading.Event()
        router = Router(self.registry.routing_path)

        def connect(version: str) -> Any:
            return TorchServeClient(self.endpoints.inference, ModelRef(routing.name, version),
                                    self.endpoints.inference_key)  # fmt: skip

        errors: list[BaseException] = []

        def race() -> None:
            try:
                run_autopilot(pilot, self.games(), stop=stop, router=router, connect_version=connect)
            except BaseException as exc:  # reported after the canary
                errors.append(exc)

        thread = threading.Thread(target=race, name="canary-cars", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=150.0)
        if errors:
            log.warning("the deployer's canary cars stopped: %s", errors[0])

    # -- decisions ----------------------------------------------------------------------------------------------
    def _promote(self, candidate: ModelVersion) -> tuple[bool, dict[str, Any], str]:
        routing = self.registry.routing()
        old = routing.default if routing is not None else ""
        if routing is not None and routing.default == candidate.version:
            old = routing.previous  # promoted already; the deployer died before the record said so
        # Kept registered: the new default and the previous one (for --rollback); the servers drop older ones.
        written = self.registry.set_routing(Routing(candidate.name, default=candidate.version, previous=old))
        self._converge(lambda st: st["default"] == candidate.version, f"version {candidate.version} the default",
                       written.updated, candidate.version)  # fmt: skip
        return True, {"default": candidate.version, "previous": old}, f"version {candidate.version} is the default"

    def _undo(self, candidate: ModelVersion) -> tuple[bool, dict[str, Any], str]:
        routing = self.registry.routing()
        if routing is None:
            return True, {}, "no routing"
        v = candidate.version
        if routing.canary == v:
            routing = self.registry.set_routing(replace(routing, canary="", canary_share=0.0))
            self.stop.wait(self.config.canary.drain_s)  # laps on the candidate move to the default (the Router polls)
        if v in routing.staged:
            routing = self.registry.set_routing(replace(routing, staged=tuple(x for x in routing.staged if x != v)))
        if v in routing.desired():
            return True, {}, "kept: the candidate is the default or the previous version"
        self._converge(lambda st: v not in st["registered"], f"version {v} unregistered", routing.updated)
        return True, {"unregistered": v}, f"version {v} unregistered"


# -- commands ------------------------------------------------------------------------------------------------------


def _endpoints(config: DeployConfig) -> Endpoints:
    return Endpoints.resolve(config.serve_dir, config.model_store, config.model_server, config.token_file)


def _summary(record: dict[str, Any]) -> str:
    steps = ", ".join(f"{s['stage']} {s.get('seconds', '-')} s" for s in record.get("steps", []))
    return (f"[deploy] {record.get('decision', '?')} version {record.get('version', '?')}: {record.get('reason', '')}"
            f" ({steps})")  # fmt: skip


def run_deploy(config: DeployConfig) -> int:
    modes = sum((config.model is not None, config.rollback, config.watch is not None))
    if modes > 1:
        raise InvalidArgument("give one of --model, --rollback or --watch")
    if config.model is not None and not (config.model / "model.safetensors").is_file():
        raise NotFound(f"{config.model}: no model.safetensors (train one: rrp train)")
    stop = stop_on_signals("the deployer")
    endpoint = start_metrics(config.metrics_host, config.metrics_port, "deployer")
    metrics.set_stage("idle")
    deployer = Deployer(config, _endpoints(config), stop)
    try:
        if config.rollback:
            print(_summary(deployer.rollback_now()), flush=True)
        elif config.model is not None:
            record = deployer.deploy(config.model)
            print(_summary(record), flush=True)
            return 0 if record["decision"] in ("promote", "none") else 3
        elif config.watch is not None:
            _watch(deployer, config.watch, config.watch_every_s, stop)
        else:
            record_ = deployer.resume()
            print(_summary(record_) if record_ else "[deploy] nothing to resume: give --model DIR", flush=True)
    finally:
        deployer.close()
        if endpoint is not None:
            endpoint.stop()
    return 0


def _watch(deployer: Deployer, root: Path, every_s: float, stop: threading.Event) -> None:
    """Deploys each model.safetensors under `root` that the registry has not seen, newest first."""
    seen: set[str] = {v.id for v in deployer.registry.versions()}
    deployer.resume()
    print(f"[deploy] watching {root} for new models", flush=True)
    while not stop.is_set():
        found = sorted(root.rglob("model.safetensors"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
        for weights in reversed(found):
            try:
                vid = content_id(weights)
            except OSError:
                continue  # still being written
            if vid in seen:
                continue
            seen.add(vid)
            try:
                print(_summary(deployer.deploy(weights.parent)), flush=True)
            except DomainError as exc:
                log.error("deploying %s failed: %s", weights.parent, exc)
            break
        stop.wait(every_s)


def models_table(registry: Registry) -> list[dict[str, Any]]:
    routing = registry.routing()
    rows = []
    for v in registry.versions():
        role = ""
        if routing is not None:
            role = {routing.default: "default", routing.canary: "canary", routing.previous: "previous"}.get(
                v.version, ""
            )
        rows.append({
            "version": v.version, "id": v.id, "role": role,
            "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(v.created)),
            "gate": "passed" if v.gate.get("passed") else ("failed" if "passed" in v.gate else "-"),
            "gate_p99_ms": v.gate.get("inference_ms_p99"),
            "live_completion": v.live.get("candidate", {}).get("completion"),
            "live_mean_lap_s": v.live.get("candidate", {}).get("mean_lap_s"),
            "data": v.data.get("source", ""),
        })  # fmt: skip
    return rows


def run_models(config: ModelsConfig) -> int:
    store = config.model_store or _store_of(config.serve_dir)
    registry = Registry(store)
    rows = models_table(registry)
    if config.json:
        print(json.dumps({"routing": asdict(current) if (current := registry.routing()) else None, "versions": rows,
                          "deployments": registry.deployments()[-5:]}, indent=2, default=str))  # fmt: skip
        return 0
    if not rows:
        print(f"no model versions in {store} (rrp serve registers the first; rrp deploy --model DIR the next)")
        return 0
    cols = ("version", "id", "role", "created", "gate", "gate_p99_ms", "live_completion", "live_mean_lap_s", "data")
    widths = {c: max(len(c), *(len(str(r[c] if r[c] is not None else "-")) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c] if r[c] is not None else "-").ljust(widths[c]) for c in cols))
    for d in registry.deployments()[-3:]:
        print(_summary(d))
    return 0


def _store_of(serve_dir: Path) -> Path:
    if (serve_dir / ENDPOINTS_FILE).is_file():
        return Path(read_json(serve_dir / ENDPOINTS_FILE)["model_store"])
    if (serve_dir / "model-store").is_dir():
        return serve_dir / "model-store"
    raise NotFound(
        f"no model store under {serve_dir}: give --model-store, or start rrp serve --workdir {quote(str(serve_dir))}"
    )
