"""The chart's defaults for a cluster of several nodes: shared stores, Jobs in order and named by their inputs, Redis
probes and password, bounded traces, placement, disruption budgets, image digests and open inference refused."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.test_helm_chart import SERVING_ON, by_kind, component, containers, job_of, render, values, workloads

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (dev extra) renders the chart")

DIGEST = "sha256:" + "ab" * 32


def pods_of(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {component(pod): pod for w, pod in workloads(docs) if w["kind"] in ("Deployment", "StatefulSet")}


# -- stores shared by several workloads ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {**SERVING_ON, "torchserve": {"enabled": True, "modelStore": {"accessMode": "ReadWriteOnce"}}},
        {**SERVING_ON, "torchserve": {"enabled": True, "modelStore": {"accessMode": "ReadWriteOncePod"}}},
        {**SERVING_ON, "artifacts": {"accessMode": "ReadWriteOnce"}},
        {**SERVING_ON, "singleNode": True, "artifacts": {"accessMode": "ReadWriteOncePod"}},
    ],
    ids=["model-store-rwo", "model-store-rwop", "artifacts-rwo", "artifacts-rwop-single-node"],
)
def test_a_shared_read_write_once_store_is_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmError, match="ReadWriteMany"):
        render(bad)


def test_stores_are_read_write_many_and_read_write_once_only_on_one_node() -> None:
    for docs in (render(SERVING_ON), render(values("production"))):
        claims = by_kind(docs, "PersistentVolumeClaim")
        for name in ("rrp-rallyrobopilot-model-store", "rrp-rallyrobopilot-artifacts"):
            assert claims[name]["spec"]["accessModes"] == ["ReadWriteMany"], name
    one_node = render({**SERVING_ON, "singleNode": True, "torchserve": {"enabled": True, "modelStore": {
        "accessMode": "ReadWriteOnce"}}, "artifacts": {"accessMode": "ReadWriteOnce"}})  # fmt: skip
    assert by_kind(one_node, "PersistentVolumeClaim")["rrp-rallyrobopilot-model-store"]["spec"]["accessModes"] == [
        "ReadWriteOnce"
    ]
    # One workload alone may keep ReadWriteOnce: only the evolve Job mounts the artifacts here.
    alone = render({"jobs": {"evolve": {"enabled": True}}, "artifacts": {"accessMode": "ReadWriteOnce"}})
    assert by_kind(alone, "PersistentVolumeClaim")["rrp-rallyrobopilot-artifacts"]["spec"]["accessModes"] == [
        "ReadWriteOnce"
    ]


# -- the pipeline in order, each Job named by its inputs -------------------------------------------------------------


def _step(docs: list[dict[str, Any]], name: str) -> tuple[str, list[str], list[str]]:
    """A pipeline Job's name, its rrp args and the files its init container waits for."""
    job = job_of(docs, name)
    spec = job["spec"]["template"]["spec"]
    waits = [c for c in spec.get("initContainers", []) if c["name"] == "wait-inputs"]
    files = [str(a) for a in waits[0]["command"][4:]] if waits else []
    return job["metadata"]["name"], [str(a) for a in spec["containers"][0]["args"]], files


def _flag(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_production_jobs_run_evolve_collect_train_deploy_in_order() -> None:
    """Each Job waits for the file its upstream writes last, in the upstream's own folder: the order follows."""
    docs = render(values("production"))
    _, evolve, evolve_waits = _step(docs, "evolve")
    _, collect, collect_waits = _step(docs, "collect")
    _, train, train_waits = _step(docs, "train")
    _, deploy, deploy_waits = _step(docs, "deploy-model")
    assert evolve_waits == []  # the first step starts at once
    evolve_out = _flag(evolve, "--out")
    assert collect_waits == [f"{evolve_out}/evolve_summary.json"]  # written after best_driver.json
    assert _flag(collect, "--drivers") == f"{evolve_out}/best_driver.json"
    assert train_waits == [f"{_flag(collect, '--out')}/collect_summary.json"]
    assert _flag(train, "--driver") == f"{evolve_out}/best_driver.json"
    assert deploy_waits == [f"{_flag(train, '--out')}/model_card.json"]  # written after model.safetensors
    assert _flag(deploy, "--model") == _flag(train, "--out")
    outs = [_flag(evolve, "--out"), _flag(collect, "--out"), _flag(train, "--out")]
    assert len(set(outs)) == 3 and all(len(Path(o).name) == 12 for o in outs)


def test_jobs_keep_their_names_across_upgrades_and_change_them_with_their_inputs() -> None:
    prod = values("production")
    assert prod is not None
    names = {n: _step(render(prod), n)[0] for n in ("evolve", "collect", "train", "deploy-model")}
    chart = helm.Chart.load(str(Path(__file__).resolve().parents[1] / "deploy" / "helm" / "rallyrobopilot"))
    upgrade = chart.render(values=prod, name="rrp", namespace="racing", is_install=False)  # revision unknown here
    assert all(any(name in text for text in upgrade.values()) for name in names.values())
    more = render({**prod, "jobs": {**prod["jobs"], "collect": {**prod["jobs"]["collect"], "episodes": 480}}})
    changed = {n: _step(more, n)[0] for n in names}
    assert changed["evolve"] == names["evolve"]  # upstream of the change: left alone
    for n in ("collect", "train", "deploy-model"):  # the change and everything downstream of it: new Jobs
        assert changed[n] != names[n], n


def test_a_job_without_its_upstream_reads_the_fixed_folder() -> None:
    docs = render({**SERVING_ON, "jobs": {"deployModel": {"enabled": True}}})
    _, deploy, waits = _step(docs, "deploy-model")
    assert _flag(deploy, "--model") == "/artifacts/model" and waits == ["/artifacts/model/model_card.json"]


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX shell")
def test_the_wait_for_inputs_really_waits_and_gives_up(tmp_path: Path) -> None:
    """The init container's own shell command, run here with /artifacts mapped to a folder."""
    docs = render({**(values("production") or {}), "jobs": {"waitTimeoutSeconds": 1, "collect": {"enabled": True}}})
    spec = job_of(docs, "collect")["spec"]["template"]["spec"]
    command = [str(a) for a in spec["initContainers"][0]["command"]]
    mapped = [a.replace("/artifacts/", f"{tmp_path}/") for a in command]
    started = time.monotonic()
    missing = subprocess.run(mapped, capture_output=True, text=True, timeout=30)
    assert missing.returncode == 1 and "gave up waiting for" in missing.stderr
    assert time.monotonic() - started >= 1
    ready = Path(mapped[4])
    ready.parent.mkdir(parents=True)
    ready.write_text("{}")
    assert subprocess.run(mapped, capture_output=True, timeout=10).returncode == 0


# -- Redis ---------------------------------------------------------------------------------------------------------


def _redis_probe(docs: list[dict[str, Any]], password_file: Path, port: int) -> list[str]:
    redis = pods_of(docs)["redis"]["spec"]["containers"][0]
    command = [str(a) for a in redis["readinessProbe"]["exec"]["command"]]
    assert command == [str(a) for a in redis["livenessProbe"]["exec"]["command"]]
    assert command == [str(a) for a in redis["startupProbe"]["exec"]["command"]]
    script = command[2].replace("/var/run/secrets/rrp/redis/password", str(password_file))
    return [command[0], command[1], script.replace("-p 6379", f"-h 127.0.0.1 -p {port}")]


@pytest.mark.skipif(shutil.which("redis-server") is None or shutil.which("redis-cli") is None, reason="redis")
def test_the_redis_probe_wants_pong_with_the_password(tmp_path: Path) -> None:
    """The rendered probe, run against a real redis-server: PONG passes, NOAUTH and a wrong password fail."""
    from plumbing.redis_local import LocalRedis

    docs = render(None)
    right, wrong = tmp_path / "right", tmp_path / "wrong"
    right.write_text("s3cret-password")
    wrong.write_text("not-it")
    with LocalRedis(tmp_path / "data", password="s3cret-password") as server:
        assert subprocess.run(_redis_probe(docs, right, server.port), timeout=10).returncode == 0
        assert subprocess.run(_redis_probe(docs, wrong, server.port), capture_output=True, timeout=10).returncode
    with LocalRedis(tmp_path / "data2") as open_server:  # no password: answers PONG, and so it should pass
        assert subprocess.run(_redis_probe(docs, right, open_server.port), timeout=10).returncode == 0
    probe = _redis_probe(docs, right, 1)  # nothing listens on port 1: fails
    assert subprocess.run(probe, capture_output=True, timeout=10).returncode != 0


def test_redis_startup_budget_pdb_checksums_and_no_secret_in_env() -> None:
    docs = render(values("production"))
    redis = pods_of(docs)["redis"]
    startup = redis["spec"]["containers"][0]["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800  # production's startupSeconds
    pdb = by_kind(docs, "PodDisruptionBudget")["rrp-rallyrobopilot-redis"]
    assert pdb["spec"]["maxUnavailable"] == 1
    for pod in (redis, pods_of(docs)["collector"]):
        assert "checksum/redis-auth" in pod["metadata"]["annotations"]
    for c in containers(redis):
        assert all("secretKeyRef" not in str(e) for e in c.get("env", [])), c["name"]
    # The generated password: one per render, the same in the Secret and in the checksums.
    default = render(None)
    password = by_kind(default, "Secret")["rrp-rallyrobopilot-redis"]["data"]["password"]
    digest = hashlib.sha256(password.encode()).hexdigest()
    for pod in (pods_of(default)["redis"], pods_of(default)["collector"]):
        assert pod["metadata"]["annotations"]["checksum/redis-auth"] == digest


def test_an_existing_secret_makes_the_render_stable_for_gitops() -> None:
    """With existingSecret the chart generates nothing: two `helm template` runs give the same manifests."""
    vals = {"redis": {"auth": {"existingSecret": "rrp-redis-auth"}}}
    first, second = render(vals), render(vals)
    assert first == second and "Secret" not in {d["kind"] for d in first}
    assert render(None) != render(None)  # without it, each render makes a password: documented, not for GitOps


# -- traces, placement, budgets, digests, open inference -----------------------------------------------------------


def test_jaeger_memory_is_bounded_and_sampling_cannot_be_flooded() -> None:
    import yaml

    docs = render({"jaeger": {"enabled": True}})
    config = yaml.safe_load(by_kind(docs, "ConfigMap")["rrp-rallyrobopilot-jaeger"]["data"]["config.yaml"])
    store = config["extensions"]["jaeger_storage"]["backends"]["memstore"]["memory"]
    assert 0 < store["max_traces"] <= 100_000
    assert config["service"]["pipelines"]["traces"]["processors"][0] == "memory_limiter"
    image = pods_of(docs)["jaeger"]["spec"]["containers"][0]["image"]
    assert image.startswith("docker.io/jaegertracing/jaeger:2.")  # v2: v1 is past its end of life
    for name in ("default", "production"):
        for workload, pod in workloads(render(values(name))):
            for c in pod["spec"]["containers"]:
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                if "OTEL_TRACES_SAMPLER" in env:
                    assert env["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
                    assert float(env["OTEL_TRACES_SAMPLER_ARG"]) <= 0.01, workload["metadata"]["name"]


def test_replicas_spread_over_nodes_and_zones_and_budgets_let_unhealthy_pods_go() -> None:
    docs = render(values("production"))
    pods = pods_of(docs)
    for name in ("torchserve", "collector", "scheduler", "game-server"):
        spec = pods[name]["spec"]
        (term,) = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        assert term["podAffinityTerm"]["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == name
        spread = {t["topologyKey"]: t["whenUnsatisfiable"] for t in spec["topologySpreadConstraints"]}
        assert spread == {"topology.kubernetes.io/zone": "ScheduleAnyway", "kubernetes.io/hostname": "ScheduleAnyway"}
    pdbs = by_kind(docs, "PodDisruptionBudget")
    assert len(pdbs) == 5
    assert all(p["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow" for p in pdbs.values())


def test_images_may_be_pinned_by_digest() -> None:
    docs = render(
        {
            **SERVING_ON,
            "images": {
                name: {"repository": f"r.example/{name}", "tag": "1", "digest": DIGEST}
                for name in ("services", "trainer", "torchserve", "redis", "jaeger")
            },
        }
    )
    images = {c["image"] for _, pod in workloads(docs) for c in containers(pod)}
    assert images and all(i.endswith("@" + DIGEST) and ":1" not in i for i in images), images
    with pytest.raises(helm.HelmError):
        render({"images": {"services": {"repository": "r", "tag": "1", "digest": "sha256:short"}}})


def test_torchserve_without_the_network_policy_needs_an_explicit_insecure() -> None:
    open_ = {**SERVING_ON, "networkPolicy": {"enabled": False}}
    with pytest.raises(helm.HelmError, match="allowInsecure"):
        render(open_)
    assert "rrp-rallyrobopilot-torchserve" in by_kind(render({**open_, "serving": {"allowInsecure": True}}),
                                                      "Deployment")  # fmt: skip


def test_only_the_deployers_get_a_token_and_it_reaches_one_lease() -> None:
    docs = render(values("production"))
    (role,) = by_kind(docs, "Role").values()
    rules = {tuple(r["verbs"]): r.get("resourceNames") for r in role["rules"]}
    assert rules == {("get", "update"): ["rrp-rallyrobopilot-deployer"], ("create",): None}
    assert all(r["resources"] == ["leases"] and r["apiGroups"] == ["coordination.k8s.io"] for r in role["rules"])
    binding = by_kind(docs, "RoleBinding")["rrp-rallyrobopilot-deployer"]
    assert binding["subjects"][0]["name"] == by_kind(docs, "ServiceAccount")["rrp-rallyrobopilot-deployer"][
        "metadata"]["name"]  # fmt: skip
    with_token = set()
    for _, pod in workloads(docs):
        spec = pod["spec"]
        assert spec["automountServiceAccountToken"] is False
        if spec.get("serviceAccountName"):
            with_token.add(component(pod))
            volumes = {v["name"]: v for v in spec["volumes"]}
            sources = volumes["kube-api-access"]["projected"]["sources"]
            assert sources[0]["serviceAccountToken"]["expirationSeconds"] <= 3600
            env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
            assert env["RRP_DEPLOY_LEASE"] == "rrp-rallyrobopilot-deployer"
    assert with_token == {"deployer", "deploy-model"}
    assert not by_kind(render({**SERVING_ON, "deployer": {**SERVING_ON["deployer"], "lease": {"enabled": False}},
                               "jobs": {}}), "Role")  # fmt: skip
