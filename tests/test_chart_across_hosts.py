"""The chart as written, across hosts: the production values' rendered pods, each in its own network namespace.

Each pod's containers run as rendered (init containers first, then the main one): the `rrp` images' args after the
entry point, other images' `command`, the rendered env (fieldRefs, secretKeyRefs and `$(VAR)` expanded), the
ports as rendered. Volumes map to folders (the mount paths in args, commands and env are rewritten to them): an
emptyDir or a volume claim template per pod, a PersistentVolumeClaim shared by its pods, a Secret's items as files.
Every Service's name resolves, through the hosts files, to every address of the pods it selects (a headless
Service's A records; a ClusterIP Service's virtual address is left out). Every NetworkPolicy is enforced with
iptables in the destination pod's namespace: a connection is admitted when some policy selecting the pod allows its
source on that port, and every other new connection is dropped.

The values are production's, made small: two game servers, one scheduler and collector, a GA of a few small
generations, two collected episodes, one training epoch, the model deployed to two TorchServe replicas (each behind
its token front) and one autopilot car racing on them; mutual TLS on every gRPC port, with a certificate made here.
The deployer is off (deploy/README.md, "What the across-hosts test leaves out"). Every Job starts at once, as
Kubernetes starts them; the order comes from the chart alone (each Job's init container waits for its inputs).
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.netlab import Host, NetLab, Proc
from tests.test_collector_tls import OPENSSL, _make_ca
from tests.test_grpc_tls import _issue
from tests.test_helm_chart import _selects, render, values

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs as root)"),
    pytest.mark.skipif(
        any(shutil.which(t) is None for t in ("ip", "iptables", "redis-server", "redis-cli")) or OPENSSL is None,
        reason="needs iproute2, iptables, redis and openssl (scripts/setup.sh installs them)",
    ),
]

NAMESPACE = "racing"
ROOT = Path(__file__).resolve().parents[1]
IMAGE_FILES = {  # where the images keep what a rendered command names, here
    "/opt/rrp/bin/python": sys.executable,
    "/opt/rrp/healthcheck.py": str(ROOT / "deploy" / "images" / "healthcheck.py"),
}
REDIS_PASSWORD = "across-hosts-redis-password"
SMALL: dict[str, Any] = {
    "gameServer": {"autoscaling": {"enabled": False}, "replicas": 2, "workers": 4},
    "scheduler": {"replicas": 1},
    "collector": {"replicas": 1},
    "telemetry": {"otlpEndpoint": ""},
    "torchserve": {"autoscaling": {"enabled": False}, "replicas": 2},
    "autopilot": {"replicas": 1, "cars": 1},
    # The first version is promoted without a canary: the deploy Job never asks Prometheus. No API server runs
    # here: the deploy lock is flock on the shared store (the Lease is tested against a fake in test_lease.py).
    "deployer": {"enabled": False, "lease": {"enabled": False}},
    "jobs": {
        "evolve": {"population": 8, "generations": 3, "track": "oval"},
        "collect": {"episodes": 2, "tracks": "oval"},  # two runs: training splits validation by run
        "train": {"epochs": 1},
        "deployModel": {"enabled": True},
    },
}
JOBS = ("evolve", "collect", "train", "deploy-model")
INFERENCES = 25  # each TorchServe replica answers at least this many of the racing car's frames


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@dataclass
class Pod:
    name: str
    kind: str  # the workload's kind
    labels: dict[str, str]
    spec: dict[str, Any]
    host: Host
    folders: dict[str, Path] = field(default_factory=dict)  # mountPath -> folder, per container name


def _pods(docs: list[dict[str, Any]], lab: NetLab) -> list[Pod]:
    pods = []
    for d in docs:
        if d["kind"] not in ("Deployment", "StatefulSet", "Job", "Pod"):
            continue
        template = d if d["kind"] == "Pod" else d["spec"]["template"]  # a Pod: the chart's `helm test` pods
        for i in range(int(d["spec"].get("replicas", 1)) if d["kind"] != "Pod" else 1):
            name = f"{d['metadata']['name']}-{i}"
            host = lab.add_host(f"h{len(pods) + 1}", 10 + len(pods))
            pod = Pod(name, d["kind"], template["metadata"]["labels"], template["spec"], host)
            pod.spec["_claims"] = [t["metadata"]["name"] for t in d["spec"].get("volumeClaimTemplates", [])]
            pods.append(pod)
    return pods


def _volumes(pod: Pod, root: Path, secrets: dict[str, dict[str, str]]) -> dict[str, Path]:
    """Each volume of the pod as a folder."""
    folders = {}
    for claim in pod.spec.get("_claims", []):
        folders[claim] = root / "pods" / pod.name / claim
    for v in pod.spec.get("volumes", []):
        if "persistentVolumeClaim" in v:
            folders[v["name"]] = root / "claims" / v["persistentVolumeClaim"]["claimName"]
        elif "secret" in v:
            folder = root / "pods" / pod.name / v["name"]
            folder.mkdir(parents=True, exist_ok=True)
            data = secrets[v["secret"]["secretName"]]
            for item in v["secret"].get("items", [{"key": k, "path": k} for k in data]):
                (folder / item["path"]).write_bytes(base64.b64decode(data[item["key"]]))
                (folder / item["path"]).chmod(0o400)
            folders[v["name"]] = folder
        else:  # emptyDir
            folders[v["name"]] = root / "pods" / pod.name / v["name"]
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    return folders


def _rewrite(text: str, mounts: list[tuple[str, Path]]) -> str:
    """Mount paths in `text` replaced by their folders, in one pass (a folder may itself lie under /tmp)."""
    if not mounts:
        return text
    folders = dict(mounts)
    alternatives = "|".join(re.escape(m) for m, _ in mounts)  # longest first: /tmp/serve before /tmp
    rx = rf"(?<![\w/.])({alternatives})(?=/|$|[\s\"')])"
    return re.sub(rx, lambda m: str(folders[m.group(1)]), text)


def _env(pod: Pod, container: dict[str, Any], secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), str(e["value"]))
        elif "fieldRef" in e["valueFrom"]:
            path = e["valueFrom"]["fieldRef"]["fieldPath"]
            env[e["name"]] = {"metadata.name": pod.name, "metadata.namespace": NAMESPACE}[path]
        elif "secretKeyRef" in e["valueFrom"]:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = base64.b64decode(secrets[ref["name"]][ref["key"]]).decode()
    return env


def _argv(container: dict[str, Any], mounts: list[tuple[str, Path]]) -> list[str]:
    """The container's command line as rendered, its mount paths rewritten; then the image's own files (this
    machine's Python, wherever this checkout lies, even under a mount path such as /tmp) put in, never rewritten."""
    if "command" in container:
        argv = [str(a) for a in container["command"]] + [str(a) for a in container.get("args", [])]
        return [IMAGE_FILES.get(a, _rewrite(a, mounts)) for a in argv]
    # The rrp image's entry point.
    return [sys.executable, "-m", "rrp.cli", *(_rewrite(str(a), mounts) for a in container["args"])]


def _start(lab: NetLab, pod: Pod, container: dict[str, Any], root: Path, secrets: dict[str, Any]) -> Proc:
    folders = _volumes(pod, root, secrets)
    mounts = sorted(
        ((m["mountPath"], folders[m["name"]]) for m in container.get("volumeMounts", [])),
        key=lambda m: -len(m[0]),
    )
    env = {k: _rewrite(v, mounts) for k, v in _env(pod, container, secrets).items()}
    # A pod's hostname is its name (TorchServe's replicas report their status under it).
    argv = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', pod.name, *_argv(container, mounts)]
    return lab.run(pod.host, argv, env={**env, "GRPC_DNS_RESOLVER": "native"})


def _services(docs: list[dict[str, Any]], pods: list[Pod], lab: NetLab) -> dict[str, list[Pod]]:
    """Every Service's names (short, namespaced, FQDN) -> the hosts of the pods it selects."""
    found = {}
    for svc in (d for d in docs if d["kind"] == "Service"):
        chosen = [p for p in pods if _selects({"matchLabels": svc["spec"]["selector"]}, p.labels)]
        name = svc["metadata"]["name"]
        for alias in (name, f"{name}.{NAMESPACE}", f"{name}.{NAMESPACE}.svc.cluster.local"):
            lab.set_name(alias, [p.host for p in chosen])
        found[name] = chosen
    return found


def _tls_secret(docs: list[dict[str, Any]], folder: Path) -> dict[str, str]:
    """The production values' TLS Secret (tls.existingSecret), made here as cert-manager would: a CA, and one
    certificate for every Service's names (short, namespaced, FQDN), for serving and for mutual TLS's clients."""
    folder.mkdir(parents=True, exist_ok=True)
    ca, ca_key = _make_ca(folder, "ca")
    names = [d["metadata"]["name"] for d in docs if d["kind"] == "Service"]
    sans = ",".join(f"DNS:{a}" for n in names for a in (n, f"{n}.{NAMESPACE}", f"{n}.{NAMESPACE}.svc.cluster.local"))
    cert, key = _issue(folder, "mesh", ca, ca_key, "serverAuth,clientAuth", sans)
    files = {"tls.crt": cert, "tls.key": key, "ca.crt": ca}
    return {k: base64.b64encode(f.read_bytes()).decode() for k, f in files.items()}


def _port_number(pod: Pod, port: Any) -> int:
    if isinstance(port, int):
        return port
    for c in pod.spec["containers"]:
        for p in c.get("ports", []):
            if p["name"] == port:
                return int(p["containerPort"])
    raise KeyError(f"{pod.name}: no port named {port}")


def _enforce(docs: list[dict[str, Any]], pods: list[Pod]) -> dict[str, list[tuple[str, int]]]:
    """The NetworkPolicies as iptables rules in each selected pod's namespace; returns what each pod admits."""
    admitted: dict[str, list[tuple[str, int]]] = {}
    policies = [d for d in docs if d["kind"] == "NetworkPolicy" and "Ingress" in d["spec"]["policyTypes"]]
    for pod in pods:
        selecting = [p for p in policies if _selects(p["spec"]["podSelector"], pod.labels)]
        if not selecting:
            continue
        allowed = []
        for policy in selecting:
            for rule in policy["spec"].get("ingress", []):
                peers = rule.get("from")
                sources = [
                    src.host.address
                    for src in pods
                    if peers is None
                    or any(
                        "podSelector" in peer
                        and "namespaceSelector" not in peer
                        and _selects(peer["podSelector"], src.labels)
                        for peer in peers
                    )
                ]
                for port in rule.get("ports", []):
                    try:
                        number = _port_number(pod, port["port"])
                    except KeyError:
                        continue  # a port this pod does not have
                    allowed += [(source, number) for source in sources]

        def iptables(*args: str, netns: str = pod.host.netns) -> None:
            subprocess.run(["ip", "netns", "exec", netns, "iptables", *args], check=True, timeout=10)

        for source, number in sorted(set(allowed)):
            iptables("-A", "INPUT", "-i", "eth0", "-p", "tcp", "--syn", "-s", source, "--dport", str(number),
                     "-j", "ACCEPT")  # fmt: skip
        iptables("-A", "INPUT", "-i", "eth0", "-p", "tcp", "--syn", "-j", "DROP")  # any other new connection
        admitted[pod.name] = sorted(set(allowed))
    return admitted


def _flag_of(spec: dict[str, Any], container: str, flag: str) -> str:
    args = [str(a) for a in next(c for c in spec["containers"] if c["name"] == container)["args"]]
    return args[args.index(flag) + 1]


def _inferences(pod: Pod, root: Path) -> int:
    """The inference calls a TorchServe replica answered, from its own access log (TorchServe's metrics count no
    gRPC calls) in its workdir, a folder of the pod's /tmp."""
    log = root / "pods" / pod.name / "tmp" / "serve" / "logs" / "access_log.log"
    text = log.read_text() if log.exists() else ""
    return len(re.findall(r"InferenceAPIsService/Predictions", text))


def _connects(lab: NetLab, host: Host, address: str, port: int) -> bool:
    code = f"import socket; socket.create_connection(({address!r}, {port}), 2).close()"
    proc = subprocess.run(["ip", "netns", "exec", host.netns, sys.executable, "-c", code], capture_output=True,
                          timeout=30)  # fmt: skip
    return proc.returncode == 0


@pytest.fixture
def root() -> Iterator[Path]:
    """The pods' folders, under a short path: TorchServe's workers listen on Unix sockets in their pod's /tmp,
    whose paths may not pass 107 bytes (pytest's tmp_path would)."""
    folder = Path(tempfile.mkdtemp(prefix="rrp-hosts-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def lab() -> Iterator[NetLab]:
    lab = NetLab()
    try:
        yield lab
    finally:
        lab.close()


def test_the_production_chart_runs_across_hosts_in_order_behind_its_network_policies(lab: NetLab, root: Path) -> None:
    started = time.time()  # wall clock: the timeline is compared with files' modification times
    prod = values("production")
    assert prod is not None
    docs = render(merged(prod, SMALL))
    secrets = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "Secret"}
    secrets["rrp-redis-auth"] = {"password": base64.b64encode(REDIS_PASSWORD.encode()).decode()}  # existingSecret
    assert prod["tls"]["enabled"] and prod["tls"]["mutual"]
    secrets[prod["tls"]["existingSecret"]] = _tls_secret(docs, root / "pki")
    pods = _pods(docs, lab)
    by_component = {}
    for pod in pods:
        by_component.setdefault(pod.labels["app.kubernetes.io/component"], []).append(pod)
    services = _services(docs, pods, lab)
    assert len(services["rrp-rallyrobopilot-game-server"]) == 2  # the headless Service: both pods' addresses
    admitted = _enforce(docs, pods)

    # Long-running pods: init containers to completion, then the main container until it listens or is ready.
    for component in ("redis", "game-server", "collector", "scheduler"):
        for pod in by_component[component]:
            for init in pod.spec.get("initContainers", []):
                assert _start(lab, pod, init, root, secrets).popen.wait(30) == 0, init["name"]
            main = pod.spec["containers"][0]
            proc = _start(lab, pod, main, root, secrets)
            if component == "redis":  # its own readiness probe, as rendered (PONG with the password)
                probe = {**main, "command": main["readinessProbe"]["exec"]["command"], "args": []}
                deadline = time.monotonic() + 30
                while _start(lab, pod, probe, root, secrets).popen.wait(10) != 0:
                    assert time.monotonic() < deadline and proc.popen.poll() is None, proc.lines[-20:]
            else:
                proc.wait_for(r"listening on \S+ \(TLS\)", 60)

    # TorchServe's replicas, each pod's two containers side by side: the token front (TLS) and TorchServe on the
    # pod's loopback, which starts empty and serves what the registry on the shared store names.
    serving: dict[str, Proc] = {}
    for pod in by_component["torchserve"]:
        procs = {c["name"]: _start(lab, pod, c, root, secrets) for c in pod.spec["containers"]}
        procs["auth-proxy"].wait_for(r"listening on \S+ \(TLS\)", 60)
        serving[pod.name] = procs["torchserve"]

    # `helm test`: the chart's test pods check each service's health through its Service name, as rendered.
    tests = [pod for pod in pods if pod.kind == "Pod"]
    assert len(tests) == 3
    for pod in tests:
        proc = _start(lab, pod, pod.spec["containers"][0], root, secrets)
        assert proc.finish(90) == 0, proc.lines[-10:]
        assert "SERVING" in "".join(proc.lines)  # all of its output read: the exit can come before its last line

    # Mutual TLS holds: the same check without TLS, or without a client certificate, is refused.
    scheduler = by_component["scheduler"][0]
    main = scheduler.spec["containers"][0]
    check = [str(a) for a in main["readinessProbe"]["exec"]["command"]]  # the pod's own probe, as rendered
    plain = check[: check.index("--tls-ca")]
    no_cert = [*plain, "--tls-ca", check[check.index("--tls-ca") + 1], "--tls-server-name",
               check[check.index("--tls-server-name") + 1]]  # fmt: skip
    for argv in (check, plain, no_cert):
        done = _start(lab, scheduler, {**main, "command": argv, "args": []}, root, secrets)
        assert done.popen.wait(30) == (0 if argv is check else 1), (argv, done.lines[-5:])

    # Every Job at once; the chart's init containers make the order.
    timeline: list[tuple[float, str, str]] = []
    results: dict[str, int] = {}

    def run_job(pod: Pod) -> None:
        job = pod.labels["app.kubernetes.io/component"]
        for init in pod.spec.get("initContainers", []):
            assert _start(lab, pod, init, root, secrets).popen.wait(120) == 0
            timeline.append((time.time() - started, job, "inputs ready"))
        timeline.append((time.time() - started, job, "started"))
        proc = _start(lab, pod, pod.spec["containers"][0], root, secrets)
        results[job] = proc.popen.wait(180)
        timeline.append((time.time() - started, job, f"ended rc={results[job]}"))
        if results[job]:
            print("".join(proc.lines[-30:]))

    jobs = [pod for pod in pods if pod.kind == "Job"]
    threads = [threading.Thread(target=run_job, args=(pod,)) for pod in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert results == dict.fromkeys(JOBS, 0), results
    for name, proc in serving.items():  # they started beside the Jobs, as Kubernetes starts them
        at = proc.wait_for(r"^(\S+ \S+) INFO \S+: torchserve listening on", 10).group(1)
        timeline.append((time.mktime(time.strptime(at.split(",")[0], "%Y-%m-%d %H:%M:%S")) - started, name,
                         "TorchServe started (empty: no model yet)"))  # fmt: skip
    ended = {job: at for at, job, what in timeline if what.startswith("ended")}
    began = {job: at for at, job, what in timeline if what == "started"}
    artifacts = root / "claims" / "rrp-rallyrobopilot-artifacts"
    # Each Job's input, the file its upstream writes last: when it was written.
    inputs = {
        "collect": ("evolve", "evolve/*/evolve_summary.json"),
        "train": ("collect", "collect/*/collect_summary.json"),
        "deploy-model": ("train", "model/*/model_card.json"),
    }
    wrote = {}
    for job, (upstream, pattern) in inputs.items():
        wrote[job] = next(artifacts.glob(pattern)).stat().st_mtime - started
        timeline.append((wrote[job], upstream, f"wrote {pattern.rsplit('/', 1)[-1]} (its last file)"))
    for at, job, what in sorted(timeline):
        print(f"{at:6.1f} s  {job:12s} {what}")
    for job, (upstream, _) in inputs.items():  # each Job waited for its upstream's output
        assert began[upstream] < wrote[job] <= began[job] <= ended[job], (job, upstream)
    summary = next((artifacts / "collect").glob("*/collect_summary.json"))
    assert json.loads(summary.read_text())["frames"] > 0  # recorded through the collector into Redis

    # A racing car, served by both replicas: the autopilot (started once the first version is deployed, as
    # Kubernetes would restart it until its routing exists) spreads its frames over the replicas' addresses.
    (autopilot,) = by_component["autopilot"]
    racing = _start(lab, autopilot, autopilot.spec["containers"][0], root, secrets)
    assert _flag_of(by_component["torchserve"][0].spec, "torchserve", "--workdir") == "/tmp/serve"
    deadline = time.monotonic() + 60
    while True:
        counts = {p.name: _inferences(p, root) for p in by_component["torchserve"]}
        if min(counts.values()) >= INFERENCES:
            break
        assert time.monotonic() < deadline and racing.popen.poll() is None, (counts, racing.lines[-20:])
        time.sleep(0.5)
    for name, count in counts.items():
        print(f"{time.time() - started:6.1f} s  {name} served {count} inference requests")

    # The policies hold: Redis admits the collector only; the collector admits game servers only.
    redis = by_component["redis"][0].host.address
    collector = by_component["collector"][0].host
    evolve = by_component["evolve"][0].host
    assert _connects(lab, collector, redis, 6379)
    assert not _connects(lab, evolve, redis, 6379)  # the GA Job is no Redis client: dropped
    assert not _connects(lab, evolve, collector.address, 50053)
    torchserve = by_component["torchserve"][0].host.address
    assert _connects(lab, autopilot.host, torchserve, 7070)  # a model client reaches the token front
    assert not _connects(lab, evolve, torchserve, 7070)  # the GA Job is none: dropped
    assert (evolve.address, 50051) in admitted[by_component["game-server"][0].name]
    print(f"across hosts: {len(pods)} pods, {time.time() - started:.1f} s")
